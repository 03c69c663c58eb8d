"""Launching foe-train jobs: torchrun on one or several (local) nodes."""
