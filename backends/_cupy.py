"""CuPy fast paths: torch's fused kernels through DLPack, else CuPy's own kernels.

With torch (a CUDA build) and Triton installed, the GPU path's primitives run as the torch
backend's on zero-copy views of the CuPy arrays (:mod:`._bridge`): the fused Triton kernels a
torch step runs, on CuPy's current stream, each giving torch's bits for the same inputs (the
Array API code between them runs as CuPy's kernels). Torch then allocates the kernels' outputs
from its own caching allocator (CuPy's pool holds the rest).

Without them, ``cupy.partition`` selects and sorted-segment kernels sum. Every sum of a
sparse product is formed without atomic adds (``cupyx.scatter_add`` adds in whatever order
the threads arrive, so two runs of one step would differ in the last bits): the entries are
sorted by their output row, the row boundaries found by ``searchsorted``, and one thread per
output element sums its row's entries in order (:data:`_SEGMENT_SPMM`). No count is read back
to the host.
"""

from __future__ import annotations

import contextlib
import functools

import cupy as cp

from ._bridge import TorchBridge, through_torch
from ._standard import StandardBackend, _below

_COPY_STREAMS: dict = {}

#: out[r, c] = sum over e in [start[r], start[r + 1]) of values[e] * dense[index[e], c]
_SEGMENT_SPMM = cp.ElementwiseKernel(
    "raw int64 start, raw int64 index, raw T values, raw T dense, int64 d",
    "T out",
    """
    const long long r = i / d, c = i % d;
    T acc = 0;
    for (long long e = start[r]; e < start[r + 1]; ++e) {
        acc += values[e] * dense[index[e] * d + c];
    }
    out = acc;
    """,
    "sae_ref_segment_spmm",
)


def _segment_spmm(out_index, in_index, values, dense, n_out):
    """The (n_out, d) sums of ``values[i] * dense[in_index[i]]`` grouped by ``out_index``."""
    order = cp.argsort(out_index)  # a radix sort: stable
    at = out_index[order]
    start = cp.searchsorted(at, cp.arange(n_out + 1, dtype=at.dtype)).astype(cp.int64)
    dense = cp.ascontiguousarray(dense)
    out = cp.empty((n_out, dense.shape[1]), dtype=dense.dtype)
    _SEGMENT_SPMM(start, in_index[order].astype(cp.int64), values[order].astype(dense.dtype), dense,
                  dense.shape[1], out)
    return out


#: out[e] = the dot product of a[i[e]] and b[j[e]] (rows of length d)
_SAMPLED_DOTS = cp.ElementwiseKernel(
    "raw T a, raw T b, int64 i, int64 j, int64 d",
    "T out",
    """
    T acc = 0;
    for (long long c = 0; c < d; ++c) {
        acc += a[i * d + c] * b[j * d + c];
    }
    out = acc;
    """,
    "sae_ref_sampled_dots",
)


