"""Selecting the n largest entries under the project's tie rule.

**Tie rule.** Among entries equal to the cut value, the one with the lower index wins: the
lower flat (row-major) index for a whole-array selection, the lower column for a per-row one.
So the selection is a function of the values alone, identical on every backend, although
``torch.topk`` and ``np.argpartition`` leave ties unspecified.

The work splits into the cut value ``v`` (the n-th largest, a native partition or top-k where
the library has one) and passes in standard functions: when exactly ``n`` entries are
``>= v`` (no surplus ties, the usual case for float data) that is the mask; otherwise keep
``x > v`` and the first ``n - count(x > v)`` entries equal to ``v`` in index order (a prefix
count over the ties).

**Bracketing the cut** (:func:`top_n_indices`, what the SAE uses). Split each row's columns
into groups of ``g`` (group ``j`` holds columns ``j, j + h/g, j + 2h/g, ...``) and take each
group's maximum: one pass, and a ``g``-times smaller array. The n-th largest group maximum
``lo`` is a lower bound of the cut, exactly: the n groups with the largest maxima hold n
distinct entries ``>= lo``. So every selected entry is among the candidates ``x >= lo``, and
the exact cut and the tie rule are applied to the candidates alone (a few percent more than
``n`` on float data). A candidate lies in a group whose maximum is ``>= lo``, so a backend
may find the candidates by reading only those groups (about ``n`` of them). This replaces a partition of all ``B h`` entries by one of ``B h / g``
plus one of about ``n``; the result is the same set, bit for bit, whatever the data.
"""

from __future__ import annotations

from array_api_compat import array_namespace, device as device_of

from ._take import take


def top_n_mask(x, n: int, *, axis: int | None = None, backend=None, return_cut: bool = False):
    """Boolean mask of the ``n`` largest entries of ``x`` under the lower-index tie rule.

    Parameters
    ----------
    x : array, shape (B, h)
        Real floating values, no NaN (the caller checks).
    n : int
        How many to keep: ``1 <= n <= x.size`` (whole array) or ``<= h`` (per row).
    axis : None or -1
        ``None`` selects over the whole array, ``-1`` within each row.
    backend : optional
        A backend from :func:`sae_ref.backends.get_backend`; default, the native one.
    return_cut : bool
        Also return the cut value ``v`` (0-D, or shape (B, 1) per row).

    Returns
    -------
    mask : bool array, shape of ``x``, with exactly ``n`` True (per row if ``axis=-1``);
    and ``v`` when ``return_cut``.
    """
    from . import get_backend

    xp = array_namespace(x)
    be = backend if backend is not None else get_backend(xp)
    v = be.kth_largest(x, n, axis=axis)
    ge = x >= v
    n_ge = xp.count_nonzero(ge) if axis is None else xp.count_nonzero(ge, axis=-1, keepdims=True)
    if bool(xp.all(n_ge == n)):  # no surplus ties at the cut: the common case for float data
        mask = ge
    else:
        gt = x > v
        eq = x == v
        need = n - (xp.count_nonzero(gt) if axis is None else xp.count_nonzero(gt, axis=-1, keepdims=True))
        mask = gt | (eq & (_tie_rank(xp, eq, axis) <= need))
    return (mask, v) if return_cut else mask


def _tie_rank(xp, eq, axis):
    """1-based position of each tied entry among the ties, in index order."""
    count = xp.astype(eq, xp.int64)
    if axis is None:
        flat = xp.cumulative_sum(xp.reshape(count, (-1,)))
        return xp.reshape(flat, eq.shape)
    return xp.cumulative_sum(count, axis=-1)


#: The largest column group of the bracket (:func:`top_n_indices`).
MAX_GROUP = 64


