r"""Data-parallel training: every rank holds the whole SAE and a share of the batch's rows.

The global batch is the ranks' batches concatenated in rank order. One data-parallel step
equals one single-process step on that global batch (to rounding):

- BatchTopK keeps the :math:`k B` largest pre-activations of the *global* batch: the cut is
  agreed across ranks (:func:`sae_ref.dist.batch_topk_sharded`, layout "rows"), not per rank;
  TopK, ReLU, JumpReLU and top-AFA select row by row and need nothing;
- every loss term is a mean over the samples, so rank :math:`r`'s gradient of its own mean,
  weighted by its share :math:`B_r / B` of the rows, summed over the ranks (one all-reduce per
  parameter) is the gradient of the global mean; the optimiser then takes the identical step
  on every rank, so the parameters stay identical without being broadcast;
- the latents' firing counts (dead-latent counters) are summed, the theta statistic (the
  smallest kept activation) is the minimum over ranks, the metrics are global.

Bytes per step: one all-reduce of every gradient (:math:`2hd + h + d` numbers), one of the
:math:`h` firing counts, a few scalars, and the BatchTopK agreement (kilobytes; see
:mod:`sae_ref.dist.select`). The pre-activations never move.

AuxK's "normalized" convention divides by the residual's variance about the batch mean: a
ratio of batch-wide sums, not a mean of per-sample terms, so it is refused here (the
"authors" convention and AuxK off are supported).

Arrays: torch tensors with a :class:`~sae_ref.dist.TorchComm`, or NumPy arrays, which travel
through Gloo as zero-copy torch views (:class:`HostComm`).
"""

from __future__ import annotations

from array_api_compat import array_namespace, is_numpy_array

from sae_ref.backends import get_backend
from sae_ref.dist.comm import Comm, TorchComm


class HostComm(Comm):
    """A :class:`~sae_ref.dist.TorchComm` (Gloo) for NumPy arrays: each collective wraps the
    array as a torch tensor sharing its memory and returns a NumPy array."""

    def __init__(self, inner: TorchComm):
        super().__init__()
        if inner.device.type != "cpu":
            raise ValueError(f"HostComm: NumPy arrays need a CPU (Gloo) process group, got {inner.backend!r}")
        self.inner, self.rank, self.size = inner, inner.rank, inner.size

    def __repr__(self) -> str:
        return f"HostComm({self.inner!r})"

    def _check(self, op, x):
        if not is_numpy_array(x):
            raise TypeError(f"{op}: argument 'x' must be a NumPy array, got {type(x).__name__}")

    @staticmethod
    def _t(x):
        import numpy as np
        import torch

        a = np.asarray(x)  # NumPy reductions may give scalars; 0-D arrays stay 0-D
        return torch.from_numpy(a if a.flags.c_contiguous else np.ascontiguousarray(a))

    def _reduce(self, x, op):
        return self.inner._reduce(self._t(x), op).numpy()

    def _gather(self, x):
        return self.inner._gather(self._t(x)).numpy()

    def _broadcast(self, x, src):
        return self.inner._broadcast(self._t(x), src).numpy()

    def _barrier(self):
        self.inner._barrier()

    def _int_array(self, values):
        import numpy as np

        return np.asarray(values, dtype=np.int64)


def for_arrays(comm: Comm, like) -> Comm:
    """``comm`` adapted to the arrays of ``like``: NumPy arrays over a Gloo TorchComm go
    through :class:`HostComm`; otherwise ``comm`` itself."""
    if isinstance(comm, TorchComm) and is_numpy_array(like):
        return HostComm(comm)
    return comm


class Reducer:
    """The batch-wide quantities of one data-parallel step (used by :func:`sae_ref.train.step`).

    Parameters
    ----------
    comm : Comm of more than one rank
    config : TrainConfig
    batch : this rank's rows [B_r, d]
    """

    def __init__(self, comm: Comm, config, batch):
        if config.aux_convention == "normalized":
            raise ValueError("step: data-parallel training supports aux_convention 'authors' or None; "
                             "'normalized' divides by a batch-wide variance (see sae_ref.dist.data_parallel)")
        self.comm = for_arrays(comm, batch)
        self.xp = array_namespace(batch)
        sizes = [s[0] for s in self.comm.gather_ints([int(batch.shape[0])])]
        self.B = sum(sizes)
        self.share = sizes[self.comm.rank] / self.B
        self.k = config.k
        self.select = self._batch_topk if config.arch == "batchtopk" else None

    def _batch_topk(self, pre):
        from sae_ref.dist.select import batch_topk_sharded

        return batch_topk_sharded(pre, self.k, self.comm, layout="rows")

    def sum(self, x):
        return self.comm.all_reduce_sum(x)

    def min(self, x):
        return self.comm.all_reduce_min(x)

    def gradients(self, grads):
        """Each gradient weighted by this rank's share and summed over the ranks. A gradient
        stored column-major (W_enc, latent-major) is reduced through its transpose, so it keeps
        its layout."""
        be = get_backend(self.xp)

        def reduce(g):
            if g.ndim == 2 and be.is_column_major(g):
                return self.comm.all_reduce_sum(g.T * self.share).T
            return self.comm.all_reduce_sum(g * self.share)

        return grads.map(reduce)

    def means(self, *values):
        """Per-rank means of the samples -> the global batch's means (one all-reduce)."""
        xp = self.xp
        packed = self.comm.all_reduce_sum(xp.stack([xp.asarray(v, dtype=xp.float64) * self.share for v in values]))
        return tuple(xp.astype(packed[i], values[i].dtype) for i in range(len(values)))

    def nmse(self, x_hat, x):
        xp = self.xp
        r = x_hat - x
        both = self.comm.all_reduce_sum(xp.stack([xp.sum(r * r), xp.sum(x * x)]))
        return both[0] / both[1]
