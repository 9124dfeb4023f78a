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


def threads(work: int) -> int:
    """How many threads :func:`run` gives a kernel touching ``work`` elements."""
    return numba.get_num_threads() if work >= PARALLEL_MIN else 1


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
def spmm_by_input(indptr, order, in_index, values, dense, out, accumulate, parts):
    """:func:`spmm_grouped` traversed the other way, for a ``dense`` bigger than ``out`` (the
    decoding ``f W_dec``): the output rows are split into one range per thread, and each
    thread reads the dense rows its entries need in order, each once, adding each into the
    output rows (its range stays in cache). Gathering a dense row per entry instead reads
    ``dense`` from memory nnz times at random.

    ``indptr, order``: :func:`group_by` of the output index; ``parts``: the number of row
    ranges (the threads')."""
    n_out, d = out.shape
    n_in = dense.shape[0]
    for part in prange(parts):
        r0 = n_out * part // parts
        r1 = n_out * (part + 1) // parts
        if not accumulate:
            for r in range(r0, r1):
                out[r, :] = 0
        a, b = indptr[r0], indptr[r1]
        # this range's entries by input row: a counting sort
        start = np.zeros(n_in + 1, dtype=np.int64)
        for q in range(a, b):
            start[in_index[order[q]] + 1] += 1
        for j in range(n_in):
            start[j + 1] += start[j]
        fill = start[:-1].copy()
        rows = np.empty(b - a, dtype=np.int64)
        by_in = np.empty(b - a, dtype=np.int64)
        for r in range(r0, r1):
            for q in range(indptr[r], indptr[r + 1]):
                i = order[q]
                j = in_index[i]
                rows[fill[j]] = r
                by_in[fill[j]] = i
                fill[j] += 1
        for j in range(n_in):
            if start[j + 1] == start[j]:
                continue
            w = dense[j]
            for q in range(start[j], start[j + 1]):
                v = values[by_in[q]]
                o = out[rows[q]]
                for t in range(d):
                    o[t] += v * w[t]


@njit(parallel=True, fastmath=_FM, cache=True, nogil=True)
def decoder_backward(indptr, order, rows, values, G, W, g_code, g_f, out_W):
    """The sampled product and the decoder's gradient in one pass, latent by latent (entries
    grouped by latent with :func:`group_by`): for each entry ``i`` of latent ``j``,
    ``g_f[i] = G[rows[i]] . W[j]`` (plus ``g_code[i]`` when ``g_code`` is not empty) and
    ``out_W[j] += values[i] G[rows[i]]``. Each decoder row is read once (not once per entry)
    and each gathered row of ``G`` serves both products.

    (Adding the encoder's product ``g_f^T X`` to the same pass was slower: two gathered
    [B, d] matrices no longer stay in cache.)"""
    d = G.shape[1]
    has_code = g_code.shape[0] > 0
    for j in prange(indptr.shape[0] - 1):
        w = W[j]
        ow = out_W[j]
        ow[:] = 0
        for p in range(indptr[j], indptr[j + 1]):
            i = order[p]
            q = G[rows[i]]
            s = q[0] * w[0]
            for t in range(1, d):
                s += q[t] * w[t]
            if has_code:
                s += g_code[i]
            g_f[i] = s
            v = values[i]
            for t in range(d):
                ow[t] += v * q[t]


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


@njit(cache=True, nogil=True, inline="always")
def _count_at_least(row, bound):
    """How many entries of the 1-D ``row`` are ``>= bound``."""
    c = 0
    for t in range(row.shape[0]):
        if row[t] >= bound:
            c += 1
    return c


@njit(parallel=True, cache=True, nogil=True)
def indices_at_least(x, lo):
    """Flat (row-major) indices, ascending, of the entries of the 2-D ``x`` with
    ``x[r, t] >= lo[r]`` (one bound per row), without a [B, h] mask: a counting pass, then a
    filling pass."""
    B, h = x.shape
    counts = np.zeros(B + 1, dtype=np.int64)
    for r in prange(B):
        counts[r + 1] = _count_at_least(x[r], lo[r])
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
def group_max(x, g, bias, out):
    """``out[r, j] = max_s x[r, s * (h // g) + j]``: the maxima of the ``g`` column slabs of
    each row, elementwise (the groups of :func:`sae_ref.backends.top_n_indices`). When
    ``bias`` is not empty it is first added to every row of ``x``, in place, in the same pass.

    Slabs are taken as slices and compared without a branch, so the loops vectorise."""
    B, h = x.shape
    w = h // g
    add = bias.shape[0] > 0
    for r in prange(B):
        row = x[r]
        o = out[r]
        for s in range(g):
            seg = row[s * w:(s + 1) * w]
            if add:
                b = bias[s * w:(s + 1) * w]
                for j in range(w):
                    seg[j] += b[j]
            if s == 0:
                for j in range(w):
                    o[j] = seg[j]
            else:
                for j in range(w):
                    y = seg[j]
                    a = o[j]
                    o[j] = y if y > a else a


