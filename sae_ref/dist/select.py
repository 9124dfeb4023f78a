r"""Exact selections over pre-activations spread across ranks, without gathering them.

Two ways to split the encoder pre-activations :math:`z` (global shape ``[B, h]``):

- ``layout="rows"`` (data parallel): rank r holds rows ``[o_r, o_r + B_r)`` of the batch and
  every latent; ``B = sum_r B_r`` (the ``B_r`` may differ).
- ``layout="cols"`` (dictionary sharding): every rank holds all ``B`` rows and latents
  ``[c_r, c_r + h_r)``; ``h = sum_r h_r`` (the ``h_r`` may differ).

Each function returns this rank's part of the single-device result, bit for bit: the same
kept places (in local row/column indices, row-major) and the same values as
:func:`sae_ref.activations.batch_topk`, :func:`~sae_ref.activations.topk` or
:func:`~sae_ref.activations.threshold` on the concatenated array, ties included. The tie rule
(:func:`sae_ref.backends.top_n_mask`) orders equal values by global index: for BatchTopK the
global flat row-major index (``rows``: rank order, then local row-major; ``cols``: row, then
global column), for TopK the global column.

**BatchTopK: the global cut.** With ``n = k B``, the cut ``v`` is the n-th largest value of
:math:`z`. A rank holding at least ``n`` values has ``n`` of them ``>=`` its own local n-th
largest, so the all-reduced maximum of those (``-inf`` from a smaller rank) is a lower bound
``lo`` on ``v``; only the values in ``(lo, hi)`` (``hi = +inf`` at first) remain candidates,
at most about ``n`` per rank. Rounds of *pivot narrowing* then shrink them: each rank sends
``P`` evenly spaced order statistics of its sorted candidates (``P = pivots``), all ranks count
their candidates ``>=`` each of the ``R P`` pivots (one all-reduce), and the bracket
``(lo, hi)`` closes onto the two neighbouring pivots around the n-th place, leaving each rank
fewer than ``ceil(m_r / P)`` of its ``m_r`` candidates. If fewer than ``n`` values lie above
``lo`` the cut is ``lo``; once at most ``P R`` candidates remain they are gathered and the cut
read off directly. Values are only compared and moved, never computed, so ``v`` is exact and the
same on every rank.

Then every rank keeps ``z >= v`` if that gives ``n`` entries over all ranks (one all-reduce of
a count; the usual case for float data). Otherwise it keeps ``z > v`` and the first of the ties
``z == v`` in global order: per-row tie counts (``cols``: summed over ranks) locate the row
where the places run out, and within that row one small all-gather says how many ties the ranks
before this one hold. If ``v <= 0`` (fewer than ``n`` positive values) every positive entry is
kept, as on one device.

**Bytes** per call (the rule of :mod:`sae_ref.dist.comm`; ``s`` bytes per value, ``R`` ranks,
``P`` pivots): the argument check ``64 (R - 1)``; the bound ``s``; the candidate count, once
per round and once more, 8; each round ``(R - 1) P s`` (pivots) ``+ 8 R P`` (counts); the
final gather ``(R - 1)(8 + s m_max)`` with ``m_max <= P R``; the count at the cut 8. With
surplus ties: 8 more, and ``8 (R - 1)`` (``rows``) or ``8 B + 8 (R - 1)`` (``cols``). For
d=768, h=16384, k=32, B=4096 in float32 on 2 ranks this measured 10,352 bytes (``rows``, two
rounds) and 5,964 bytes (``cols``, one round) per rank, against 134,217,728 for gathering the
other rank's pre-activations (``benchmarks/bench_dist.py``).

**TopK across column shards** gathers each rank's local top ``min(k, h_r)`` values of every row
(``(R - 1) B k s`` bytes, padded with ``-inf`` where ``h_r < k``), takes the k-th largest of
each merged row as the row's cut, and counts from the same lists how many ties the ranks before
this one hold: exact even where a rank's list cuts its ties short, because then no tie after
that rank is kept anyway.

**Host reads** (control flow that needs a number on the host; each is a device sync under
NCCL): the argument check (sizes and flags, plus the NaN/inf check unless
:func:`sae_ref.no_checks` is on); BatchTopK: the candidate count of each round, the lengths of
the final gather, ``v > 0``, the count at the cut (and with surplus ties the count above it);
TopK: whether this rank keeps all its ties, and whether every row's cut is positive.
Everything else stays on the device.

>>> import numpy as np
>>> from sae_ref.dist import LocalComm, batch_topk_sharded
>>> z = np.array([[3., -1., 2.], [0.5, 4., 1.]])
>>> batch_topk_sharded(z, 1, LocalComm(), layout="rows").to_dense().tolist()
[[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]]
"""

