"""Data in: sharded activation stores on disk and synthetic sources with known ground truth."""
