"""Files out: training checkpoints and the SAELens on-disk format, written atomically."""