from __future__ import annotations

from dataclasses import dataclass

from array_api_compat import device as device_of

from sae_ref import _checks as C
from sae_ref import activations as A
from sae_ref.arrays import to_numpy
from sae_ref.backends import get_backend, take, top_n_mask
from sae_ref.dist.comm import Comm
from sae_ref.sparse import SparseCode

LAYOUTS = ("rows", "cols")
PIVOTS = 256
_DTYPES = ("float16", "bfloat16", "float32", "float64")


# --- what the ranks agree on ------------------------------------------------------------------
@dataclass(frozen=True)
class Shards:
    """The global shape and this rank's place in it, as agreed by every rank.

    Attributes
    ----------
    B, h : int
        Global rows and latents.
    row0, col0 : int
        This rank's first global row (``rows`` layout, else 0) and first global latent
        (``cols`` layout, else 0).
    sizes : tuple of (B_r, h_r)
        Every rank's local shape, in rank order.
    """

    B: int
    h: int
    row0: int
    col0: int
    sizes: tuple


def agree(op: str, comm: Comm, pre_local, *, k=None, layout: str = "rows", pivots=None):
    """Check the arguments on every rank at once (one small all-gather) and agree on sizes.

    Each rank checks its own arguments, then all ranks exchange ``[ok, finite, B_r, h_r, k,
    layout, dtype, pivots]`` (8 int64). Every rank then raises if any rank's arguments are
    wrong or disagree (the rank at fault raises its own message, the others name it), so no
    rank is left waiting in a later collective. ``k`` and ``pivots`` are checked only if given.

    Returns
    -------
    xp, Shards
    """
    if not isinstance(comm, Comm):
        raise TypeError(f"{op}: argument 'comm' must be a sae_ref.dist Comm (LocalComm or TorchComm), "
                        f"got {type(comm).__name__}")
    xp, error, meta = _local_meta(op, pre_local, k, layout, pivots)
    table = comm.gather_ints(meta)
    if error is not None:
        raise error
    bad = [r for r, row in enumerate(table) if row[0] == 0]
    if bad:
        raise ValueError(f"{op}: the arguments of rank(s) {bad} were rejected there (see that rank's error)")
    _check_table(op, table, k, layout)
    return xp, _shards(table, comm.rank, layout)


def _local_meta(op, pre_local, k, layout, pivots):
    """This rank's checks: (xp or None, the error or None, the row it sends)."""
    xp, finite = None, 1
    try:
        C.choice(op, "layout", layout, LAYOUTS)
        if k is not None:
            C.integer_in(op, "k", k, 1, 2**62)
        if pivots is not None:
            C.integer_in(op, "pivots", pivots, 2, 2**30)
        xp = C.namespace(op, pre_local=pre_local)
        C.floating(op, xp, "pre_local", pre_local, ndim=2)
        if pre_local.shape[0] == 0 or pre_local.shape[1] == 0:
            raise ValueError(f"{op}: argument 'pre_local' must have at least one row and one latent on "
                             f"every rank, got shape {tuple(pre_local.shape)}")
        try:
            C.finite(op, xp, "pre_local", pre_local)
        except ValueError:
            finite = 0
    except (TypeError, ValueError) as e:
        return xp, e, [0, 1, 0, 0, 0, 0, 0, 0]
    dtype = str(pre_local.dtype).split(".")[-1]
    code = _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)
    B_r, h_r = (int(s) for s in pre_local.shape)
    k, pivots = (-1 if a is None else int(a) for a in (k, pivots))
    return xp, None, [1, finite, B_r, h_r, k, LAYOUTS.index(layout), code, pivots]