@functools.cache
def _torch_cuda() -> bool:
    """Whether torch imports with CUDA (the bridge's other half is Triton)."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@through_torch
class CupyBackend(TorchBridge, StandardBackend):
    name = "cupy"

    def bridge_on(self, arrays):
        from ._triton import off

        if off() or not _torch_cuda():
            return False
        return all(isinstance(a, cp.ndarray) for a in arrays) and len({a.device.id for a in arrays}) == 1

    def bridge_context(self, arrays):
        import torch

        device = torch.device("cuda", arrays[0].device.id)
        ptr = cp.cuda.get_current_stream().ptr
        # torch launches (and Triton, which asks torch for the stream) on CuPy's current stream
        stream = torch.cuda.default_stream(device) if ptr == 0 else torch.cuda.ExternalStream(ptr, device=device)
        both = contextlib.ExitStack()
        both.enter_context(torch.cuda.device(device))
        both.enter_context(torch.cuda.stream(stream))
        return both

    def from_torch(self, t):
        return cp.from_dlpack(t)

    def matmul_add(self, a, b, v, precision, *, out=None):
        self.check_precision(precision)  # CuPy has no bfloat16
        # through torch: one GEMM whose epilogue adds the bias
        return self.through_torch("matmul_add", StandardBackend.matmul_add, (a, b, v, precision), {"out": out})

    def kth_largest(self, x, n, *, axis=None):
        if axis is None:
            flat = x.reshape(-1)
            j = flat.shape[0] - n
            return cp.partition(flat, j)[j]
        h = x.shape[-1]
        return cp.partition(x, h - n, axis=-1)[:, h - n : h - n + 1]

    def matmul_at(self, a, b, precision, *, out=None):
        self.check_precision(precision)  # CuPy has no bfloat16
        if precision != "tf32" or a.dtype != cp.float32:
            return self.matmul(a, b, out=out)
        # CuPy chooses cuBLAS's compute type per dtype (its CUPY_TF32 setting); set TF32 for
        # this product and restore the setting
        from cupy._core import _routines_linalg as L

        before = L.get_compute_type(cp.float32)
        L.set_compute_type(cp.float32, L.COMPUTE_TYPE_TF32)
        try:
            return cp.matmul(a, b) if out is None else cp.matmul(a, b, out=out)
        finally:
            L.set_compute_type(cp.float32, before)

    def spmm(self, out_index, in_index, values, dense, n_out, *, out=None, accumulate=False):
        res = _segment_spmm(out_index, in_index, values, dense, n_out)
        if accumulate:
            out += res
            return out
        if out is not None and out.shape == res.shape and out.dtype == res.dtype:
            out[...] = res
            return out
        return res

    def sddmm(self, a, b, a_index, b_index):
        # one launch, one thread a place (no loop over chunks, no gathered rows)
        dt = cp.result_type(a, b)
        out = cp.empty(a_index.shape[0], dtype=dt)
        if out.shape[0]:
            a, b = cp.ascontiguousarray(a, dtype=dt), cp.ascontiguousarray(b, dtype=dt)
            _SAMPLED_DOTS(a, b, a_index.astype(cp.int64), b_index.astype(cp.int64), a.shape[1], out)
        return out

    def compact(self, mask, n):
        # each True entry's position among the True ones is a running count; scattering the
        # indices there needs no count on the host (the False entries and the True ones past
        # the n-th go to a spare slot; unfilled slots keep the size of the mask)
        flat = mask.reshape(-1)
        pos = cp.cumsum(flat, dtype=cp.int64) - 1
        out = cp.full(n + 1, flat.shape[0], dtype=cp.int64)
        out[cp.where(flat & (pos < n), pos, n)] = cp.arange(flat.shape[0], dtype=cp.int64)
        return out[:n]

    def segment_sum(self, index, values, n):
        at = cp.arange(values.shape[0], dtype=cp.int64)
        return _segment_spmm(index, at, values, cp.ones((values.shape[0], 1), dtype=values.dtype), n)[:, 0]

    has_float_bits = True

    def float_bits(self, x):
        return x.view(cp.int32)

    def top_indices(self, keys, k, *, axis=None):
        n = keys.shape[-1]
        return cp.argpartition(keys, n - k, axis=-1)[..., n - k :]

    def latent_major(self, W_enc):
        return cp.asfortranarray(W_enc)

    def is_column_major(self, x):
        return x.ndim == 2 and x.shape[0] > 1 and x.flags.f_contiguous and not x.flags.c_contiguous

    def contiguous(self, x):
        return cp.ascontiguousarray(x)

    def to_dense(self, rows, cols, values, shape):
        out = cp.zeros(shape, dtype=values.dtype)
        out[rows, cols] = values
        return out

    def from_host_async(self, xp, a, *, dtype, device):
        # page-locked host memory, copied on a side stream that overlaps the step
        import cupyx

        with cp.cuda.Device(device):
            host = cupyx.empty_pinned(a.shape, dtype=a.dtype)  # the store's dtype
            host[...] = a
            side = _COPY_STREAMS.setdefault(cp.cuda.Device().id, cp.cuda.Stream(non_blocking=True))
            raw = cp.empty(a.shape, dtype=a.dtype)
            raw.set(host, stream=side)
            with side:
                out = raw.astype(dtype, copy=False)  # converted on the device
            done = side.record()
        return out, (done, host)  # the pinned buffer lives until the copy is done

    def wait_ready(self, array, ready):
        if ready is not None:
            # the copy was queued a batch ago: waiting for it alone (not for the step) lets
            # the page-locked buffer go safely
            ready[0].synchronize()

    def to_host_async(self, a):
        # into page-locked memory, behind the queued work, with an event to wait on later
        import cupyx

        host = cupyx.empty_pinned(a.shape, dtype=a.dtype)
        a.get(out=host, stream=cp.cuda.get_current_stream(), blocking=False)
        return host, cp.cuda.get_current_stream().record()

    def uniform(self, xp, seed, shape, *, low, high, dtype, device):
        with cp.cuda.Device(device):
            g = cp.random.default_rng(seed)
            return _below(xp, (g.random(shape, dtype=cp.float64) * (high - low) + low).astype(dtype), low, high)

    def normal(self, xp, seed, shape, *, dtype, device):
        with cp.cuda.Device(device):
            return cp.random.default_rng(seed).standard_normal(shape, dtype=cp.float64).astype(dtype)
