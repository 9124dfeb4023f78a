"""NumPy fast paths: ``np.partition`` for selection, compiled kernels (Numba; SciPy's sparse
products where Numba is switched off) for the sparse products and the decoder's Adam step,
``bincount`` for sums.

``NumpyBackend(compiled=False)``, or the environment variable ``SAE_REF_COMPILED=0`` for the
shared instance, keeps to NumPy and SciPy: the tests check both paths against the
pure-standard oracle.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

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


_BLAS = []


def _grouped(K, index, n, *arrays):
    """The entries grouped by ``index`` (values in [0, n)), for the kernels that take
    ``(indptr, order, ...)``: ``(indptr, identity, permuted)`` with each of ``arrays`` copied
    into group order and, last in ``permuted``, the permutation itself. Each kernel then reads
    its entries' indices and values in sequence; through the permutation, every entry's
    reads were misses at random places (2-3x slower at 2M entries)."""
    indptr, order = K.group_by(_index(index), n)
    identity = np.arange(order.shape[0], dtype=np.int64)
    return indptr, identity, [a[order] for a in arrays] + [order]


def _blas_controller():
    """threadpoolctl's controller of the BLAS libraries loaded (None without threadpoolctl)."""
    if not _BLAS:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS.append(ThreadpoolController())
        except ImportError:
            _BLAS.append(None)
    return _BLAS[0]


def _same_flat_layout(arrays) -> bool:
    """Whether the arrays are contiguous with the same shape and strides, so their flat
    memory-order views line up element for element."""
    first = arrays[0]
    return all(isinstance(a, np.ndarray) and a.shape == first.shape and a.strides == first.strides
               and (a.flags.c_contiguous or a.flags.f_contiguous) for a in arrays)


_FLOATS = (np.float32, np.float64)


def _compiled_kernels():
    """The kernels module, or None when ``SAE_REF_COMPILED=0`` or Numba is not importable."""
    if os.environ.get("SAE_REF_COMPILED", "1") == "0":
        return None
    try:
        from . import _kernels
    except ImportError:  # numba missing or broken: SciPy's products still work
        return None
    return _kernels


def _rows(*arrays) -> bool:
    """Whether the arrays are C-contiguous float32/float64 of one dtype (what the kernels take)."""
    first = arrays[0]
    return all(isinstance(a, np.ndarray) and a.dtype == first.dtype and a.dtype in _FLOATS
               and a.flags.c_contiguous for a in arrays)


def _index(i):
    return np.ascontiguousarray(i, dtype=np.int64)


#: Entries below which a sparse product never looks for a dense block (small products are
#: fast either way).
DENSE_MIN_NNZ = 1 << 18
#: The share of its block of touched rows x columns that a product's entries must fill for
#: the block to be multiplied densely: a GEMM runs 10-20x more multiply-adds per second than
#: the sparse kernels, so a block an eighth full is cheaper dense.
DENSE_MIN_FILL = 1 / 8


def _dense_block(out_index, in_index, n_out, n_in):
    """For a product whose entries (out_index, in_index) fill at least ``DENSE_MIN_FILL`` of
    the block of the distinct rows and columns they touch (as AuxK's code does when few
    latents are dead: every row picks among the same few columns): the distinct ids of each
    side and each entry's position among them, ``(o_ids, i_ids, o_pos, i_pos)``; else None."""
    nnz = out_index.shape[0]
    if nnz < DENSE_MIN_NNZ:
        return None
    ids = []
    for index, n in ((out_index, n_out), (in_index, n_in)):
        seen = np.zeros(n, dtype=bool)
        seen[index] = True
        ids.append(np.flatnonzero(seen))
    if nnz < DENSE_MIN_FILL * ids[0].shape[0] * ids[1].shape[0]:
        return None
    pos = []
    for index, n, u in ((out_index, n_out, ids[0]), (in_index, n_in, ids[1])):
        where = np.empty(n, dtype=np.int64)
        where[u] = np.arange(u.shape[0])
        pos.append(where[index])
    return ids[0], ids[1], pos[0], pos[1]


