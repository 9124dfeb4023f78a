r"""Communicators: the few collectives the sharded operations need, and a ledger of their bytes.

Two implementations share one interface (:class:`Comm`):

- :class:`LocalComm`: a world of one rank. Every collective is the identity (an all-gather adds
  a leading axis of length 1), so the sharded operations run unchanged in a single process on
  any array library (NumPy, torch, array-api-strict, ...).
- :class:`TorchComm`: ``torch.distributed`` over a process group (Gloo for CPU tensors, NCCL
  for CUDA tensors). Arguments must be torch tensors on :attr:`TorchComm.device`; results
  stay there. No collective reads a value back to the host except :meth:`Comm.gather_ints`
  (meant for sizes and flags) and :meth:`Comm.all_gather_varlen` (which needs the lengths to
  size its buffers).

Collectives are functional: they return new arrays and leave their arguments untouched
(:class:`LocalComm` may return the argument itself; do not write into results in place).

**Byte ledger.** Every collective adds to ``comm.bytes[kind]`` (``kind`` is the method's
name) and ``comm.calls[kind]``. The rule counts the payload that reaches this rank from the
other ranks, for an array of ``n`` bytes on each of the ``R`` ranks:

=====================  ==========================================================
collective             bytes counted on each rank
=====================  ==========================================================
``all_reduce_*``       ``n`` (the reduced buffer; a ring moves about ``2n(R-1)/R``)
``all_gather``         ``(R - 1) n`` (the other ranks' shares)
``all_gather_varlen``  ``(R - 1) (8 + L_max s)``: each other rank's length (int64)
                       and its share padded to the longest, ``s`` bytes per item
``broadcast``          ``n`` (sent by the source, received by the others)
``barrier``            0
=====================  ==========================================================

With ``R = 1`` nothing leaves the process: every collective counts 0 bytes (calls are
still counted). The naive alternative that the sharded selections avoid, an all-gather of a
rank's ``B_r x h_r`` pre-activations, counts ``(R - 1) B_r h_r s`` under the same rule.

>>> import numpy as np
>>> comm = LocalComm()
>>> comm.all_gather(np.arange(3.0)).shape, comm.size, comm.bytes["all_gather"]
((1, 3), 1, 0)
"""

from __future__ import annotations

import collections
import datetime

from array_api_compat import array_namespace

_REDUCTIONS = ("sum", "max", "min")


class Comm:
    """The interface: ``rank``, ``size``, the collectives, and the byte ledger.

    Subclasses provide ``_reduce(x, op)``, ``_gather(x)``, ``_broadcast(x, src)``,
    ``_barrier()`` and ``_int_array(values)``; the public methods check arguments and keep the
    ledger.

    Attributes
    ----------
    rank : int
        This process's index in ``0 .. size - 1``.
    size : int
        The number of ranks ``R``.
    bytes : collections.Counter
        Bytes counted by collective kind (see the module docstring for the rule).
    calls : collections.Counter
        Number of calls by collective kind.
    """

    rank: int = 0
    size: int = 1

    def __init__(self):
        self.bytes = collections.Counter()
        self.calls = collections.Counter()

    # -- the ledger -----------------------------------------------------------------------
    def ledger(self) -> dict[str, dict[str, int]]:
        """A snapshot ``{"bytes": {...}, "calls": {...}, "total_bytes": int}``."""
        return {"bytes": dict(self.bytes), "calls": dict(self.calls), "total_bytes": self.total_bytes}

    @property
    def total_bytes(self) -> int:
        """All bytes counted so far, every kind together."""
        return int(sum(self.bytes.values()))

    def reset_ledger(self) -> None:
        """Set every count back to zero."""
        self.bytes.clear()
        self.calls.clear()

    def _record(self, kind: str, nbytes: int) -> None:
        self.calls[kind] += 1
        self.bytes[kind] += int(nbytes) if self.size > 1 else 0

    # -- collectives ----------------------------------------------------------------------
    def all_reduce_sum(self, x):
        """The elementwise sum of ``x`` over the ranks (same shape and dtype on every rank)."""
        return self._all_reduce(x, "sum")

    def all_reduce_max(self, x):
        """The elementwise maximum of ``x`` over the ranks."""
        return self._all_reduce(x, "max")

    def all_reduce_min(self, x):
        """The elementwise minimum of ``x`` over the ranks."""
        return self._all_reduce(x, "min")

    def _all_reduce(self, x, op: str):
        self._check(f"all_reduce_{op}", x)
        self._record(f"all_reduce_{op}", _nbytes(x))
        return self._reduce(x, op)

    def all_gather(self, x):
        """Every rank's ``x`` (equal shapes), stacked in rank order: shape ``(R, *x.shape)``."""
        self._check("all_gather", x)
        self._record("all_gather", (self.size - 1) * _nbytes(x))
        return self._gather(x)

    def all_gather_varlen(self, x) -> list:
        """Every rank's 1-D ``x`` (lengths may differ), as a list in rank order.

        Two collectives: the lengths (int64, read back to the host to size the buffers), then
        the arrays padded to the longest.
        """
        self._check("all_gather_varlen", x)
        if x.ndim != 1:
            raise ValueError(f"all_gather_varlen: argument 'x' must be 1-D, got shape {tuple(x.shape)}")
        xp = array_namespace(x)
        lengths = [int(v[0]) for v in self._host_gather_ints([int(x.shape[0])])]
        longest = max(lengths)
        self._record("all_gather_varlen", (self.size - 1) * (8 + longest * _itemsize(x)))
        pad = xp.zeros((longest - int(x.shape[0]),), dtype=x.dtype, device=_device(x))
        stacked = self._gather(xp.concat([x, pad]))
        return [stacked[r, :length] for r, length in enumerate(lengths)]

    def broadcast(self, x, src: int = 0):
        """Rank ``src``'s ``x`` on every rank (``x`` gives the shape and dtype elsewhere)."""
        self._check("broadcast", x)
        if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < self.size:
            raise ValueError(f"broadcast: argument 'src' must be a rank in [0, {self.size - 1}], got {src!r}")
        self._record("broadcast", _nbytes(x))
        return self._broadcast(x, src)

    def barrier(self) -> None:
        """Wait until every rank has reached this call."""
        self._record("barrier", 0)
        self._barrier()

    def gather_ints(self, values) -> list[tuple[int, ...]]:
        """Every rank's list of Python ints (the same length on every rank), on the host.

        One all-gather of ``len(values)`` int64 per rank, counted as ``all_gather``. For sizes
        and flags, e.g. checking that every rank was given matching shapes.
        """
        values = [int(v) for v in values]
        self._record("all_gather", (self.size - 1) * 8 * len(values))
        return self._host_gather_ints(values)

    def _host_gather_ints(self, values):
        rows = self._gather(self._int_array(values))
        return [tuple(int(v) for v in row) for row in _to_list(rows)]

    def _check(self, op: str, x) -> None:
        """Raise if ``x`` is not an array this communicator can send."""


