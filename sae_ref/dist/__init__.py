"""Distributed building blocks on ``torch.distributed``: communicators, exact sharded selections,
and process launching.

- :mod:`sae_ref.dist.comm`: :class:`LocalComm` (one rank) and :class:`TorchComm` (Gloo/NCCL),
  with a ledger of the bytes every collective moves;
- :mod:`sae_ref.dist.select`: BatchTopK, TopK, threshold and decoding over pre-activations
  split by rows (data parallel) or by latents (dictionary sharding), equal bit for bit to the
  single-device operations, ties included;
- :mod:`sae_ref.dist.launch`: :func:`spawn` (real processes, failures surfaced) and
  :func:`comm_from_env` (``torchrun``).
"""

from sae_ref.dist.comm import Comm, LocalComm, TorchComm
from sae_ref.dist.launch import RankError, comm_from_env, is_torchrun, spawn
from sae_ref.dist.select import (
    LAYOUTS,
    Shards,
    agree,
    batch_topk_sharded,
    decode_sharded,
    global_nth_largest,
    threshold_sharded,
    topk_sharded,
)

__all__ = [
    "LAYOUTS", "Comm", "LocalComm", "RankError", "Shards", "TorchComm", "agree", "batch_topk_sharded",
    "comm_from_env", "decode_sharded", "global_nth_largest", "is_torchrun", "spawn", "threshold_sharded",
    "topk_sharded",
]