def _group(h: int, blocks_needed: int, per_row_blocks: int) -> int:
    """The largest power of two ``g <= MAX_GROUP`` dividing ``h`` that leaves at least
    ``blocks_needed`` group maxima (eight times the selection size: a tight bracket); 1 if none."""
    g = MAX_GROUP
    while g > 1 and (h % g or per_row_blocks * (h // g) < blocks_needed):
        g //= 2
    return g


def group_size(shape, n: int, *, axis: int | None = None) -> int:
    """The column group ``g`` that :func:`top_n_indices` brackets a selection of ``n`` from an
    array of ``shape`` (B, h) with (1: no groups). A caller that has the group maxima
    ``backend.group_max(x, g)`` already (computed in the pass that wrote ``x``) passes them
    as ``maxima``."""
    B, h = shape
    return _group(h, 8 * n, 1 if axis is not None else B)


def top_n_indices(x, n: int, *, axis: int | None = None, backend=None, maxima=None):
    """Flat (row-major) indices, ascending, of the ``n`` largest entries of ``x`` under the
    lower-index tie rule, and the cut value: the same set as :func:`top_n_mask`.

    Parameters as :func:`top_n_mask`; ``maxima``, optional: ``backend.group_max(x, g)`` for
    ``g = group_size(x.shape, n, axis=axis)`` (when ``g > 1``), if the caller has them.
    Returns ``(indices, cut)``: int64 indices of shape ``[n]`` (``[B n]`` per row), and the
    cut (0-D, or ``(B, 1)`` per row). The cut is bracketed from below by column-group maxima
    (module docstring), so no pass sorts or partitions all ``B h`` entries.
    """
    from . import get_backend

    xp = array_namespace(x)
    be = backend if backend is not None else get_backend(xp)
    B, h = x.shape
    per_row = axis is not None
    g = group_size(x.shape, n, axis=axis)
    groups = None
    if g > 1:
        groups = maxima if maxima is not None else be.group_max(x, g)
        lo = be.kth_largest(groups, n, axis=axis)
    else:
        lo = be.kth_largest(x, n, axis=axis)
    flat = xp.reshape(x, (-1,))
    cand = xp.astype(be.indices_at_least(x, lo, maxima=groups), xp.int64)
    vals = take(flat, cand)
    if per_row:
        # with g = 1 the bound is each row's n-th largest value itself: no sort needed
        keep, cut = _keep_per_row(xp, be, vals, cand // h, n, B, lo if g == 1 else None)
    else:
        cut = be.kth_largest(vals, n)
        keep = _keep_ties_in_order(xp, vals, cut, n)
    return cand[keep], cut


def _keep_ties_in_order(xp, vals, cut, n):
    """Which of ``vals`` (all candidates, in index order) are kept: every value above ``cut``
    and the first ``n - count(> cut)`` equal to it."""
    gt = vals > cut
    eq = vals == cut
    need = n - xp.count_nonzero(gt)
    if bool(xp.count_nonzero(eq) == need):
        return gt | eq
    return gt | (eq & (xp.cumulative_sum(xp.astype(eq, xp.int64)) <= need))


def _keep_per_row(xp, be, vals, rows, k, B, cut=None):
    """The per-row version: candidates grouped by row (ascending, each row's in column
    order); every row has at least ``k``. ``cut``: each row's k-th largest value, shape
    (B, 1), when known. Returns (keep, cut of shape (B, 1))."""
    dev = device_of(rows)
    r = xp.arange(B, dtype=rows.dtype, device=dev)
    start = xp.searchsorted(rows, r)  # rows ascend: the first candidate of each row
    if cut is None:
        # each row's candidates side by side in a [B, m] array padded with -inf (m the most
        # candidates of a row), and its k-th largest from the backend's per-row partition
        n = vals.shape[0]
        pos = xp.arange(n, dtype=rows.dtype, device=dev) - take(start, rows)
        count = xp.concat([start[1:], xp.asarray([n], dtype=start.dtype, device=dev)]) - start
        m = int(xp.max(count))
        present = xp.arange(m, dtype=count.dtype, device=dev)[None, :] < count[:, None]
        side = be.to_dense(rows, pos, vals, (B, m))
        side = xp.where(present, side, xp.asarray(-xp.inf, dtype=vals.dtype, device=dev))
        cut = be.kth_largest(side, k, axis=-1)[:, 0]
    else:
        cut = xp.reshape(cut, (-1,))
    c = take(cut, rows)
    gt = vals > c
    eq = vals == c
    need = k - _row_counts(xp, be, gt, rows, B)
    if bool(xp.all(_row_counts(xp, be, eq, rows, B) == need)):  # no surplus ties in any row
        return gt | eq, cut[:, None]
    # rank of each tie within its row, in column order: a running count minus the row's start
    running = xp.cumulative_sum(xp.astype(eq, xp.int64))
    before = xp.concat([xp.zeros((1,), dtype=xp.int64, device=device_of(rows)), running])
    rank = running - take(take(before, start), rows)
    return gt | (eq & (rank <= take(need, rows))), cut[:, None]


def _row_counts(xp, be, flags, rows, B):
    """How many ``flags`` are True in each row, int64 [B]."""
    counts = be.segment_sum(rows, xp.astype(flags, xp.float64), B)
    return xp.astype(counts, xp.int64)



def top_n_fixed(x, n: int, *, axis: int | None = None, backend=None, with_cut: bool = True):
    """:func:`top_n_indices` without reading anything back to the host: the same indices
    (the ``n`` largest, or each row's ``n`` largest, under the lower-index tie rule,
    ascending) and the cut, computed with shapes known in advance. ``with_cut=False``: the
    cut may be None where it costs work of its own (a caller that keeps the indices alone).

    The cut ``v`` comes from the backend's ``kth_largest`` (a top-k on a GPU); then one
    mask keeps every entry ``> v`` and the first ``n - count(> v)`` entries equal to ``v``
    in index order (a running count of the ties), and the backend's ``compact`` lists the
    mask's entries, whose number is known: ``n`` (``B n`` per row). No branch on the data:
    the tie pass runs even when there is no surplus tie, which a GPU does in a few passes
    over the array and which spares the step a device-to-host copy.

    Memory: besides ``x``, three boolean [B, h] masks and an int32 running count of the
    ties (int64 past 2^31 entries), about 1.75 times ``x``'s float32 bytes at the peak. The
    CPU path (:func:`top_n_indices`) has none of these; on a GPU the memory is there and a
    host read costs more.
    """
    from . import get_backend

    xp = array_namespace(x)
    be = backend if backend is not None else get_backend(xp)
    B, h = x.shape
    g = _keyed_group(xp, be, x, n, axis)
    if g:
        return _top_n_fixed_keyed(xp, be, x, n, axis, g, with_cut)
    g = _fixed_group(h, B, n) if axis is None else 1
    if g > 1:
        return _top_n_fixed_bracketed(xp, be, x, n, g)
    return _top_n_fixed_plain(xp, be, x, n, axis)


def _keyed_group(xp, be, x, n, axis) -> int:
    """The column group of :func:`_top_n_fixed_keyed`, or 0 where it does not apply. It
    needs a backend that reinterprets float bits, values of at most 32 bits (float32,
    float16, bfloat16), positions below 2^32, and at least 4 groups (with fewer, keying the
    group maxima costs more passes than the plain form's tie pass saves)."""
    if not be.has_float_bits:
        return 0
    B, h = x.shape
    narrow = x.dtype == xp.float32 or str(x.dtype).split(".")[-1] in ("float16", "bfloat16")
    g = _fixed_group(h, 1 if axis is not None else B, n)
    return g if narrow and g >= 4 and (B * h if axis is None else h) <= 2**32 else 0


def _keys(xp, be, vals, pos):
    """Distinct int64 keys ordered as the tie rule ranks entries: by value, then the lower
    position ``pos`` first. The high 32 bits are the value's float32 bits made
    order-preserving as a signed integer (negative values' magnitude bits flipped; -0.0 made
    +0.0 first, since the two are equal values), the low 32 bits ``2^32 - 1 - pos``."""
    v = (vals if vals.dtype == xp.float32 else xp.astype(vals, xp.float32)) + 0.0  # -0.0 + 0.0 is +0.0
    bits = be.float_bits(v)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # a negative value's magnitude bits flipped
    return xp.astype(bits, xp.int64) * 2**32 + (2**32 - 1 - pos)


def _top_n_fixed_keyed(xp, be, x, n: int, axis, g: int, with_cut: bool = True):
    """:func:`top_n_fixed` by distinct keys (:func:`_keys`): with no two keys equal there are
    no ties, so a top-k of the keys is the tie rule's selection, and no pass over the ties is
    needed.

    Column groups bracket it exactly. Split the columns into ``g`` slabs (group ``j`` holds
    columns ``j, j + h/g, ...``); a group's key is its largest entry's key (the first
    maximal entry, :meth:`~StandardBackend.group_argmax`, keyed by its position). Each of the
    n largest entries lies in one of the n groups with the largest keys: a group outside
    them has n groups above it, each with an entry above every entry of that group. So the
    top n of the n g entries of those groups is the answer.

    The same argument brackets those n g entries once more: cut each chosen group into
    subgroups of ``s`` slabs (:func:`_subgroup`, four a group). A subgroup outside the chosen
    groups has a key below the n chosen groups' keys, each of which is a subgroup's key, so
    the n largest subgroups of the whole array lie among the chosen groups' ``n g / s``, and
    the answer is the top n of the ``n s`` entries of those n subgroups. Work: one pass for
    the group keys (:meth:`~StandardBackend.group_keys`), a top-k over ``B h / g`` keys
    (:func:`_top_keys`), the chosen groups' subgroup keys
    (:meth:`~StandardBackend.subgroup_keys`) and a top-k over ``n g / s``, the chosen
    subgroups' entries keyed (:meth:`~StandardBackend.subgroup_entry_keys`) and a top-k over
    ``n s`` (at g = 16: two top-k over 4n keys where one over 16n was). Per row, each step
    takes each row's top n. The kept entries' positions are read off their keys' low bits,
    and the cut is the entry with the smallest kept key.
    """
    B, h = x.shape
    dev = device_of(x)
    per_row = axis is not None
    r = _run_length(h // g if per_row else B * (h // g), n)
    if r > 1:  # the group keys, and the maxima of their runs taken in the same pass
        keys, run_max = be.group_keys(x, g, per_row=per_row, runs=r)  # [B, h/g], [B, h/(g r)]
    else:
        keys, run_max = be.group_keys(x, g, per_row=per_row), None
    flat = (lambda a: a) if per_row else (lambda a: xp.reshape(a, (-1,)))
    top = _top_keys(xp, be, flat(keys), n, None if run_max is None else flat(run_max))  # the groups' keys
    s = _subgroup(g)
    sub = be.subgroup_keys(x, top, g, s, per_row=per_row)  # [n g/s], or [B, n g/s]
    cand = be.subgroup_entry_keys(x, be.top_values(sub, n, axis=axis), g, s, per_row=per_row)  # [n s]
    kept = be.top_values(cand, n, axis=axis)  # the kept entries' keys
    if per_row:
        rows = xp.arange(B, dtype=xp.int64, device=dev)[:, None]
        pos = _position(kept)  # each row's columns
        flat_pos = xp.reshape(rows * h + xp.sort(pos, axis=-1), (-1,))
        if not with_cut:
            return flat_pos, None
        last = _position(xp.min(kept, axis=-1, keepdims=True))
        return flat_pos, take(xp.reshape(x, (-1,)), xp.reshape(rows * h + last, (-1,)))[:, None]
    if not with_cut:
        return xp.sort(_position(kept)), None
    last = _position(xp.min(kept))
    return xp.sort(_position(kept)), take(xp.reshape(x, (-1,)), xp.reshape(last, (1,)))[0]


def _subgroup(g: int) -> int:
    """The slabs of a subgroup in :func:`_top_n_fixed_keyed`'s second bracket: four subgroups
    a group (one slab each below 4 slabs)."""
    return max(1, g // 4)


#: the largest run of group keys bracketed by its maximum (:func:`_top_keys`)
MAX_KEY_RUN = 8


def _run_length(m: int, n: int) -> int:
    """The runs of :func:`_top_keys` over ``m`` keys (a row's, or all): the largest power of
    two up to :data:`MAX_KEY_RUN` dividing ``m`` with ``n r <= m / 4``."""
    r = MAX_KEY_RUN
    while r > 1 and (m % r or 4 * n * r > m):
        r //= 2
    return r


def _top_keys(xp, be, keys, n: int, run_max=None):
    """The ``n`` largest of the distinct ``keys`` (1-D, or each row's of a 2-D array), in no
    particular order, bracketed once more: each run of ``r`` consecutive keys is represented
    by its maximum, and the n largest keys lie in the n runs with the largest maxima (a key
    outside them has n run maxima above it, each a key). So a top-k over ``m / r`` maxima and
    one over ``n r`` keys replace one over all ``m`` (:func:`_run_length`). ``run_max``: the
    runs' maxima, when the caller has them."""
    m = keys.shape[-1]
    r = _run_length(m, n)
    axis = -1 if keys.ndim == 2 else None
    if r == 1:
        return be.top_values(keys, n, axis=axis)
    lead = keys.shape[:-1]
    if run_max is None:
        run_max = xp.max(xp.reshape(keys, lead + (m // r, r)), axis=-1)
    runs = be.top_indices(run_max, n, axis=axis)  # [n], or [B, n]: each row's runs
    if axis is not None:  # the runs of all rows, numbered in one array
        rows = xp.arange(keys.shape[0], dtype=runs.dtype, device=device_of(keys))[:, None]
        runs = rows * (m // r) + runs
    chosen = take(xp.reshape(keys, (-1, r)), xp.reshape(runs, (-1,)), axis=0)  # the chosen runs' keys
    return be.top_values(xp.reshape(chosen, lead + (n * r,)), n, axis=axis)


def _position(keys):
    """The position an entry's key (:func:`_keys`) was made with."""
    return (2**32 - 1) - (keys & (2**32 - 1))


def top_n_fixed_mask(x, n: int, *, axis: int | None = None, backend=None):
    """The boolean mask of :func:`top_n_fixed`'s entries (the same set), with no host read;
    where the keyed form does not apply, the mask is formed directly, without listing the
    entries and scattering them back."""
    from . import get_backend

    xp = array_namespace(x)
    be = backend if backend is not None else get_backend(xp)
    B, h = x.shape
    if _keyed_group(xp, be, x, n, axis) or (axis is None and _fixed_group(h, B, n) > 1):
        idx, _ = top_n_fixed(x, n, axis=axis, backend=be, with_cut=False)
        ones = xp.ones(idx.shape, dtype=x.dtype, device=device_of(x))
        return be.to_dense(idx // h, idx % h, ones, (B, h)) > 0
    return _plain_mask(xp, be, x, n, axis)[0]


def _top_n_fixed_plain(xp, be, x, n: int, axis):
    """:func:`top_n_fixed` without the bracket: the cut from a top-k of all entries."""
    B, h = x.shape
    keep, v = _plain_mask(xp, be, x, n, axis)
    return be.compact(keep, n if axis is None else B * n), v


def _plain_mask(xp, be, x, n: int, axis):
    """(mask of the n largest under the tie rule, the cut) from a top-k of all entries and a
    running count of the ties."""
    B, h = x.shape
    v = be.kth_largest(x, n, axis=axis)
    gt = x > v
    eq = x == v
    rank_dtype = xp.int32 if B * h < 2**31 else xp.int64
    if axis is None:
        need = n - xp.count_nonzero(gt)
        rank = xp.reshape(xp.cumulative_sum(xp.reshape(xp.astype(eq, rank_dtype), (-1,))), (B, h))
    else:
        need = n - xp.count_nonzero(gt, axis=-1, keepdims=True)
        rank = xp.cumulative_sum(xp.astype(eq, rank_dtype), axis=-1)
    return gt | (eq & (rank <= need)), v


#: The largest column group of the fixed-size bracket (:func:`_top_n_fixed_bracketed`).
MAX_FIXED_GROUP = 16


def _fixed_group(h: int, B: int, n: int) -> int:
    """The column group of the fixed-size bracket: the largest power of two
    ``g <= MAX_FIXED_GROUP`` dividing ``h`` that leaves at least ``8 n`` group maxima, or 1
    (no bracket) when the array is not much larger than the selection."""
    g = MAX_FIXED_GROUP
    while g > 1 and (h % g or B * (h // g) < 8 * n):
        g //= 2
    return g


def _top_n_fixed_bracketed(xp, be, x, n: int, g: int):
    """:func:`top_n_fixed` over the whole array, the cut bracketed by column groups (as
    :func:`top_n_indices`, with every size known in advance).

    The n groups with the largest maxima (the plain fixed-size selection on the ``[B, h/g]``
    maxima) hold ``n g`` candidates, and the cut ``v``, the n-th largest entry, is the n-th largest
    candidate: if every group holding one of the n largest entries is among them, the
    candidates contain those entries; if not, such a group's maximum equals the n-th largest
    maximum ``m``, so ``v = m`` and the n chosen groups hold n candidates ``>= m``. Every
    entry ``> v`` lies in a chosen group (its group's maximum exceeds ``m``); the ties at
    ``v`` may lie anywhere, so the first ``n - count(> v)`` of them in index order come from
    one comparison pass over ``x``. The two lists, each of size ``n`` padded past the end,
    are merged by one sort of ``2 n`` indices. Work: one pass for the maxima, a top-k over
    ``B h / g`` maxima and one over ``n g`` candidates, one comparison pass, and two
    fixed-size ``nonzero`` (against a top-k over all ``B h`` entries and a running count
    over them).
    """
    B, h = x.shape
    w = h // g
    size = B * h
    dev = device_of(x)
    q, _ = _top_n_fixed_plain(xp, be, be.group_max(x, g), n, None)  # the chosen groups, [n]
    b, j = q // w, q % w
    s = xp.arange(g, dtype=q.dtype, device=dev)
    cand = xp.reshape(b[:, None] * h + s[None, :] * w + j[:, None], (-1,))  # [n g], flat indices
    flat = xp.reshape(x, (-1,))
    vals = take(flat, cand)
    v = be.kth_largest(vals, n)
    gt = vals > v
    past = xp.full((1,), size, dtype=cand.dtype, device=dev)
    above = take(xp.concat([cand, past]), be.compact(gt, n))  # the entries > v, then size
    need = n - xp.count_nonzero(gt)
    ties = be.compact(flat == v, n)  # the first n ties in index order (padded with size)
    ties = xp.where(xp.arange(n, dtype=ties.dtype, device=dev) < need, ties, past[0])
    kept = xp.sort(xp.concat([above, ties]), stable=False)[:n]
    return kept, v
