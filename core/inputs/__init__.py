"""Floor 1: everything a user hands in (photos, zips, label sheets, catalogs, links), checked."""
