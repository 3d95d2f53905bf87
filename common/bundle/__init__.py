"""Running a bundle: its declared options checked before any work, and errors the user can read."""
