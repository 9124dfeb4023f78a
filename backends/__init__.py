"""What the Array API standard lacks, per array library.

Given an array namespace, :func:`get_backend` returns an object with the primitives that the
standard does not provide:

- ``kth_largest``: the n-th largest value of an array, or of each row (partition / top-k);
- ``spmm``, ``sddmm``, ``segment_sum``, ``to_dense``: scatter-add and sparse products;
- ``uniform`` / ``normal``: seeded random numbers created on the array's device.

Each has a pure-standard implementation (:class:`StandardBackend`, the one array-api-strict
runs) and native fast paths for NumPy, torch (CPU and CUDA) and CuPy. The selection with the
project's tie rule, built on ``kth_largest``, is :func:`top_n_mask`.

**Sync-free mode.** On a GPU every host read (a count, a ``bool`` of a device array, a
``nonzero`` whose length the host must know) stalls the step until the device catches up.
:func:`is_sync_free` tells whether the arrays of a device are handled without any: by default
on GPU devices (torch CUDA, CuPy), never on the CPU; :func:`sync_free` forces it either way
for a block (the tests run the GPU path on every backend this way). In that mode the
selections have a fixed size (:func:`top_n_fixed`), codes carry explicit zeros
(``SparseCode.padded``), and the backends skip the products that read a count back.
"""

from __future__ import annotations

import contextvars

from array_api_compat import (is_cupy_array, is_cupy_namespace, is_numpy_namespace, is_torch_array,
                              is_torch_namespace)

from ._select import group_size, top_n_fixed, top_n_fixed_mask, top_n_indices, top_n_mask
from ._standard import PRECISIONS, StandardBackend
from ._switch import within
from ._take import take
from ._triton import triton_kernels

__all__ = ["PRECISIONS", "StandardBackend", "get_backend", "group_size", "is_sync_free", "sync_free", "take", "top_n_fixed", "top_n_fixed_mask",
           "top_n_indices", "top_n_mask", "triton_kernels", "uniform", "normal", "STANDARD"]

STANDARD = StandardBackend()
_NATIVE: dict[str, StandardBackend] = {}


def _native(name: str) -> StandardBackend:
    if name not in _NATIVE:
        if name == "numpy":
            from ._numpy import NumpyBackend as cls
        elif name == "torch":
            from ._torch import TorchBackend as cls
        else:
            from ._cupy import CupyBackend as cls
        _NATIVE[name] = cls()
    return _NATIVE[name]


def get_backend(xp, *, native: bool = True) -> StandardBackend:
    """The backend for the array namespace ``xp``.

    ``native=False`` returns the pure-standard implementation whatever the library: the tests
    use it to check that every fast path gives the same result.
    """
    if native:
        if is_numpy_namespace(xp):
            return _native("numpy")
        if is_torch_namespace(xp):
            return _native("torch")
        if is_cupy_namespace(xp):
            return _native("cupy")
    return STANDARD


_SYNC_FREE = contextvars.ContextVar("sae_ref_sync_free", default=None)


def sync_free(enabled: bool = True):
    """Within this block, :func:`is_sync_free` answers ``enabled`` for every array, on every
    backend and device (``None`` restores the default: GPU arrays only)."""
    return within(_SYNC_FREE, "sync_free", enabled)


def is_sync_free(x) -> bool:
    """Whether the operations on ``x`` avoid every host read (fixed-size selections, codes
    with explicit zeros): inside :func:`sync_free` as it says, otherwise True for arrays on a
    CUDA GPU (a torch CUDA tensor, a CuPy array) and False elsewhere (other torch devices
    keep the default path, whose operations they all have)."""
    forced = _SYNC_FREE.get()
    if forced is not None:
        return forced
    if is_torch_array(x):
        return x.device.type == "cuda"
    return is_cupy_array(x)


def uniform(xp, seed: int, shape, *, low=0.0, high=1.0, dtype, device, stream: str = "host"):
    """Seeded uniform numbers on ``[low, high)`` as an array of ``xp`` on ``device``.

    ``stream="host"`` (default) draws with NumPy's PCG64 and transfers: identical numbers on
    every backend for one seed. ``stream="device"`` uses the library's own generator on the
    device (fast for large draws on a GPU; a different stream per library).
    """
    b = _for_stream(xp, stream)
    return b.uniform(xp, int(seed), tuple(shape), low=low, high=high, dtype=dtype, device=device)


def normal(xp, seed: int, shape, *, dtype, device, stream: str = "host"):
    """Seeded standard-normal numbers; ``stream`` as in :func:`uniform`."""
    return _for_stream(xp, stream).normal(xp, int(seed), tuple(shape), dtype=dtype, device=device)


def _for_stream(xp, stream: str) -> StandardBackend:
    if stream not in ("host", "device"):
        raise ValueError(f"stream must be 'host' or 'device', got {stream!r}")
    return get_backend(xp) if stream == "device" else STANDARD
