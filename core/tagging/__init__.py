"""Floor 4: tagging a catalog export: resumable runs, photo lookup, the output sheet."""
