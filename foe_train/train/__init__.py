"""Training loop pieces: run tracking (metrics files, W&B, progress)."""
