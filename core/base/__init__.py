"""Floor 0: errors and problems written for people."""