#: Row ranges of :func:`indices_at_least_grouped` (a few per thread, for balance).
_ROW_CHUNKS = 64


@njit(parallel=True, cache=True, nogil=True)
def indices_at_least_grouped(x, lo, maxima):
    """:func:`indices_at_least` given the column-slab maxima of ``x`` (:func:`group_max`):
    an entry ``>= lo[r]`` lies in a group whose maximum is ``>= lo[r]``, so only those
    groups' entries are read, in one pass.

    Each range of rows writes its candidates in order into its own stretch of a scratch
    array, sized by the groups it may read (untouched scratch pages are never faulted in);
    the stretches are then concatenated."""
    B, h = x.shape
    w = maxima.shape[1]
    g = h // w
    n_groups = np.zeros(B, dtype=np.int64)
    for r in prange(B):
        n_groups[r] = _count_at_least(maxima[r], lo[r])
    T = min(B, _ROW_CHUNKS)
    cap = np.zeros(T + 1, dtype=np.int64)
    for t in range(T):
        cap[t + 1] = cap[t] + g * n_groups[B * t // T:B * (t + 1) // T].sum()
    scratch = np.empty(cap[T], dtype=np.int64)
    used = np.zeros(T + 1, dtype=np.int64)
    for t in prange(T):
        p = cap[t]
        J = np.empty(w, dtype=np.int64)
        for r in range(B * t // T, B * (t + 1) // T):
            bound = lo[r]
            mr = maxima[r]
            nj = 0
            for j in range(w):
                if mr[j] >= bound:
                    J[nj] = j
                    nj += 1
            row = x[r]
            base = r * h
            for s in range(g):
                seg = row[s * w:(s + 1) * w]
                for q in range(nj):
                    if seg[J[q]] >= bound:
                        scratch[p] = base + s * w + J[q]
                        p += 1
        used[t + 1] = p - cap[t]
    for t in range(T):
        used[t + 1] += used[t]
    out = np.empty(used[T], dtype=np.int64)
    for t in prange(T):
        out[used[t]:used[t + 1]] = scratch[cap[t]:cap[t] + used[t + 1] - used[t]]
    return out


@njit(cache=True, nogil=True, inline="always")
def _adam_slice(p, g, m, v, p_out, m_out, v_out, b1, one_minus_b1, b2, one_minus_b2, bc2_sqrt,
                eps, lr_t):
    for i in range(p.shape[0]):
        gi = g[i]
        mi = m[i] * b1 + gi * one_minus_b1
        vi = v[i] * b2 + (gi * gi) * one_minus_b2
        m_out[i] = mi
        v_out[i] = vi
        p_out[i] = p[i] - (mi / (np.sqrt(vi) / bc2_sqrt + eps)) * lr_t


#: Elements per parallel task of :func:`adam`.
_ADAM_TASK = 1 << 14


@njit(parallel=True, cache=True, nogil=True)
def adam(p, g, m, v, p_out, m_out, v_out, b1, one_minus_b1, b2, one_minus_b2, bc2_sqrt, eps, lr_t):
    """Adam on flat arrays, elementwise in the order of the standard formula's operations
    (scalars in the arrays' dtype, no reassociation: the same bits as NumPy's passes), into
    outputs distinct from the inputs (:func:`adam_inplace` updates in place)."""
    n = p.shape[0]
    for task in prange((n + _ADAM_TASK - 1) // _ADAM_TASK):
        a, e = task * _ADAM_TASK, min(n, (task + 1) * _ADAM_TASK)
        _adam_slice(p[a:e], g[a:e], m[a:e], v[a:e], p_out[a:e], m_out[a:e], v_out[a:e], b1,
                    one_minus_b1, b2, one_minus_b2, bc2_sqrt, eps, lr_t)


@njit(parallel=True, cache=True, nogil=True)
def adam_inplace(p, g, m, v, b1, one_minus_b1, b2, one_minus_b2, bc2_sqrt, eps, lr_t):
    """:func:`adam` writing ``p``, ``m`` and ``v`` in place. A kernel of its own: given an
    output that is also an input, the compiler cannot rule out a partial overlap and keeps
    the loop scalar (2.4x slower)."""
    n = p.shape[0]
    for task in prange((n + _ADAM_TASK - 1) // _ADAM_TASK):
        a, e = task * _ADAM_TASK, min(n, (task + 1) * _ADAM_TASK)
        ps, ms, vs = p[a:e], m[a:e], v[a:e]
        _adam_slice(ps, g[a:e], ms, vs, ps, ms, vs, b1, one_minus_b1, b2, one_minus_b2,
                    bc2_sqrt, eps, lr_t)
