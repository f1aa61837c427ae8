"""Floor 2: a project on disk (photos, labels, settings), background jobs and intake."""
