"""Files: atomic writes and hashing, images, checkpoints, the weights registry."""