def _check_table(op, table, k, layout):
    nonfinite = [r for r, row in enumerate(table) if row[1] == 0]
    if nonfinite:
        raise ValueError(f"{op}: argument 'pre_local' contains NaN or infinity on rank(s) {nonfinite}")
    names = {4: "argument 'k'", 5: "argument 'layout'", 6: "the dtype of argument 'pre_local'",
             7: "argument 'pivots'"}
    for col, name in names.items():
        values = [row[col] for row in table]
        if len(set(values)) > 1:
            shown = [LAYOUTS[v] for v in values] if col == 5 else values
            shown = [(_DTYPES + ("other",))[v] for v in values] if col == 6 else shown
            raise ValueError(f"{op}: {name} must be the same on every rank, got {shown} by rank")
    B_rs, h_rs = [row[2] for row in table], [row[3] for row in table]
    same, what = (h_rs, "latents h") if layout == "rows" else (B_rs, "rows B")
    if len(set(same)) > 1:
        raise ValueError(f"{op}: argument 'pre_local' must have the same number of {what} on every rank "
                         f"for layout {layout!r}, got shapes {list(zip(B_rs, h_rs))} by rank")
    h = h_rs[0] if layout == "rows" else sum(h_rs)
    if k is not None and not 1 <= k <= h:
        raise ValueError(f"{op}: argument 'k' must be in [1, {h}] (the global number of latents h), got {k}")


def _shards(table, rank, layout):
    B_rs, h_rs = [row[2] for row in table], [row[3] for row in table]
    if layout == "rows":
        return Shards(sum(B_rs), h_rs[0], sum(B_rs[:rank]), 0, tuple(zip(B_rs, h_rs)))
    return Shards(B_rs[0], sum(h_rs), 0, sum(h_rs[:rank]), tuple(zip(B_rs, h_rs)))


# --- BatchTopK --------------------------------------------------------------------------------
def batch_topk_sharded(pre_local, k: int, comm: Comm, *, layout: str, return_cut: bool = False,
                       pivots: int = PIVOTS):
    r"""BatchTopK over pre-activations split across ranks: this rank's part of the selection.

    Equal, bit for bit and ties included, to the entries of
    :func:`sae_ref.activations.batch_topk` (``n = k B`` largest of the whole batch, positive
    only) on the concatenated ``[B, h]`` array that fall in this rank's block. The algorithm and
    its bytes are in the module docstring.

    Parameters
    ----------
    pre_local : array, shape [B_r, h] (``rows``) or [B, h_r] (``cols``)
        This rank's pre-activations (torch tensors on ``comm.device`` for a
        :class:`~sae_ref.dist.TorchComm`).
    k : int, ``1 <= k <= h`` (global latents)
    comm : Comm
    layout : "rows" or "cols"
    return_cut : bool
        Also return the global cut ``v``, the n-th largest of the whole batch (0-D array, the
        same on every rank; as ``top_n_mask(..., return_cut=True)`` gives on one device).
    pivots : int, ``>= 2``
        Order statistics each rank proposes per narrowing round (more: fewer rounds, more
        bytes per round).

    Returns
    -------
    SparseCode of shape ``pre_local.shape`` (local row/column indices), and ``v`` if asked.
    """
    op = "batch_topk_sharded"
    xp, shards = agree(op, comm, pre_local, k=k, layout=layout, pivots=pivots)
    n = k * shards.B
    v = global_nth_largest(xp, pre_local, n, comm, pivots=pivots)
    mask = _keep_top_n(xp, pre_local, v, n, comm, layout)
    code = SparseCode.from_mask(pre_local, mask)
    return (code, xp.reshape(v, ())) if return_cut else code


