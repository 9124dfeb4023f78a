"""Compiled CPU kernels (Numba) behind the NumPy backend's sparse products and decoder update.

Each kernel does in one multi-threaded pass what NumPy would do in several passes with
[nnz, d] or [h, d] temporaries: a sampled dot product per stored entry, a sparse-times-dense
product accumulated row by row into a caller's buffer, and the decoder's constrained Adam step
row by row in cache. They compute the same quantities as the pure-standard backend; sums are
reassociated (vectorised), so results agree to rounding, not bit for bit.

Indices are int64 and values float32 or float64, as everywhere in sae-ref. Kernels are
compiled on first use and cached on disk by Numba.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

#: Floating-point freedoms granted: reassociation (vectorised sums) and fused multiply-adds.
#: No assumption that values are finite, so NaN and inf propagate as in NumPy.
_FM = {"reassoc", "contract"}
#: Entries per parallel task of :func:`sddmm`.
_TASK = 256
#: Below this many elements touched (about half a millisecond of work) a kernel runs on the
#: calling thread alone: waking the pool's threads costs more than it saves, and on a loaded
#: machine far more.
PARALLEL_MIN = 1 << 21


def run(kernel, work: int, *args):
    """``kernel(*args)``, on one thread when ``work`` (elements touched) is small."""
    if work >= PARALLEL_MIN:
        return kernel(*args)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(threads)


@njit(parallel=True, fastmath=_FM, cache=True, nogil=True)
def sddmm(a, b, a_index, b_index, out):
    """``out[i] = a[a_index[i]] . b[b_index[i]]`` for every i."""
    n = a_index.shape[0]
    d = a.shape[1]
    for task in prange((n + _TASK - 1) // _TASK):
        for i in range(task * _TASK, min(n, (task + 1) * _TASK)):
            r = a[a_index[i]]
            q = b[b_index[i]]
            s = r[0] * q[0]
            for t in range(1, d):
                s += r[t] * q[t]
            out[i] = s


@njit(cache=True, nogil=True)
def group_by(index, n):
    """A counting sort of ``index`` (values in [0, n)): ``(indptr, order)`` such that
    ``order[indptr[j]:indptr[j + 1]]`` are the positions holding ``j``, ascending."""
    indptr = np.zeros(n + 1, dtype=np.int64)
    for i in range(index.shape[0]):
        indptr[index[i] + 1] += 1
    for j in range(n):
        indptr[j + 1] += indptr[j]
    fill = indptr[:-1].copy()
    order = np.empty(index.shape[0], dtype=np.int64)
    for i in range(index.shape[0]):
        j = index[i]
        order[fill[j]] = i
        fill[j] += 1
    return indptr, order


@njit(parallel=True, fastmath=_FM, cache=True, nogil=True)
def spmm_grouped(indptr, order, in_index, values, dense, out, accumulate):
    """``out[j] = sum_{p in group j} values[p] * dense[in_index[p]]`` (groups from
    :func:`group_by`), added to ``out[j]`` when ``accumulate``; otherwise every row of
    ``out`` is written, empty groups with zeros."""
    d = dense.shape[1]
    for j in prange(indptr.shape[0] - 1):
        o = out[j]
        if not accumulate:
            o[:] = 0
        for p in range(indptr[j], indptr[j + 1]):
            i = order[p]
            v = values[i]
            q = dense[in_index[i]]
            for t in range(d):
                o[t] += v * q[t]


@njit(parallel=True, fastmath=_FM, cache=True, nogil=True)
def decoder_adam(W, g, m, v, lr_t, b1, b2, eps, bc2_sqrt, after, tiny):
    """The decoder's constrained Adam step, in place on ``W``, ``m`` and ``v``, row by row.

    With ``u`` the row over its norm (the row itself when the norm is <= ``tiny``), the
    gradient row becomes ``g - (g . u) u``. ``after=False`` ("before"): the row is replaced by
    ``u``, then the Adam step. ``after=True``: the Adam step on the row as it was, then the
    row is renormalised. ``lr_t`` is the learning rate over the first bias correction; ``g``
    is read only.
    """
    h, d = W.shape
    for j in prange(h):
        w = W[j]
        gj = g[j]
        mj = m[j]
        vj = v[j]
        scale = _inverse_norm(w, tiny)
        dot = gj[0] * w[0]
        for t in range(1, d):
            dot += gj[t] * w[t]
        c = dot * scale * scale  # (g . u) / |u| scaled back to the raw row: (g . u) u = c w
        if not after:
            for t in range(d):
                w[t] = w[t] * scale
            c = dot * scale  # the row is now u itself
        for t in range(d):
            gt = gj[t] - c * w[t]
            mt = b1 * mj[t] + (1.0 - b1) * gt
            vt = b2 * vj[t] + (1.0 - b2) * (gt * gt)
            mj[t] = mt
            vj[t] = vt
            w[t] = w[t] - lr_t * (mt / (np.sqrt(vt) / bc2_sqrt + eps))
        if after:
            scale = _inverse_norm(w, tiny)
            for t in range(d):
                w[t] = w[t] * scale


@njit(fastmath=_FM, cache=True, nogil=True)
def _inverse_norm(w, tiny):
    """1 / |w|, or 1 when |w| <= tiny (such rows are left as they are)."""
    nn = w[0] * w[0]
    for t in range(1, w.shape[0]):
        nn += w[t] * w[t]
    norm = np.sqrt(nn)
    return 1.0 / norm if norm > tiny else 1.0


@njit(parallel=True, cache=True, nogil=True)
def indices_at_least(x, lo):
    """Flat (row-major) indices, ascending, of the entries of the 2-D ``x`` with
    ``x[r, t] >= lo[r]`` (one bound per row), without a [B, h] mask: a counting pass, then a
    filling pass."""
    B, h = x.shape
    counts = np.zeros(B + 1, dtype=np.int64)
    for r in prange(B):
        c = 0
        row = x[r]
        bound = lo[r]
        for t in range(h):
            if row[t] >= bound:
                c += 1
        counts[r + 1] = c
    for r in range(B):
        counts[r + 1] += counts[r]
    out = np.empty(counts[B], dtype=np.int64)
    for r in prange(B):
        p = counts[r]
        row = x[r]
        base = r * h
        bound = lo[r]
        for t in range(h):
            if row[t] >= bound:
                out[p] = base + t
                p += 1
    return out


@njit(parallel=True, cache=True, nogil=True)
def add_row_vector(x, v):
    """``x[r] += v`` for every row of the 2-D ``x``, in place."""
    for r in prange(x.shape[0]):
        row = x[r]
        for t in range(x.shape[1]):
            row[t] += v[t]


@njit(parallel=True, cache=True, nogil=True)
def group_max(x, g, out):
    """``out[r, j] = max_s x[r, s * (h // g) + j]``: the maxima of the ``g`` column slabs of
    each row, elementwise (the groups of :func:`sae_ref.backends.top_n_indices`)."""
    B, h = x.shape
    w = h // g
    for r in prange(B):
        row = x[r]
        o = out[r]
        o[:] = row[:w]
        for s in range(1, g):
            base = s * w
            for j in range(w):
                if row[base + j] > o[j]:
                    o[j] = row[base + j]


@njit(parallel=True, cache=True, nogil=True)
def adam(p, g, m, v, p_out, m_out, v_out, b1, one_minus_b1, b2, one_minus_b2, bc2_sqrt, eps, lr_t):
    """Adam on flat arrays, elementwise in the order of the standard formula's operations
    (scalars in the arrays' dtype, no reassociation: the same bits as NumPy's passes).
    Outputs may be the inputs (in place)."""
    n = p.shape[0]
    for task in prange((n + 4095) // 4096):
        for i in range(task * 4096, min(n, (task + 1) * 4096)):
            gi = g[i]
            mi = m[i] * b1 + gi * one_minus_b1
            vi = v[i] * b2 + (gi * gi) * one_minus_b2
            m_out[i] = mi
            v_out[i] = vi
            p_out[i] = p[i] - (mi / (np.sqrt(vi) / bc2_sqrt + eps)) * lr_t
