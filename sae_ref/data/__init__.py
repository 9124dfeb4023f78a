"""Data in: sharded activation stores on disk and synthetic sources with known ground truth.

Every source has ``d`` and ``stream(batch_size, *, seed, position, xp, device, dtype,
nonfinite, rows)``: an endless, resumable iterator of ``[batch_size, d]`` arrays (see
:mod:`sae_ref.data.stream`).
"""

from sae_ref.data.store import ActivationStore, StoreWriter, write_store
from sae_ref.data.stream import BatchStream
from sae_ref.data.synthetic import SyntheticSource, mean_max_cosine

__all__ = ["ActivationStore", "BatchStream", "StoreWriter", "SyntheticSource",
           "mean_max_cosine", "write_store"]