def global_nth_largest(xp, z, n: int, comm: Comm, *, pivots: int = PIVOTS):
    """The n-th largest value of the union of every rank's ``z`` (shape (1,), same on every rank).

    ``n`` must be at most the total number of values. See the module docstring.
    """
    be = get_backend(xp)
    flat = xp.reshape(z, (-1,))
    inf = _full(xp, z, 1, float("inf"))
    bound = xp.reshape(be.kth_largest(flat, n), (1,)) if flat.shape[0] >= n else -inf
    lo, hi = comm.all_reduce_max(bound), inf
    above = xp.zeros((1,), dtype=xp.int64, device=device_of(z))  # count of values >= hi
    cand = _take(xp, flat, flat > lo)
    while True:
        count = comm.all_reduce_sum(xp.asarray([cand.shape[0]], dtype=xp.int64, device=device_of(z)))
        G, n_above = (int(c) for c in to_numpy(xp.concat([count, above])))  # host read
        if n_above + G < n:  # fewer than n values above lo: the cut is lo itself
            return lo
        if G <= pivots * comm.size:
            gathered = xp.concat(comm.all_gather_varlen(cand))
            return xp.reshape(be.kth_largest(gathered, n - n_above), (1,))
        s = xp.sort(cand, stable=False)
        lo, hi, above = _narrow(xp, s, n, comm, pivots, lo, hi, above)
        cand = _take(xp, s, (s > lo) & (s < hi))