def _block_matrix(block, values):
    """The dense [n_o, n_i] block of ``values`` at ``(o_pos, i_pos)``, duplicates summed."""
    o_ids, i_ids, o_pos, i_pos = block
    n_o, n_i = o_ids.shape[0], i_ids.shape[0]
    Z = np.bincount(o_pos * n_i + i_pos, weights=values, minlength=n_o * n_i)
    return o_ids, i_ids, Z.astype(values.dtype, copy=False).reshape(n_o, n_i)


class NumpyBackend(StandardBackend):
    name = "numpy"

    def __init__(self, compiled: bool | None = None):
        self._kernels_module = None if compiled is False else _compiled_kernels()
        if compiled and self._kernels_module is None:
            raise ImportError("NumpyBackend(compiled=True) needs numba (pip install numba)")
        self.compiled = self._kernels_module is not None

    has_float_bits = True

    def float_bits(self, x):
        return np.ascontiguousarray(x).view(np.int32)

    def top_indices(self, keys, k, *, axis=None):
        n = keys.shape[-1]
        return np.argpartition(keys, n - k, axis=-1)[..., n - k :]

    def top_values(self, keys, k, *, axis=None):
        n = keys.shape[-1]
        return np.partition(keys, n - k, axis=-1)[..., n - k :]  # the values: no gather after

    def kth_largest(self, x, n, *, axis=None):
        x = np.asarray(x)
        if axis is None:
            flat = x.reshape(-1)
            j = flat.shape[0] - n
            return np.asarray(np.partition(flat, j)[j])
        h = x.shape[-1]
        out = np.empty((x.shape[0], 1), dtype=x.dtype)

        def part(lo, hi):  # NumPy's partition releases the GIL: the rows split over threads
            out[lo:hi] = np.partition(x[lo:hi], h - n, axis=-1)[:, h - n : h - n + 1]

        _parallel(part, x.shape[0], 64)
        return out

    def spmm(self, out_index, in_index, values, dense, n_out, *, out=None, accumulate=False):
        d = dense.shape[1]
        fits = out is not None and out.shape == (n_out, d) and _rows(out, dense)
        if accumulate and not fits:
            return out + self.spmm(out_index, in_index, values, dense, n_out)
        block = _dense_block(out_index, in_index, n_out, dense.shape[0])
        if block is not None:  # the entries fill much of their rows x columns: one GEMM
            o_ids, i_ids, Z = _block_matrix(block, values)
            if not fits:
                out = np.zeros((n_out, d), dtype=dense.dtype)
            elif not accumulate:
                out[...] = 0
            out[o_ids] += self.matmul(Z, dense[i_ids]).astype(dense.dtype, copy=False)
            return out
        K = self._kernels_module
        if K is not None and _rows(values, dense) and values.ndim == 1:
            # a counting sort by output row, then each output row accumulated by one thread
            # from the dense rows it needs, into the caller's buffer when given (no [n_out, d]
            # allocation per step)
            indptr, order, (in_g, val_g, _) = _grouped(K, out_index, n_out, _index(in_index), values)
            if not fits:
                out = np.empty((n_out, d), dtype=dense.dtype)
            work = (values.shape[0] + n_out) * d
            # a dense side bigger than the output (decoding) is read in order, each row once
            args = (indptr, order, in_g, val_g, dense, out, accumulate)
            if dense.shape[0] > n_out:
                K.run(K.spmm_by_input, work, *args, K.threads(work))
            else:
                K.run(K.spmm_grouped, work, *args)
            return out
        # SciPy's compiled sparse products beat any pure-NumPy scatter (np.add.at is ~50x and
        # add.reduceat ~10x slower on (nnz, d) contributions). The compressed axis is the one
        # that reads ``dense`` in order: columns (CSC) when the output is the smaller side
        # (decoding: each dictionary row is read once), rows (CSR) otherwise (gradients).
        fmt = sparse.csc_matrix if n_out < dense.shape[0] else sparse.csr_matrix
        m = fmt((values, (out_index, in_index)), shape=(n_out, dense.shape[0]))
        prod = np.asarray(m @ dense, dtype=dense.dtype)
        if accumulate:
            out += prod
            return out
        return prod

    def sddmm(self, a, b, a_index, b_index):
        block = _dense_block(a_index, b_index, a.shape[0], b.shape[0]) if a.dtype == b.dtype else None
        if block is not None:  # the sampled places fill much of the block: one GEMM
            a_ids, b_ids, a_pos, b_pos = block
            M = self.matmul(a[a_ids], b[b_ids].T)
            return M[a_pos, b_pos]
        K = self._kernels_module
        if K is not None and _rows(a, b):  # one vectorised dot per entry, no gathered copies
            out = np.empty(a_index.shape[0], dtype=a.dtype)
            K.run(K.sddmm, out.shape[0] * a.shape[1], a, b, _index(a_index), _index(b_index), out)
            return out
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

    def backward_products(self, rows, cols, values, G, W, X, g_code=None, *, padded=False,
                          with_sums=False, out_W=None, out_X=None):
        K = self._kernels_module
        h, d = W.shape
        extra = () if g_code is None else (g_code,)
        if (K is None or padded or not _rows(values, G, W, X, *extra) or values.ndim != 1
                or _dense_block(cols, rows, h, G.shape[0]) is not None):
            return super().backward_products(rows, cols, values, G, W, X, g_code, padded=padded,
                                             with_sums=with_sums, out_W=out_W, out_X=out_X)
        # the sampled product and f^T G in one pass over the latents (each decoder row read
        # once), then g_f^T X with the same grouping
        out_W = out_W if out_W is not None and out_W.shape == (h, d) and _rows(out_W, W) else \
            np.empty((h, d), dtype=W.dtype)
        code = np.empty(0, dtype=W.dtype) if g_code is None else g_code
        indptr, order, permuted = _grouped(K, cols, h, _index(rows), values, *extra)
        rows_g, values_g = permuted[:2]
        code_g = permuted[2] if g_code is not None else code
        g_f_g = np.empty(values.shape[0], dtype=W.dtype)  # in group order
        K.run(K.decoder_backward, (values.shape[0] + h) * d, indptr, order, rows_g, values_g, G, W,
              code_g, g_f_g, out_W)
        fits = out_X is not None and out_X.shape == (h, d) and _rows(out_X, X)
        if not fits:
            out_X = np.empty((h, d), dtype=X.dtype)
        K.run(K.spmm_grouped, (values.shape[0] + h) * d, indptr, order, rows_g, g_f_g, X, out_X, False)
        g_f = np.empty_like(g_f_g)
        g_f[permuted[-1]] = g_f_g  # back to the code's order
        return (g_f, out_W, out_X, self.segment_sum(cols, g_f, h)) if with_sums else (g_f, out_W, out_X)

    def adam(self, p, g, m, v, *, lr, b1, b2, eps, t, inplace=False):
        arrays = (p, g, m, v)
        if not _same_flat_layout(arrays) or p.dtype != g.dtype:
            return super().adam(p, g, m, v, lr=lr, b1=b1, b2=b2, eps=eps, t=t, inplace=inplace)
        out = (p, m, v) if inplace else tuple(np.empty_like(a) for a in (p, m, v))
        pf, gf, mf, vf = (a.ravel(order="K") for a in arrays)
        po, mo, vo = (a.ravel(order="K") for a in out)
        bc1 = 1.0 - b1**t
        bc2_sqrt = (1.0 - b2**t) ** 0.5
        K = self._kernels_module
        if K is not None and p.dtype in _FLOATS:
            # one multi-threaded pass; scalars in the arrays' dtype, as NumPy's passes use them
            f = p.dtype.type
            scalars = (f(b1), f(1.0 - b1), f(b2), f(1.0 - b2), f(bc2_sqrt), f(eps), f(lr / bc1))
            if inplace:
                K.run(K.adam_inplace, pf.shape[0], pf, gf, mf, vf, *scalars)
            else:
                K.run(K.adam, pf.shape[0], pf, gf, mf, vf, po, mo, vo, *scalars)
            return out

        # the standard formula's operations in the same order (so the same bits), applied
        # chunk by chunk in cache instead of pass by pass over the whole parameter
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

    def decoder_adam(self, W, g, m, v, *, lr, b1, b2, eps, t, order, inplace=False):
        K = self._kernels_module
        if K is None or not _rows(W, g, m, v) or W.ndim != 2 or W.shape != g.shape:
            return super().decoder_adam(W, g, m, v, lr=lr, b1=b1, b2=b2, eps=eps, t=t,
                                        order=order, inplace=inplace)
        from sae_ref.decoder import TINY

        if not inplace:
            W, m, v = W.copy(), m.copy(), v.copy()
        # one pass over the rows, each in cache: normalise, project, Adam (, renormalise)
        K.run(K.decoder_adam, W.size, W, g, m, v, lr / (1.0 - b1**t), b1, b2, eps,
              (1.0 - b2**t) ** 0.5, order == "after", TINY)
        return W, m, v

    def add_row_vector(self, x, v):
        K = self._kernels_module
        if K is not None and _rows(x, v) and x.ndim == 2 and v.shape == (x.shape[1],):
            K.run(K.add_row_vector, x.size, x, v)  # all cores; NumPy's += runs on one
            return x
        x += v
        return x

    def group_max(self, x, g):
        K = self._kernels_module
        B, h = x.shape
        if K is not None and _rows(x) and g > 1:
            out = np.empty((B, h // g), dtype=x.dtype)
            K.run(K.group_max, x.size, x, g, np.empty(0, dtype=x.dtype), out)
            return out
        return super().group_max(x, g)

    def add_and_group_max(self, x, v, g):
        K = self._kernels_module
        B, h = x.shape
        if K is not None and _rows(x, v) and g > 1 and v.shape == (h,):
            out = np.empty((B, h // g), dtype=x.dtype)
            K.run(K.group_max, x.size, x, g, v, out)  # one pass: add, then the slab maxima
            return x, out
        return super().add_and_group_max(x, v, g)

    @contextmanager
    def scope(self):
        # OpenBLAS's workers spin for ~0.1 s after each product before they sleep, and took
        # half the cores from every multi-threaded pass that followed the encoder GEMM (2x
        # slower selection and Adam on 2 cores). Inside the scope BLAS runs on the calling
        # thread only, and :meth:`matmul` splits the big product over this module's threads,
        # which sleep when idle.
        ctl = _blas_controller()
        if ctl is None:
            yield
            return
        with ctl.limit(limits=1, user_api="blas"):
            yield

    def matmul(self, a, b, *, out=None):
        if out is None or out.shape != (a.shape[0], b.shape[1]) or out.dtype != np.result_type(a, b):
            out = None
        if a.shape[0] * a.shape[1] * b.shape[1] < 1 << 26:  # small: BLAS as configured
            return np.matmul(a, b, out=out)
        if out is None:
            out = np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a, b))
        with self.scope():  # blocks, one per core, each a single-threaded BLAS product
            if a.shape[0] >= b.shape[1]:  # of rows
                _parallel(lambda lo, hi: np.matmul(a[lo:hi], b, out=out[lo:hi]), a.shape[0], 64)
            else:  # of columns, as rows of the transposed product (a strided view BLAS takes)
                _parallel(lambda lo, hi: np.matmul(b.T[lo:hi], a.T, out=out.T[lo:hi]), b.shape[1], 64)
        return out

    def indices_at_least(self, x, lo, *, maxima=None):
        K = self._kernels_module
        lo = np.asarray(lo, dtype=x.dtype)
        if K is not None and _rows(x) and x.ndim == 2 and lo.size in (1, x.shape[0]):
            # no [B, h] boolean mask; one bound per row (a whole-array bound repeated)
            bounds = np.ascontiguousarray(np.broadcast_to(lo.reshape(-1), (x.shape[0],)))
            if maxima is not None and _rows(x, maxima) and maxima.shape[0] == x.shape[0]:
                # only the slabs' groups whose maximum reaches the bound are read
                return K.run(K.indices_at_least_grouped, x.size, x, bounds, maxima)
            return K.run(K.indices_at_least, x.size, x, bounds)
        return np.flatnonzero(x >= lo)

    def sum_squares(self, g):
        flat = np.asarray(g).ravel(order="K")  # a view for C- or F-ordered arrays
        return np.asarray(np.dot(flat, flat))

    def latent_major(self, W_enc):
        return np.asfortranarray(W_enc)

    def is_column_major(self, x):
        return x.ndim == 2 and x.shape[0] > 1 and x.flags.f_contiguous and not x.flags.c_contiguous

    def segment_sum(self, index, values, n):
        return np.bincount(index, weights=values, minlength=n).astype(values.dtype, copy=False)

    def contiguous(self, x):
        return np.ascontiguousarray(x)

    def to_dense(self, rows, cols, values, shape):
        out = np.zeros(shape, dtype=values.dtype)
        out[rows, cols] = values
        return out
