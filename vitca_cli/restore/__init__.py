"""Restoring images: backends, tile plans, windowed steps, the restore loop, batches of files."""