def _narrow(xp, s, n, comm, pivots, lo, hi, above):
    """One round: close ``(lo, hi)`` onto the pivots around the n-th place.

    ``s`` holds this rank's candidates, sorted ascending. Each rank proposes its order
    statistics at positions ``0, c, 2c, ...`` (``c = ceil(m / P)``), so fewer than ``c`` of its
    candidates lie strictly between two of its own pivots, or above its last.
    """
    m = int(s.shape[0])
    if m == 0:
        mine = xp.broadcast_to(lo, (pivots,))
    else:
        step = -(-m // pivots)
        at = xp.clip(xp.arange(pivots, dtype=xp.int64, device=device_of(s)) * step, max=m - 1)
        mine = take(s, at)
    p = xp.reshape(comm.all_gather(mine), (-1,))
    ge = m - xp.astype(xp.searchsorted(s, p, side="left"), xp.int64)  # local count of s >= p
    total = above + comm.all_reduce_sum(ge)  # global count of z >= p (every p lies in (lo, hi))
    ok = total >= n  # v >= p
    inf = _full(xp, p, 1, float("inf"))
    new_lo = xp.maximum(lo, xp.max(xp.where(ok, p, -inf), keepdims=True))
    new_hi = xp.minimum(hi, xp.min(xp.where(ok, inf, p), keepdims=True))
    zero = xp.zeros_like(total)
    new_above = xp.maximum(above, xp.max(xp.where(ok, zero, total), keepdims=True))
    return new_lo, new_hi, new_above


def _keep_top_n(xp, z, v, n, comm, layout):
    """``z > v`` plus the first ties at ``v`` in global order, ``n`` in all; positives only."""
    if not bool(to_numpy(v)[0] > 0):  # host read; fewer than n positive values overall
        return z > 0
    ge = z >= v
    n_ge = int(to_numpy(comm.all_reduce_sum(xp.reshape(_count(xp, ge), (1,))))[0])  # host read
    if n_ge == n:  # no surplus ties at the cut: the usual case for float data
        return ge
    gt, eq = z > v, z == v
    n_gt = int(to_numpy(comm.all_reduce_sum(xp.reshape(_count(xp, gt), (1,))))[0])  # host read
    return gt | _allot_ties(xp, eq, n - n_gt, comm, layout)


def _allot_ties(xp, eq, need: int, comm, layout):
    """The first ``need`` entries of ``eq`` over all ranks in global order, this rank's part."""
    dev = device_of(eq)
    e = xp.astype(xp.count_nonzero(eq, axis=1), xp.int64)  # ties per local row
    need = xp.asarray([need], dtype=xp.int64, device=dev)
    if layout == "rows":  # order: rank, then local row-major
        before = _before_me(xp, comm, xp.sum(e, keepdims=True))
        q = xp.clip(need - before, min=0)
        cum = xp.cumulative_sum(e)
        row = _first_reaching(xp, cum, q)
        return _ties_through(xp, eq, row, q - _before_row(xp, cum, row))
    # cols: order row, then global column; count every rank's ties per row
    cum = xp.cumulative_sum(comm.all_reduce_sum(e))
    row = _first_reaching(xp, cum, need)
    quota = need - _before_row(xp, cum, row)
    before = _before_me(xp, comm, take(e, row))
    return _ties_through(xp, eq, row, xp.clip(quota - before, min=0))


def _before_row(xp, cum, row):
    """``cum[row - 1]`` (0 for row 0): ties in the rows before ``row``."""
    prev = take(cum, xp.clip(row - 1, min=0))
    return xp.where(row > 0, prev, xp.zeros_like(prev))


def _first_reaching(xp, cum, q):
    """The first row whose cumulative tie count reaches ``q`` (shape (1,)), clipped to the last."""
    return xp.clip(xp.astype(xp.searchsorted(cum, q, side="left"), xp.int64), max=cum.shape[0] - 1)


def _before_me(xp, comm, x):
    """The sum of ``x`` (shape (1,)) over the ranks before this one."""
    every = comm.all_gather(x)  # [R, 1]
    return xp.sum(every[: comm.rank, :], axis=0)


def _ties_through(xp, eq, row, q_row):
    """Every tie in rows before ``row`` and the first ``q_row`` ties of row ``row``."""
    rows = xp.arange(eq.shape[0], dtype=xp.int64, device=device_of(eq))[:, None]
    in_row = xp.cumulative_sum(xp.astype(take(eq, row, axis=0), xp.int64), axis=1) <= q_row
    return eq & ((rows < row) | ((rows == row) & in_row))


# --- TopK -------------------------------------------------------------------------------------
def topk_sharded(pre_local, k: int, comm: Comm, *, layout: str = "cols", return_cut: bool = False):
    r"""Per-row TopK over pre-activations split across ranks: this rank's part of the selection.

    Equal, bit for bit and ties included (lower global column wins), to the entries of
    :func:`sae_ref.activations.topk` on the concatenated array that fall in this rank's block:
    each row keeps its ``k`` largest positive values.

    ``layout="cols"``: one all-gather of every rank's local top ``min(k, h_r)`` values per row
    (``(R - 1) B k s`` bytes), see the module docstring. ``layout="rows"``: each row lives on
    one rank, so the selection is local (only the argument check communicates).

    Parameters
    ----------
    pre_local : array, shape [B, h_r] (``cols``) or [B_r, h] (``rows``)
    k : int, ``1 <= k <= h`` (global latents)
    comm : Comm
    layout : "cols" (default) or "rows"
    return_cut : bool
        Also return each row's cut, the k-th largest of the whole row (shape [B_local, 1]).

    Returns
    -------
    SparseCode of shape ``pre_local.shape``, and the cuts if asked.
    """
    xp, _ = agree("topk_sharded", comm, pre_local, k=k, layout=layout)
    if layout == "rows":
        mask, v = top_n_mask(pre_local, k, axis=-1, return_cut=True)
    else:
        mask, v = _topk_cols(xp, pre_local, k, comm)
    if not bool(xp.all(v > 0)):  # host read; a row with fewer than k positives keeps those
        mask = mask & (pre_local > 0)
    code = SparseCode.from_mask(pre_local, mask)
    return (code, v) if return_cut else code


def _topk_cols(xp, z, k, comm):
    B, h_r = z.shape
    be = get_backend(xp)
    k_r = min(k, h_r)
    mine = xp.reshape(SparseCode.from_mask(z, top_n_mask(z, k_r, axis=-1)).values, (B, k_r))
    if k_r < k:  # pad to k per row so every rank sends one shape; -inf never equals a cut
        mine = xp.concat([mine, _full(xp, z, (B, k - k_r), float("-inf"))], axis=1)
    lists = comm.all_gather(mine)  # [R, B, k]
    merged = xp.reshape(xp.permute_dims(lists, (1, 0, 2)), (B, comm.size * k))
    v = be.kth_largest(merged, k, axis=-1)  # [B, 1]
    # every value > v of a rank is in its list (fewer than k of them); ties may be cut short,
    # but only on a rank whose list is full, and then no tie after it is kept anyway
    n_gt = xp.sum(xp.astype(xp.count_nonzero(lists > v, axis=2), xp.int64), axis=0)
    eq_lists = xp.astype(xp.count_nonzero(lists == v, axis=2), xp.int64)  # [R, B]
    before = xp.sum(eq_lists[: comm.rank, :], axis=0)
    q = xp.clip(k - n_gt - before, min=0)  # ties this rank may keep in each row
    e = eq_lists[comm.rank, :]  # this rank's ties per row, if none lie outside its list
    ge = z >= v
    n_ge = xp.reshape(_count(xp, ge), (1,))
    n_ge_lists = xp.reshape(_count(xp, lists[comm.rank, ...] >= v), (1,))
    n_all, n_in, all_full = (int(c) for c in to_numpy(xp.concat([  # host read
        n_ge, n_ge_lists, xp.reshape(xp.astype(xp.all(q >= e), xp.int64), (1,))])))
    if n_all == n_in and all_full:  # every tie of this rank is kept: the usual case
        return ge, v
    gt, eq = z > v, z == v
    return gt | (eq & (xp.cumulative_sum(xp.astype(eq, xp.int64), axis=1) <= q[:, None])), v


# --- threshold and decode ---------------------------------------------------------------------
def threshold_sharded(pre_local, theta, comm: Comm):
    r"""Threshold inference on this rank's block: :math:`z > \theta` and :math:`z > 0`.

    No communication: the decision is elementwise, so every rank decides its own entries and
    the result is the single-device :func:`sae_ref.activations.threshold` restricted to the
    block. ``theta`` is one number, or per latent this rank's slice (shape [h_r] in the
    ``cols`` layout, [h] in the ``rows`` layout). ``comm`` is taken for a uniform signature.
    """
    if not isinstance(comm, Comm):
        raise TypeError(f"threshold_sharded: argument 'comm' must be a sae_ref.dist Comm, got {type(comm).__name__}")
    return A.threshold(pre_local, theta)


def decode_sharded(params_local, code_local, comm: Comm):
    r"""Decoding with the dictionary split by latents: :math:`\hat x = \sum_r f_r W_{dec,r} + b_{dec}`.

    For the ``cols`` layout: rank r holds the decoder rows (atoms) of its latents,
    ``params_local.W_dec`` of shape [h_r, d], and the code of those latents (shape [B, h_r]);
    ``b_dec`` is replicated. One all-reduce of ``B d s`` bytes, plus the argument check.
    Equal to :func:`sae_ref.sae.decode` on the whole dictionary up to the order of the
    floating-point sum. (In the ``rows`` layout each rank decodes its rows alone with
    :func:`sae_ref.sae.decode`.)

    Returns
    -------
    x_hat : array, shape [B, d], the same on every rank.
    """
    from sae_ref.sae import _check_params

    op = "decode_sharded"
    if not isinstance(comm, Comm):
        raise TypeError(f"{op}: argument 'comm' must be a sae_ref.dist Comm, got {type(comm).__name__}")
    xp = _check_params(op, params_local)
    if not isinstance(code_local, SparseCode):
        raise TypeError(f"{op}: argument 'code_local' must be a SparseCode, got {type(code_local).__name__}")
    if code_local.shape[1] != params_local.h:
        raise ValueError(f"{op}: argument 'code_local' has {code_local.shape[1]} latents, "
                         f"params_local have h_r = {params_local.h}")
    C.namespace(op, values=code_local.values, W_dec=params_local.W_dec)
    B = code_local.shape[0]
    table = comm.gather_ints([B, params_local.d])
    if len(set(table)) > 1:
        raise ValueError(f"{op}: the code's rows B and the model width d must be the same on every rank, "
                         f"got (B, d) = {table} by rank")
    part = get_backend(xp).spmm(code_local.rows, code_local.cols, code_local.values, params_local.W_dec, B)
    return comm.all_reduce_sum(part) + params_local.b_dec


# --- small helpers ----------------------------------------------------------------------------
def _full(xp, like, shape, value):
    shape = (shape,) if isinstance(shape, int) else shape
    return xp.full(shape, value, dtype=like.dtype, device=device_of(like))


def _count(xp, mask):
    return xp.astype(xp.count_nonzero(mask), xp.int64)


def _take(xp, a, mask):
    """The entries of 1-D ``a`` where ``mask`` holds, in order."""
    (at,) = xp.nonzero(mask)
    return take(a, at)
