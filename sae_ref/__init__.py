"""sae-ref: sparse-autoencoder operations written once against the Python Array API.

The modules, one concept each:

- :mod:`sae_ref.activations` -- ReLU, TopK, BatchTopK, JumpReLU, threshold inference;
- :mod:`sae_ref.losses` -- MSE (two units), NMSE, L1, sqrt-L1, the JumpReLU L0 penalty;
- :mod:`sae_ref.auxk` -- the dead-latent auxiliary loss in both conventions;
- :mod:`sae_ref.sae` -- parameters, initialisation, standardisation, encode/decode,
  forward and backward;
- :mod:`sae_ref.decoder` -- the unit-norm decoder constraint;
- :mod:`sae_ref.sparse` -- the sparse code every op passes around;
- :mod:`sae_ref.afa` -- AFA bounds, quasi-orthogonality, top-AFA and the AFA loss;
- :mod:`sae_ref.optim`, :mod:`sae_ref.theta`, :mod:`sae_ref.train` -- Adam and schedules, the
  BatchTopK inference threshold, the pure training step and its presets;
- :mod:`sae_ref.fit`, :mod:`sae_ref.cli` -- the training loop with files and progress, and the
  ``sae-ref`` command;
- :mod:`sae_ref.data` -- activation stores, synthetic sources, the offline corpus, harvesting;
- :mod:`sae_ref.io` -- checkpoints and the SAELens format;
- :mod:`sae_ref.downstream` -- splicing an SAE into a transformers model (loss recovered);
- :mod:`sae_ref.metrics`, :mod:`sae_ref.fvu` -- evaluation metrics streamed in float64, and
  explained variance under each named definition (which library uses which);
- :mod:`sae_ref.zf`, :mod:`sae_ref.zf_plots` -- the AFA evaluation of any SAE (f-tilde,
  epsLBO, the ZF plot and half-violins);
- :mod:`sae_ref.pruning` -- removing the lowest activations, four ways, with frozen statistics;
- :mod:`sae_ref.frontier`, :mod:`sae_ref.frontier_plots` -- Hill-curve and other frontier fits
  on any backend, and their figures;
- :mod:`sae_ref.report`, :mod:`sae_ref.report_page` -- ``sae-ref report``: all of the above
  on held-out activations, written as one page;
- :mod:`sae_ref.backends` -- what the standard lacks, per array library;
- :mod:`sae_ref.validation` -- reusable property checks.
"""

import os

# OpenMP threads (those of the compiled NumPy kernels, and torch's on the CPU) spin for a few
# milliseconds after each parallel region before they sleep; on a machine with as many cores
# as threads they take those cores from the work that follows (a BLAS product right after a
# kernel ran at half speed). Waiting passively costs a wake-up of microseconds instead. Read
# by each OpenMP runtime when it loads; a value you set first is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

from sae_ref._checks import no_checks  # noqa: E402
from sae_ref.arrays import resolve, to_numpy  # noqa: E402
from sae_ref.sae import SAEConfig, SAEParams, backward, decode, encode, forward, init_params  # noqa: E402
from sae_ref.sparse import SparseCode  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "SAEConfig", "SAEParams", "SparseCode", "backward", "decode", "encode", "forward",
    "init_params", "no_checks", "resolve", "to_numpy",
]
