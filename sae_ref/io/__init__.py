"""Files out: training checkpoints and the SAELens on-disk format, written atomically.

- :mod:`sae_ref.io.checkpoint` -- named NumPy arrays in safetensors plus a JSON commit record,
  verified on load;
- :mod:`sae_ref.io.saelens` -- the SAELens SAE directory (``cfg.json`` +
  ``sae_weights.safetensors``), read and written without sae-lens.
"""

from sae_ref.io.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from sae_ref.io.saelens import load_saelens, save_saelens

__all__ = [
    "CheckpointError", "latest_checkpoint", "load_checkpoint", "load_saelens", "save_checkpoint",
    "save_saelens",
]
