"""NumPy fast paths: ``np.partition`` for selection, SciPy's CSR product and ``bincount`` for sums."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import sparse

from ._standard import StandardBackend

#: Entries per chunk of the sampled products (two gathered [chunk, d] blocks stay in cache).
SDDMM_CHUNK = 1024
#: Elements per chunk of the fused Adam step.
ADAM_CHUNK = 1 << 16


_POOL = None


def _parallel(part, n: int, grain: int) -> None:
    """Run ``part(lo, hi)`` over ``range(n)`` split into one contiguous piece per core (the
    pieces write disjoint outputs; NumPy's kernels release the GIL). Small ``n`` runs inline."""
    global _POOL
    workers = os.cpu_count() or 1
    if workers == 1 or n < 4 * grain:
        part(0, n)
        return
    if _POOL is None:
        _POOL = ThreadPoolExecutor(workers, thread_name_prefix="sae-ref")
    bounds = [n * i // workers for i in range(workers + 1)]
    for f in [_POOL.submit(part, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]:
        f.result()


def _same_flat_layout(arrays) -> bool:
    """Whether the arrays are contiguous with the same shape and strides, so their flat
    memory-order views line up element for element."""
    first = arrays[0]
    return all(isinstance(a, np.ndarray) and a.shape == first.shape and a.strides == first.strides
               and (a.flags.c_contiguous or a.flags.f_contiguous) for a in arrays)


class NumpyBackend(StandardBackend):
    name = "numpy"

    def kth_largest(self, x, n, *, axis=None):
        x = np.asarray(x)
        if axis is None:
            flat = x.reshape(-1)
            j = flat.shape[0] - n
            return np.asarray(np.partition(flat, j)[j])
        h = x.shape[-1]
        return np.partition(x, h - n, axis=-1)[:, h - n : h - n + 1]

    def spmm(self, out_index, in_index, values, dense, n_out):
        # SciPy's compiled sparse products beat any pure-NumPy scatter (np.add.at is ~50x and
        # add.reduceat ~10x slower on (nnz, d) contributions). The compressed axis is the one
        # that reads ``dense`` in order: columns (CSC) when the output is the smaller side
        # (decoding: each dictionary row is read once), rows (CSR) otherwise (gradients).
        fmt = sparse.csc_matrix if n_out < dense.shape[0] else sparse.csr_matrix
        m = fmt((values, (out_index, in_index)), shape=(n_out, dense.shape[0]))
        return np.asarray(m @ dense, dtype=dense.dtype)

    def sddmm(self, a, b, a_index, b_index):
        # gathered rows in cache-sized chunks, reused buffers, a fused dot (vecdot); the
        # chunks are shared among threads (NumPy releases the GIL in take and vecdot)
        n = a_index.shape[0]
        out = np.empty(n, dtype=np.result_type(a, b))

        def part(lo, hi):
            step = min(SDDMM_CHUNK, max(hi - lo, 1))
            ga = np.empty((step, a.shape[1]), dtype=a.dtype)
            gb = np.empty((step, b.shape[1]), dtype=b.dtype)
            for s in range(lo, hi, step):
                e = min(s + step, hi)
                np.take(a, a_index[s:e], axis=0, out=ga[: e - s])
                np.take(b, b_index[s:e], axis=0, out=gb[: e - s])
                np.vecdot(ga[: e - s], gb[: e - s], out=out[s:e])

        _parallel(part, n, SDDMM_CHUNK)
        return out

    def adam(self, p, g, m, v, *, lr, b1, b2, eps, t, inplace=False):
        arrays = (p, g, m, v)
        if not _same_flat_layout(arrays) or p.dtype != g.dtype:
            return super().adam(p, g, m, v, lr=lr, b1=b1, b2=b2, eps=eps, t=t, inplace=inplace)
        # the standard formula's operations in the same order (so the same bits), applied
        # chunk by chunk in cache instead of pass by pass over the whole parameter
        out = (p, m, v) if inplace else tuple(np.empty_like(a) for a in (p, m, v))
        pf, gf, mf, vf = (a.ravel(order="K") for a in arrays)
        po, mo, vo = (a.ravel(order="K") for a in out)
        bc1 = 1.0 - b1**t
        bc2_sqrt = (1.0 - b2**t) ** 0.5

        def part(lo, hi):
            tmp = np.empty(min(ADAM_CHUNK, hi - lo), dtype=p.dtype)
            for s in range(lo, hi, ADAM_CHUNK):
                e = min(s + ADAM_CHUNK, hi)
                gc, w = gf[s:e], tmp[: e - s]
                np.multiply(mf[s:e], b1, out=mo[s:e])
                np.multiply(gc, 1.0 - b1, out=w)
                mo[s:e] += w
                np.multiply(vf[s:e], b2, out=vo[s:e])
                np.multiply(gc, gc, out=w)
                w *= 1.0 - b2
                vo[s:e] += w
                np.sqrt(vo[s:e], out=w)
                w /= bc2_sqrt
                w += eps
                np.divide(mo[s:e], w, out=w)
                w *= lr / bc1
                np.subtract(pf[s:e], w, out=po[s:e])

        _parallel(part, pf.shape[0], ADAM_CHUNK)
        return out

    def sum_squares(self, g):
        flat = np.asarray(g).ravel(order="K")  # a view for C- or F-ordered arrays
        return np.asarray(np.dot(flat, flat))

    def latent_major(self, W_enc):
        return np.asfortranarray(W_enc)

    def segment_sum(self, index, values, n):
        return np.bincount(index, weights=values, minlength=n).astype(values.dtype, copy=False)

    def contiguous(self, x):
        return np.ascontiguousarray(x)

    def to_dense(self, rows, cols, values, shape):
        out = np.zeros(shape, dtype=values.dtype)
        out[rows, cols] = values
        return out
