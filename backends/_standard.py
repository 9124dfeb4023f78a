"""The pure-standard backend: every primitive written with Array API functions only.

This is what array-api-strict runs, and the oracle that every native fast path is tested
against. It is correct for any conforming library; it is not fast (sorting where a partition
would do, sorted segment sums where a scatter-add would do).
"""

from __future__ import annotations

import math

from contextlib import contextmanager

import numpy as np
from array_api_compat import array_namespace, device as device_of

from ._take import take

#: Rows of an (nnz, d) gather processed at once by the chunked sparse products.
CHUNK = 1 << 14


class StandardBackend:
    """Primitives the Array API standard lacks, written with standard functions only.

    Subclasses replace single methods with a library's native call; every method keeps the
    signature and the exact result (bit-for-bit for selections, to rounding for sums).
    """

    name = "standard"
    #: the precisions :meth:`matmul_at` runs
    precisions = ("highest", "tf32")

    # -- selection --------------------------------------------------------------------------
    def kth_largest(self, x, n: int, *, axis: int | None = None):
        """The ``n``-th largest value of ``x`` (1-based).

        ``axis=None``: over the whole array, returned as a 0-D array.
        ``axis=-1``: per row of a 2-D array, returned with shape ``(B, 1)``.
        """
        xp = array_namespace(x)
        if axis is None:
            flat = xp.reshape(x, (-1,))
            s = xp.sort(flat, stable=False)
            return s[flat.shape[0] - n]
        s = xp.sort(x, axis=-1, stable=False)
        h = x.shape[-1]
        return s[:, h - n : h - n + 1]

    def top_n_indices(self, x, n: int, *, axis: int | None = None, maxima=None):
        """Flat indices (ascending) of the ``n`` largest entries under the tie rule, and the
        cut: :func:`sae_ref.backends.top_n_indices` with this backend's ``kth_largest``."""
        from ._select import top_n_indices

        return top_n_indices(x, n, axis=axis, backend=self, maxima=maxima)

    # -- sparse products --------------------------------------------------------------------
    def spmm(self, out_index, in_index, values, dense, n_out: int, *, out=None,
             accumulate: bool = False):
        """``out[out_index[i]] += values[i] * dense[in_index[i]]``; ``out`` has shape (n_out, d).

        A sparse (n_out x n_in) matrix with entries ``values`` at ``(out_index, in_index)``
        (duplicates summed) times a dense (n_in x d) matrix. ``out``: a buffer the result may
        be written into (a backend that can returns it; this one returns a new array).
        ``accumulate=True``: the result is ``out`` plus the product (``out`` required).
        """
        if accumulate:
            return out + self.spmm(out_index, in_index, values, dense, n_out)
        xp = array_namespace(values, dense)
        dev = device_of(dense)
        d = dense.shape[1]
        if out_index.shape[0] == 0:
            return xp.zeros((n_out, d), dtype=dense.dtype, device=dev)
        order = xp.argsort(out_index, stable=False)
        oi = take(out_index, order)
        ii = take(in_index, order)
        v = take(values, order)
        contrib = v[:, None] * take(dense, ii, axis=0)
        return _segment_sums(xp, oi, contrib, n_out, dev)

    def standardize(self, x, b, eps: float):
        """Per-row standardisation, with the encoder's centred input: for ``x`` [B, d] returns
        ``(x_std, mean, scale, x_std - b)`` with each row's mean and scale (its sample
        standard deviation plus ``eps``), both [B, 1], and ``x_std = (x - mean) / scale``; the
        last None when ``b`` ([d]) is. A backend may form them in one pass over the rows."""
        xp = array_namespace(x)
        # four passes and one new [B, d] array: the centred rows, divided in place
        mean = xp.mean(x, axis=1, keepdims=True)
        centred = x - mean
        var = xp.vecdot(centred, centred, axis=-1)[:, None] / (x.shape[1] - 1)
        scale = xp.sqrt(var) + eps
        centred /= scale
        return centred, mean, scale, None if b is None else centred - b

    def gate(self, P, a):
        """``P`` where ``a`` is positive, else 0 (both [B, n]), and the result's column sums
        ([n]): AuxK's gradient on its dense block and the encoder bias's share of it. A
        backend may form both in one pass."""
        xp = array_namespace(P, a)
        g = xp.where(a > 0, P, xp.zeros((), dtype=P.dtype, device=device_of(P)))
        return g, xp.sum(g, axis=0)

    def aux_residual(self, e_hat, residual, scale: float, on):
        """AuxK's error against a residual held negated (``x_hat - x``): ``r = e_hat +
        residual``, formed in ``e_hat``'s memory (which is consumed); returns ``(ss, g)`` with
        ``ss`` the sum of the squares of ``r`` (0-D) and ``g = scale * r`` where the 0-D
        boolean ``on`` is true, else 0. A backend may form both in one pass."""
        xp = array_namespace(e_hat, residual)
        r = e_hat
        r += residual
        flat = xp.reshape(r, (-1,))
        ss = xp.vecdot(flat, flat)
        r *= scale
        return ss, xp.where(on, r, xp.zeros((), dtype=r.dtype, device=device_of(r)))

    def decode_residual(self, rows, cols, values, W, b, x, scale: float, *, out=None):
        """A code decoded against its input, with the squared error's parts: for a code ``f``
        (entries ``values`` at ``(rows, cols)``, shape (B, h), ``rows`` ascending as in every
        code the selection makes), the decoder ``W`` ([h, d]) and bias ``b`` ([d]), returns
        ``(r, g, ss, xx)``: the residual ``r = f W + b - x`` ([B, d]; in ``out`` where the
        backend can), ``g = scale * r``, and ``ss`` and ``xx``, the sums of the squares of ``r``
        and of ``x`` (0-D). A backend may form them in one pass over the rows (and rely on the
        rows' order)."""
        xp = array_namespace(values, W, x)
        r = self.spmm(rows, cols, values, W, x.shape[0], out=out)
        r += b  # the product's own array (or the caller's buffer): ours to write
        r -= x
        flat, x_flat = xp.reshape(r, (-1,)), xp.reshape(x, (-1,))
        return r, r * scale, xp.vecdot(flat, flat), xp.vecdot(x_flat, x_flat)

    def sddmm(self, a, b, a_index, b_index):
        """``out[i] = a[a_index[i]] . b[b_index[i]]``: a dense-dense product sampled at nnz places.

        The places may repeat here; on the GPU path (torch's sampled CSR product) they must be
        unique, as in every code sae-ref makes."""
        xp = array_namespace(a, b)
        parts = []
        n = a_index.shape[0]
        for s in range(0, n, CHUNK):
            e = min(s + CHUNK, n)  # the standard leaves out-of-range slice stops unspecified
            ai = a_index[s:e]
            bi = b_index[s:e]
            parts.append(xp.sum(take(a, ai, axis=0) * take(b, bi, axis=0), axis=1))
        if not parts:
            return xp.zeros((0,), dtype=a.dtype, device=device_of(a))
        return xp.concat(parts) if len(parts) > 1 else parts[0]

    def backward_products(self, rows, cols, values, G, W, X, g_code=None, *, padded=False,
                          with_sums=False, out_W=None, out_X=None):
        """The three sparse products of the backward pass through a code ``f`` (entries
        ``values`` at ``(rows, cols)``, shape (B, h)) decoded by ``W`` ([h, d]) from inputs
        ``X`` ([B, d]), given the gradient ``G`` ([B, d]) on the decoding:

        - ``g_f[i] = G[rows[i]] . W[cols[i]]`` (plus ``g_code[i]`` when given), the sampled
          product;
        - ``g_W = f^T G`` ([h, d]);
        - ``g_X = g_f^T X`` ([h, d]: the code's places with values ``g_f``, transposed, times X).

        ``padded=True``: the entries of value 0 are listed but not kept (a padded code), and
        ``g_f`` is 0 there before it multiplies ``X``. ``with_sums=True``: a fourth result, each
        latent's sum of ``g_f`` ([h], :meth:`segment_sum`: the encoder bias's gradient).

        Returns ``(g_f, g_W, g_X)``; ``out_W`` / ``out_X``: buffers the two [h, d] results may
        be written into. A backend may compute all three in one pass over the latents.
        """
        h = W.shape[0]
        g_f = self.sddmm(G, W, rows, cols)
        if g_code is not None:
            g_f = g_f + g_code
        if padded:
            xp = array_namespace(values)
            g_f = xp.where(values != 0, g_f, xp.zeros((), dtype=g_f.dtype, device=device_of(g_f)))
        g_W = self.spmm(cols, rows, values, G, h, out=out_W)
        g_X = self.spmm(cols, rows, g_f, X, h, out=out_X)
        return (g_f, g_W, g_X, self.segment_sum(cols, g_f, h)) if with_sums else (g_f, g_W, g_X)

    @contextmanager
    def scope(self):
        """A context for a whole training step, in which the backend arranges its threads
        (NumPy: BLAS single-threaded, the backend's own threads split the work). Nothing
        here."""
        yield

    def matmul(self, a, b, *, out=None):
        """``a @ b``; ``out``: a buffer the product may be written into (a backend that can
        returns it: no new [B, h] array per training step; this one returns a new array)."""
        return a @ b

    def matmul_at(self, a, b, precision: str, *, out=None):
        """``a @ b`` at a reduced ``precision`` (:data:`PRECISIONS`):

        - ``"highest"``: :meth:`matmul`;
        - ``"tf32"``: float32 products on a GPU's TensorFloat-32 units (inputs rounded to a
          10-bit mantissa, float32 sums). The standard and CPUs have no such mode: here the
          product is float32's, which TF32 approximates;
        - ``"bf16"``: inputs rounded to bfloat16, sums and result in float32. The standard
          has no bfloat16: this backend raises ValueError.
        """
        self.check_precision(precision)
        return self.matmul(a, b, out=out)

    def matmul_add(self, a, b, v, precision: str, *, out=None):
        """``a @ b + v`` (``v`` of shape [n] added to every row) at ``precision``
        (:meth:`matmul_at`), into ``out`` where the backend can. Here the product then
        :meth:`add_row_vector` in place; a GPU backend adds ``v`` in the product's own
        kernel (one pass over the [B, n] result instead of two)."""
        prod = self.matmul(a, b, out=out) if precision == "highest" else self.matmul_at(a, b, precision, out=out)
        return self.add_row_vector(prod, v)

    def check_precision(self, precision: str) -> str:
        """``precision`` if :meth:`matmul_at` runs it on this backend; ValueError otherwise."""
        return check_precision(self.name, precision, self.precisions)

    def add_row_vector(self, x, v):
        """``x += v`` (``v`` of shape [n] added to every row of the 2-D ``x``), in place where
        the library allows; returns the sum."""
        x += v
        return x

    def group_max(self, x, g: int):
        """Each row's maxima over ``g`` column slabs: ``out[r, j] = max_s x[r, s h/g + j]``
        (``g`` divides h), shape [B, h/g]."""
        xp = array_namespace(x)
        B, h = x.shape
        return xp.max(xp.reshape(x, (B, g, h // g)), axis=1)

    def add_and_group_max(self, x, v, g: int):
        """:meth:`add_row_vector` then :meth:`group_max` of the sum: ``(x + v, maxima)``,
        ``x`` updated in place where the library allows (a backend may do both in one pass)."""
        x = self.add_row_vector(x, v)
        return x, self.group_max(x, g)

    def group_argmax(self, x, g: int):
        """``(maxima, slab)``: :meth:`group_max` and, for each group, the slab ``s`` of its
        first maximal entry (column ``s h/g + j``; the lowest among equal maxima), int64."""
        xp = array_namespace(x)
        B, h = x.shape
        slabs = xp.reshape(x, (B, g, h // g))
        return xp.max(slabs, axis=1), xp.astype(xp.argmax(slabs, axis=1), xp.int64)

    def group_keys(self, x, g: int, *, per_row: bool, runs: int | None = None):
        """The key of each column group's first maximal entry (:meth:`group_argmax`), int64
        [B, h/g]: its float32 bits made order-preserving in the high 32 bits, ``2^32 - 1 -
        pos`` in the low ones, where ``pos`` is the entry's column (``per_row``) or its flat
        index ``b h + column``. Distinct keys, ordered as the tie rule ranks the entries
        (``_select._keys``). A backend may form them in the pass that reads ``x``.
        ``runs``: also the maximum of each run of ``runs`` consecutive keys, returned second:
        in each row ([B, h/(g runs)], ``runs`` dividing h/g) ``per_row``, else in the flat
        array of keys ([B h/(g runs)], ``runs`` dividing B h/g)."""
        if runs is not None:
            xp = array_namespace(x)
            keys = self.group_keys(x, g, per_row=per_row)
            B, w = keys.shape
            shape = (B, w // runs, runs) if per_row else (B * w // runs, runs)
            return keys, xp.max(xp.reshape(keys, shape), axis=-1)
        from ._select import _keys

        xp = array_namespace(x)
        B, h = x.shape
        w = h // g
        m, s = self.group_argmax(x, g)
        col = s * w + xp.arange(w, dtype=xp.int64, device=device_of(x))[None, :]
        if not per_row:
            col = xp.arange(B, dtype=xp.int64, device=device_of(x))[:, None] * h + col
        return _keys(xp, self, m, col)

    def candidate_keys(self, x, q, g: int, *, per_row: bool):
        """The keys (as :meth:`group_keys`) of every entry of the chosen column groups ``q``:
        over the whole array, ``q`` [n] holds flat group indices ``b h/g + j`` and the result
        [n g] has group ``i``'s slab ``s`` at ``i g + s``; per row, ``q`` [B, n] holds each
        row's groups ``j`` and the result is [B, n g], laid out the same way in each row."""
        from ._select import _keys

        xp = array_namespace(x)
        B, h = x.shape
        w = h // g
        dev = device_of(x)
        slab = xp.arange(g, dtype=xp.int64, device=dev) * w
        flat = xp.reshape(x, (-1,))
        if per_row:
            n = q.shape[1]
            cols = xp.reshape(q[:, :, None] + slab[None, None, :], (B, n * g))
            rows = xp.arange(B, dtype=xp.int64, device=dev)[:, None]
            vals = xp.reshape(take(flat, xp.reshape(rows * h + cols, (-1,))), (B, n * g))
            return _keys(xp, self, vals, cols)
        cand = xp.reshape((q // w * h + q % w)[:, None] + slab[None, :], (-1,))
        return _keys(xp, self, take(flat, cand), cand)

    def code_at(self, x, idx):
        """The padded code of ``x`` ([B, h]) at the flat indices ``idx``: ``(rows, cols,
        values)`` with ``rows = idx // h``, ``cols = idx % h`` and the values of ``x`` there,
        the non-positive ones 0 (listed but not kept). A backend may form the three in one
        pass over the indices."""
        xp = array_namespace(x)
        h = x.shape[1]
        values = take(xp.reshape(x, (-1,)), idx)
        values = xp.where(values > 0, values, xp.zeros((), dtype=values.dtype, device=device_of(values)))
        return idx // h, idx % h, values

    def subgroup_keys(self, x, top, g: int, s: int, *, per_row: bool):
        """The key of each subgroup's largest entry, for the chosen column groups named by
        their keys ``top`` (:meth:`group_keys`' keys, [n], or [B, n] per row) cut into ``g / s``
        subgroups of ``s`` consecutive slabs (slabs ``u s .. u s + s - 1``): [n g/s] over the
        whole array (group ``i``'s subgroup ``u`` at ``i g/s + u``), [B, n g/s] per row. The
        keys are distinct, so a subgroup's key is its largest entry's key, which names the
        entry."""
        from ._select import _position

        xp = array_namespace(x)
        B, h = x.shape
        w = h // g
        pos = _position(top)  # the group's largest entry: its column, or its flat index
        q = pos % w if per_row else pos // h * w + pos % h % w  # the group, as candidate_keys names it
        keys = self.candidate_keys(x, q, g, per_row=per_row)
        lead = keys.shape[:-1]
        m = keys.shape[-1] // s
        return xp.max(xp.reshape(keys, lead + (m, s)), axis=-1)

    def subgroup_entry_keys(self, x, top, g: int, s: int, *, per_row: bool):
        """The keys of every entry of the subgroups (of ``s`` slabs, :meth:`subgroup_keys`)
        whose largest entries have the keys ``top`` ([n], or [B, n] per row): [n s] (the
        subgroup of ``top[i]`` at ``i s .. i s + s - 1``, slabs in order), or [B, n s]."""
        from ._select import _keys, _position

        xp = array_namespace(x)
        B, h = x.shape
        w = h // g
        dev = device_of(x)
        pos = _position(top)  # the flat index, or per row the column
        col = pos if per_row else pos % h
        first = (col // w) // s * s  # the subgroup's first slab
        slab = xp.arange(s, dtype=xp.int64, device=dev)
        cols = (col % w)[..., None] + (first[..., None] + slab) * w
        flat = xp.reshape(x, (-1,))
        if per_row:
            n = top.shape[1]
            rows = xp.arange(B, dtype=xp.int64, device=dev)[:, None, None]
            vals = xp.reshape(take(flat, xp.reshape(rows * h + cols, (-1,))), (B, n * s))
            return _keys(xp, self, vals, xp.reshape(cols, (B, n * s)))
        at = xp.reshape((pos // h * h)[:, None] + cols, (-1,))
        return _keys(xp, self, take(flat, at), at)

    def add_rows_at(self, out, cols, rows):
        """``out[cols[i]] += rows[i]`` for a 2-D ``out`` and ``rows`` [n, d]; returns the sum,
        in ``out`` where the library allows. ``cols`` are unique but for repeats whose rows are
        zero (the padding of AuxK's block). Here a sparse product (a sum per output row)."""
        xp = array_namespace(out, rows)
        n = cols.shape[0]
        ones = xp.ones((n,), dtype=rows.dtype, device=device_of(rows))
        at = xp.arange(n, dtype=xp.int64, device=device_of(rows))
        return self.spmm(cols, at, ones, rows, out.shape[0], out=out, accumulate=True)

    def row_top_block(self, pre, cols, real, k: int):
        """AuxK's block of activations: ``pre``'s columns ``cols`` (int64 [cap], in range;
        where ``real`` is False a padding column, valued -inf), then in each row the ``k``
        largest under the lower-column tie rule, kept where positive, zeros elsewhere:
        [B, cap]. ``k < cap``."""
        from ._select import top_n_fixed_mask

        xp = array_namespace(pre)
        ninf = xp.full((), -xp.inf, dtype=pre.dtype, device=device_of(pre))
        sub = xp.where(real[None, :], take(pre, cols, axis=1), ninf)
        kept = (sub > 0) & top_n_fixed_mask(sub, k, axis=-1, backend=self)
        return xp.where(kept, sub, xp.zeros((), dtype=pre.dtype, device=device_of(pre)))

    #: whether :meth:`float_bits` can reinterpret float32 bits as int32 (the standard cannot)
    has_float_bits = False

    def float_bits(self, x):
        """The int32 array with the bit patterns of the float32 array ``x`` (no conversion)."""
        raise NotImplementedError(f"the {self.name} backend cannot reinterpret float bits")

    def top_indices(self, keys, k: int, *, axis: int | None = None):
        """Positions of the ``k`` largest of the distinct integer ``keys`` (1-D; or per row of
        a 2-D array with ``axis=-1``, shape [B, k]), in no particular order."""
        xp = array_namespace(keys)
        return xp.argsort(keys, axis=-1, descending=True, stable=False)[..., :k]

    def top_values(self, keys, k: int, *, axis: int | None = None):
        """The ``k`` largest of the distinct integer ``keys`` themselves (1-D; or each row's
        of a 2-D array with ``axis=-1``, shape [B, k]), in no particular order: here the keys
        at :meth:`top_indices`; a backend whose top-k gives the values gives them at once."""
        xp = array_namespace(keys)
        top = self.top_indices(keys, k, axis=axis)
        if axis is None:
            return take(keys, top)
        B, m = keys.shape
        rows = xp.arange(B, dtype=top.dtype, device=device_of(keys))[:, None]
        return xp.reshape(take(xp.reshape(keys, (-1,)), xp.reshape(rows * m + top, (-1,))), top.shape)

    def indices_at_least(self, x, lo, *, maxima=None):
        """Flat (row-major) indices, ascending, of the entries of the 2-D ``x`` that are
        ``>= lo`` (a scalar, or one bound per row of shape (B, 1)). ``maxima``: optional, the
        :meth:`group_max` of ``x`` for some ``g``; a backend may read only the groups whose
        maximum reaches the bound (this one does not)."""
        xp = array_namespace(x)
        (idx,) = xp.nonzero(xp.reshape(x >= lo, (-1,)))
        return idx

    def compact(self, mask, n: int):
        """Flat (row-major) indices, ascending, int64, of the first ``n`` True entries of
        ``mask``; where it holds fewer, the rest are ``mask.size`` (one past the last index).
        A backend with a fixed-size form needs no count read back to the host (this one uses
        ``nonzero``, which may)."""
        xp = array_namespace(mask)
        (idx,) = xp.nonzero(xp.reshape(mask, (-1,)))
        idx = xp.astype(idx[:min(n, idx.shape[0])], xp.int64)  # no stop past the end (the standard)
        pad = xp.full((n - idx.shape[0],), math.prod(mask.shape), dtype=xp.int64, device=device_of(mask))
        return xp.concat([idx, pad]) if pad.shape[0] else idx

    def segment_sum(self, index, values, n: int):
        """``out[index[i]] += values[i]`` for a 1-D ``values``; ``out`` has shape (n,)."""
        xp = array_namespace(values)
        dev = device_of(values)
        if index.shape[0] == 0:
            return xp.zeros((n,), dtype=values.dtype, device=dev)
        order = xp.argsort(index, stable=False)
        out = _segment_sums(xp, take(index, order), take(values, order)[:, None], n, dev)
        return out[:, 0]

    def segment_count(self, index, flags, n: int, dtype):
        """How many of the boolean ``flags`` are True at each ``index``: shape (n,), of the
        floating ``dtype`` (exact integers). Here :meth:`segment_sum` of the flags; a backend
        may count with integer atomics, whose sums do not depend on their order."""
        xp = array_namespace(flags)
        return self.segment_sum(index, xp.astype(flags, dtype), n)

    def min_positive(self, values):
        """The smallest positive entry of the 1-D ``values`` (0-D), ``+inf`` if none is."""
        xp = array_namespace(values)
        inf = xp.full((), float("inf"), dtype=values.dtype, device=device_of(values))  # a fill, not a host copy
        if values.shape[0] == 0:
            return inf
        return xp.min(xp.where(values > 0, values, inf))

    def running_mean_step(self, buf, m, slot: int):
        """A running mean's step over its ring buffer ``buf``: ``(new buffer, mean)``, the new
        buffer with ``m`` (0-D) at ``slot`` (NaN there when ``m`` is not finite) and the mean of
        its finite entries. A backend may form both in one pass."""
        from sae_ref.theta import _finite_mean, _ring_put

        xp = array_namespace(buf)
        new = _ring_put(xp, buf, m, slot)
        return new, _finite_mean(xp, new)

    def dead_counters(self, cols, values, since, B: int, threshold: int, dtype):
        """The dead-latent counters after a batch whose code has entries ``values`` at latents
        ``cols``: ``(new, dead, dead_fraction, l0)`` with ``new`` each latent's tokens since
        it last fired (0 where one of its entries is nonzero, else ``since + B``), ``dead =
        new >= threshold``, and as 0-D arrays of ``dtype`` the dead fraction (the dead count
        over the h latents) and the L0 (the code's nonzero entries over the B rows; the counts
        exact below 2^24). A backend may form them in a pass over the entries and one over
        the latents."""
        xp = array_namespace(values, since)
        fired = self.segment_count(cols, values != 0, since.shape[0], values.dtype) > 0
        new = xp.where(fired, xp.zeros_like(since), since + B)
        dead = new >= threshold
        nnz = xp.count_nonzero(values)
        h = since.shape[0]
        return new, dead, xp.astype(xp.count_nonzero(dead), dtype) / h, xp.astype(nnz, dtype) / B

    def to_dense(self, rows, cols, values, shape: tuple[int, int]):
        """The dense (B, h) array with ``values`` at ``(rows, cols)`` (positions unique), 0 elsewhere."""
        xp = array_namespace(values)
        dev = device_of(values)
        B, h = shape
        if values.shape[0] == 0:
            return xp.zeros(shape, dtype=values.dtype, device=dev)
        flat = rows * h + cols
        order = xp.argsort(flat, stable=False)
        flat = take(flat, order)
        vals = take(values, order)
        p = xp.arange(B * h, dtype=flat.dtype, device=dev)
        pos = xp.clip(xp.searchsorted(flat, p), max=flat.shape[0] - 1)
        hit = take(flat, pos) == p
        zero = xp.zeros((), dtype=values.dtype, device=dev)
        return xp.reshape(xp.where(hit, take(vals, pos), zero), shape)

    # -- optimiser ---------------------------------------------------------------------------
    def adam(self, p, g, m, v, *, lr: float, b1: float, b2: float, eps: float, t: int,
             inplace: bool = False):
        """One Adam step on one parameter; returns ``(p, m, v)`` (PyTorch's arithmetic, see
        :mod:`sae_ref.optim`). ``inplace=True`` lets a backend overwrite ``p``, ``m`` and ``v``
        (the caller donates them); the result is the same either way."""
        bc1 = 1.0 - b1**t
        bc2_sqrt = (1.0 - b2**t) ** 0.5
        xp = array_namespace(p, g)
        m = b1 * m + (1.0 - b1) * g
        v = b2 * v + (1.0 - b2) * (g * g)
        return p - (lr / bc1) * (m / (xp.sqrt(v) / bc2_sqrt + eps)), m, v

    def decoder_adam(self, W, g, m, v, *, lr: float, b1: float, b2: float, eps: float, t: int,
                     order: str, inplace: bool = False):
        """The decoder's Adam step under the unit-norm constraint; returns ``(W, m, v)``.

        ``order="before"``: rows renormalised, the gradient projected off them, then
        :meth:`adam`. ``order="after"``: the gradient projected off the unit rows, :meth:`adam`
        on the rows as they were, then the rows renormalised (:mod:`sae_ref.decoder`). A
        backend may fuse the passes (NumPy does, row by row in cache); ``inplace`` as in
        :meth:`adam`.
        """
        from sae_ref.decoder import _project_unit, _unit

        xp = array_namespace(W, g)
        u = _unit(xp, W, inplace=inplace and order == "before")  # the rows stay where they are
        g = _project_unit(xp, u, g)
        if order == "before":
            return self.adam(u, g, m, v, lr=lr, b1=b1, b2=b2, eps=eps, t=t, inplace=inplace)
        W, m, v = self.adam(W, g, m, v, lr=lr, b1=b1, b2=b2, eps=eps, t=t, inplace=inplace)
        return _unit(xp, W), m, v

    def adam_sums(self, p, g, m, v, *, lr: float, b1: float, b2: float, eps: float, t: int,
                  inplace: bool = False):
        """:meth:`adam` with the gradient's :meth:`sum_squares` (a term of the global norm):
        ``(p, m, v, parts)``, ``parts`` a 1-D array whose sum is the sum of ``g^2`` (here one
        element). A backend may take the parts in the step's own pass (one per program)."""
        xp = array_namespace(g)
        ss = xp.reshape(self.sum_squares(g), (1,))
        return (*self.adam(p, g, m, v, lr=lr, b1=b1, b2=b2, eps=eps, t=t, inplace=inplace), ss)

    def decoder_adam_sums(self, W, g, m, v, *, lr: float, b1: float, b2: float, eps: float, t: int,
                          order: str, inplace: bool = False):
        """:meth:`decoder_adam` with the sum of squares of ``g`` as given (before the
        projection) in parts: ``(W, m, v, parts)``, as :meth:`adam_sums`."""
        xp = array_namespace(g)
        ss = xp.reshape(self.sum_squares(g), (1,))
        return (*self.decoder_adam(W, g, m, v, lr=lr, b1=b1, b2=b2, eps=eps, t=t, order=order,
                                   inplace=inplace), ss)

    def sum_squares(self, g):
        """:math:`\\sum g^2` over every entry of ``g``, a 0-D array."""
        xp = array_namespace(g)
        return xp.sum(g * g)

    # -- memory layout ----------------------------------------------------------------------
    def contiguous(self, x):
        """``x`` in row-major memory (the standard has no notion of layout: identity here)."""
        return x

    def latent_major(self, W_enc):
        """``W_enc`` [d, h] stored with the latents as the slow axis (column-major), the layout
        of its gradient (built latent by latent from the sparse code), so the optimiser's
        elementwise passes run over matching memory. Identity here."""
        return W_enc

    def is_column_major(self, x) -> bool:
        """Whether the 2-D ``x`` is stored column-major (as :meth:`latent_major` stores the
        encoder), so a reduction that should keep its layout goes through ``x.T``. The
        standard exposes no layout: False here."""
        return False

    # -- host to device ---------------------------------------------------------------------
    def from_host(self, xp, a, *, dtype, device):
        """The host (NumPy) array ``a`` as an array of ``xp`` on ``device``: ``xp.asarray``
        here. A backend whose copy from ordinary host memory would hold the host until the
        device's queued work has run (CUDA) copies asynchronously instead."""
        return xp.asarray(a, dtype=dtype, device=device)

    def from_host_async(self, xp, a, *, dtype, device):
        """``(array, ready)``: :meth:`from_host`, callable from a background thread while the
        device runs a step. A GPU backend copies on a side stream and returns a ``ready``
        token that :meth:`wait_ready` turns into a wait of the compute stream (so the copy
        overlaps the step); here the array is ready at once (``ready`` None)."""
        return self.from_host(xp, a, dtype=dtype, device=device), None

    def wait_ready(self, array, ready) -> None:
        """Make the current stream wait for ``array``'s copy (:meth:`from_host_async`): no
        host wait. Nothing to do here."""

    # -- device to host ---------------------------------------------------------------------
    def to_host_async(self, a):
        """A handle on the 0-D integer ``a`` whose value :func:`sae_ref.dead_bound.read_host`
        returns later: ``a`` itself here; a GPU backend queues the copy behind the work that
        computes ``a`` (no wait now) and returns ``(host array, event)``."""
        return a

    # -- captured steps (sae_ref.graphs) -----------------------------------------------------
    def can_capture(self, x) -> bool:
        """Whether work on ``x``'s device can be recorded once and replayed (:meth:`capture`)."""
        return False

    def capture(self, fn, inputs, run):
        """``(graph, outputs)``: ``fn(*inputs)`` recorded on ``inputs``' device, ``graph`` an
        object whose ``replay()`` runs it again on the same arrays (``run``: an object whose
        ``pool`` attribute the backend may keep memory shared by a run's captures in)."""
        raise NotImplementedError(f"the {self.name} backend cannot capture work")

    def same_bits(self, a, b) -> bool:
        """Whether two arrays of one shape and dtype hold the same values, NaNs in the same
        places (a backend that can read the bits compares those)."""
        xp = array_namespace(a, b)
        if xp.isdtype(a.dtype, "real floating"):
            return bool(xp.all((a == b) | (xp.isnan(a) & xp.isnan(b))))
        return bool(xp.all(a == b))

    # -- random numbers ---------------------------------------------------------------------
    def uniform(self, xp, seed: int, shape, *, low, high, dtype, device):
        """Uniform numbers on ``[low, high)`` from a generator seeded with ``seed``, on ``device``.

        The standard has no random numbers: this path draws them with NumPy's PCG64 on the host
        in float64 and moves them with ``xp.asarray``, so every backend gets the identical
        numbers for one seed (the "host" stream). Native backends draw on the device instead
        when asked for the "device" stream (see :func:`sae_ref.backends.uniform`).
        """
        g = np.random.default_rng(seed)
        u = xp.asarray(g.uniform(low, high, size=shape), dtype=dtype, device=device)
        return _below(xp, u, low, high)

    def normal(self, xp, seed: int, shape, *, dtype, device):
        """Standard normal numbers from a generator seeded with ``seed``, on ``device``."""
        g = np.random.default_rng(seed)
        return xp.asarray(g.standard_normal(size=shape), dtype=dtype, device=device)


#: The encoder product's precisions (:meth:`StandardBackend.matmul_at`).
PRECISIONS = ("highest", "tf32", "bf16")


def check_precision(backend: str, precision: str, supported=("highest", "tf32")):
    """ValueError unless ``precision`` is one of :data:`PRECISIONS` that ``backend`` runs."""
    if precision not in PRECISIONS:
        raise ValueError(f"matmul precision must be one of {PRECISIONS}, got {precision!r}")
    if precision not in supported:
        raise ValueError(f"matmul precision {precision!r} needs torch: the {backend} backend "
                         f"has no bfloat16 (supported here: {', '.join(map(repr, supported))})")


def _segment_sums(xp, sorted_index, contrib, n_out, dev):
    """Sums of the rows of ``contrib`` grouped by ``sorted_index`` (ascending), as (n_out, d).

    The standard has no scatter-add. This is a segmented inclusive scan (Hillis-Steele): at
    step s every row adds the row s places before it when both belong to the same group, so
    after ceil(log2(longest group)) steps each group's last row holds the group's sum, formed
    from that group's terms alone (its rounding does not depend on the other groups).
    """
    n, d = contrib.shape
    r = xp.arange(n_out, dtype=sorted_index.dtype, device=dev)
    start = xp.searchsorted(sorted_index, r, side="left")
    end = xp.searchsorted(sorted_index, r, side="right")
    longest = int(xp.max(end - start))
    acc = contrib
    zero = xp.zeros((), dtype=contrib.dtype, device=dev)
    s = 1
    while s < longest:
        same = sorted_index[s:] == sorted_index[:-s]
        add = xp.where(same[:, None], acc[:-s, :], zero)
        acc = xp.concat([acc[:s, :], acc[s:, :] + add], axis=0)
        s *= 2
    last = take(acc, xp.clip(end - 1, min=0), axis=0)
    return xp.where((end > start)[:, None], last, zero)


def _below(xp, u, low, high):
    """``u`` with values that rounding carried up to ``high`` moved to the float just below."""
    hi = xp.asarray(high, dtype=u.dtype, device=device_of(u))
    top = xp.nextafter(hi, xp.asarray(low, dtype=u.dtype, device=device_of(u)))
    return xp.where(u >= hi, top, u)
