"""CuPy fast paths: ``cupy.partition`` for selection, sorted-segment kernels for sums.

Every sum of a sparse product is formed without atomic adds (``cupyx.scatter_add`` adds in
whatever order the threads arrive, so two runs of one step would differ in the last bits):
the entries are sorted by their output row, the row boundaries found by ``searchsorted``, and
one thread per output element sums its row's entries in order (:data:`_SEGMENT_SPMM`). No
count is read back to the host.
"""

from __future__ import annotations

import cupy as cp

from ._standard import CHUNK, StandardBackend, _below

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


class CupyBackend(StandardBackend):
    name = "cupy"

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
        out = cp.empty(a_index.shape[0], dtype=cp.result_type(a, b))
        for s in range(0, a_index.shape[0], CHUNK):
            out[s : s + CHUNK] = cp.einsum(
                "ij,ij->i", a[a_index[s : s + CHUNK]], b[b_index[s : s + CHUNK]]
            )
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
