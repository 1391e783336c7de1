"""The disk and the terminal: writes that fail in one line, atomic publication, progress bars."""
