"""CuPy fast paths: ``cupy.partition`` for selection, ``cupyx.scatter_add`` for sums."""

from __future__ import annotations

import cupy as cp
import cupyx

from ._standard import CHUNK, StandardBackend, _below


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
        if out is None or out.shape != (n_out, dense.shape[1]) or out.dtype != dense.dtype:
            if accumulate:
                return out + self.spmm(out_index, in_index, values, dense, n_out)
            out = cp.zeros((n_out, dense.shape[1]), dtype=dense.dtype)
        elif not accumulate:  # the caller's buffer: reused across steps, no allocation
            out.fill(0)
        for s in range(0, out_index.shape[0], CHUNK):
            contrib = dense[in_index[s : s + CHUNK]] * values[s : s + CHUNK, None]
            cupyx.scatter_add(out, out_index[s : s + CHUNK], contrib)
        return out

    def sddmm(self, a, b, a_index, b_index):
        out = cp.empty(a_index.shape[0], dtype=cp.result_type(a, b))
        for s in range(0, a_index.shape[0], CHUNK):
            out[s : s + CHUNK] = cp.einsum(
                "ij,ij->i", a[a_index[s : s + CHUNK]], b[b_index[s : s + CHUNK]]
            )
        return out

    def compact(self, mask, n):
        # each True entry's position among the True ones is a running count; scattering the
        # indices there needs no count on the host (the False entries go to a spare slot)
        flat = mask.reshape(-1)
        pos = cp.cumsum(flat, dtype=cp.int64) - 1
        out = cp.empty(n + 1, dtype=cp.int64)
        out[cp.where(flat, pos, n)] = cp.arange(flat.shape[0], dtype=cp.int64)
        return out[:n]

    def segment_sum(self, index, values, n):
        out = cp.zeros((n,), dtype=values.dtype)
        cupyx.scatter_add(out, index, values)
        return out

    def is_column_major(self, x):
        return x.ndim == 2 and x.shape[0] > 1 and x.flags.f_contiguous and not x.flags.c_contiguous

    def contiguous(self, x):
        return cp.ascontiguousarray(x)

    def to_dense(self, rows, cols, values, shape):
        out = cp.zeros(shape, dtype=values.dtype)
        out[rows, cols] = values
        return out

    def uniform(self, xp, seed, shape, *, low, high, dtype, device):
        with cp.cuda.Device(device):
            g = cp.random.default_rng(seed)
            return _below(xp, (g.random(shape, dtype=cp.float64) * (high - low) + low).astype(dtype), low, high)

    def normal(self, xp, seed, shape, *, dtype, device):
        with cp.cuda.Device(device):
            return cp.random.default_rng(seed).standard_normal(shape, dtype=cp.float64).astype(dtype)