class LocalComm(Comm):
    """A world of one rank: every collective is the identity.

    Works with arrays of any library supported by ``array_api_compat``.

    >>> import numpy as np
    >>> LocalComm().all_reduce_sum(np.ones(2)).tolist()
    [1.0, 1.0]
    """

    rank = 0
    size = 1

    def __repr__(self) -> str:
        return "LocalComm()"

    def _check(self, op, x):
        _check_array(op, x)

    def _reduce(self, x, op):
        return x

    def _gather(self, x):
        return array_namespace(x).expand_dims(x, axis=0)

    def _broadcast(self, x, src):
        return x

    def _barrier(self):
        pass

    def _host_gather_ints(self, values):
        return [tuple(values)]


class TorchComm(Comm):
    """``torch.distributed`` collectives over ``group`` (default: the default process group).

    The process group must be initialised (``torch.distributed.init_process_group``, done by
    :func:`sae_ref.dist.launch.spawn` and :func:`sae_ref.dist.launch.comm_from_env`).

    Parameters
    ----------
    group : ProcessGroup or None
        The group to communicate in; ``None`` for the default group.

    Attributes
    ----------
    backend : str
        ``"gloo"`` or ``"nccl"`` (as ``torch.distributed.get_backend`` names it).
    device : torch.device
        Where tensors must live: the CPU for Gloo, the current CUDA device for NCCL.
    """

    def __init__(self, group=None):
        super().__init__()
        import torch
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchComm: torch.distributed has no initialised process group; "
                               "call torch.distributed.init_process_group first (or use sae_ref.dist.launch)")
        self._torch, self._dist, self.group = torch, dist, group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group)).lower()
        if self.backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self._ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}

    def __repr__(self) -> str:
        return f"TorchComm(rank={self.rank}, size={self.size}, backend={self.backend!r})"

    def _check(self, op, x):
        if not isinstance(x, self._torch.Tensor):
            raise TypeError(f"{op}: argument 'x' must be a torch.Tensor, got {type(x).__name__}")
        if x.device.type != self.device.type:
            raise ValueError(f"{op}: argument 'x' must be on {self.device.type} for the {self.backend} "
                             f"backend, got a tensor on {x.device}")

    def _flat(self, x):
        # 0-D tensors travel as 1-element 1-D tensors; every buffer is a private contiguous copy
        return x.reshape(-1).clone(memory_format=self._torch.contiguous_format)

    def _reduce(self, x, op):
        buf = self._flat(x)
        self._dist.all_reduce(buf, op=self._ops[op], group=self.group)
        return buf.reshape(x.shape)

    def _gather(self, x):
        buf = self._flat(x)
        parts = [self._torch.empty_like(buf) for _ in range(self.size)]
        self._dist.all_gather(parts, buf, group=self.group)
        return self._torch.stack(parts).reshape((self.size, *x.shape))

    def _broadcast(self, x, src):
        buf = self._flat(x)
        root = self._dist.get_global_rank(self.group, src) if self.group is not None else src
        self._dist.broadcast(buf, src=root, group=self.group)
        return buf.reshape(x.shape)

    def _barrier(self):
        if self.backend == "nccl":
            self._dist.barrier(group=self.group, device_ids=[self.device.index])
        else:
            self._dist.barrier(group=self.group)

    def _int_array(self, values):
        return self._torch.tensor(values, dtype=self._torch.int64, device=self.device)


def timeout(seconds: float) -> datetime.timedelta:
    """A process-group timeout from seconds (``torch.distributed`` takes a ``timedelta``)."""
    return datetime.timedelta(seconds=float(seconds))


# --- helpers ----------------------------------------------------------------------------------
def _check_array(op, x):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{op}: argument 'x' must be an array, got {type(x).__name__}")


def _itemsize(x) -> int:
    """Bytes per element, from the dtype's bit width (standard ``finfo`` / ``iinfo``)."""
    xp = array_namespace(x)
    if xp.isdtype(x.dtype, "bool"):
        return 1
    info = xp.finfo(x.dtype) if xp.isdtype(x.dtype, "real floating") else xp.iinfo(x.dtype)
    return int(info.bits) // 8


def _nbytes(x) -> int:
    n = 1
    for s in x.shape:
        n *= int(s)
    return n * _itemsize(x)


def _device(x):
    from array_api_compat import device

    return device(x)


def _to_list(a):
    from sae_ref.arrays import to_numpy

    return to_numpy(a).tolist()
