r"""Removing the lowest activations of a trained SAE (L. Riggs Smith 2024).

Four ways to zero the weakest entries of the feature matrix :math:`f` (shape [B, h]), each
with one parameter whose value 0 changes nothing:

====================  ===================================================================
method                keeps :math:`f_{ij}` when
====================  ===================================================================
``lowest_k``          it is not among the ``k`` smallest positive entries of row ``i``
``percent_of_max``    :math:`f_{ij} \ge p \, M_j` (:math:`M_j` the reference max of latent j)
``latent_quantile``   :math:`f_{ij} > \tau_j(q)` (the reference q-quantile of latent j)
``global_threshold``  :math:`f_{ij} \ge t`
====================  ===================================================================

Each acts on a :class:`~sae_ref.sparse.SparseCode` and returns a code holding a subset of its
entries, unchanged and in their original order, so no row's L0 can grow. The per-latent
statistics (:math:`M_j`, :math:`\tau_j`) are computed once from reference codes by
:func:`reference_stats` and then frozen: with them, ``percent_of_max`` and
``global_threshold`` are idempotent. :func:`sweep` evaluates one method over a list of
parameter values on evaluation batches: mean L0, MSE, NMSE, FVU and an optional downstream loss.

Activations of an SAE are non-negative; every function here refuses a code with a negative
or non-finite value. Work is O(nnz log nnz) (sorts of the code's entries); nothing of shape
[B, h] is built.

>>> import numpy as np
>>> from sae_ref.sparse import SparseCode
>>> from sae_ref.pruning import lowest_k, global_threshold
>>> f = np.array([[0.5, 0.0, 2.0, 1.0], [0.0, 3.0, 0.0, 0.2]])
>>> code = SparseCode.from_mask(f, f > 0)
>>> lowest_k(code, 1).to_dense().tolist()
[[0.0, 0.0, 2.0, 1.0], [0.0, 3.0, 0.0, 0.0]]
>>> global_threshold(code, 1.0).to_dense().tolist()
[[0.0, 0.0, 2.0, 1.0], [0.0, 3.0, 0.0, 0.0]]
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace, device as device_of

from sae_ref import _checks as C
from sae_ref.sae import SAEConfig, SAEParams, decode, forward, unstandardize
from sae_ref.sparse import SparseCode

METHODS = ("lowest_k", "percent_of_max", "latent_quantile", "global_threshold")


# --- checks and the common subset step ------------------------------------------------------
def _check_code(op: str, code) -> Any:
    if not isinstance(code, SparseCode):
        raise TypeError(f"{op}: argument 'code' must be a SparseCode, got {type(code).__name__}")
    xp = C.namespace(op, values=code.values, rows=code.rows, cols=code.cols)
    C.floating(op, xp, "code.values", code.values, ndim=1)
    C.finite(op, xp, "code.values", code.values)
    if code.nnz and not bool(xp.all(code.values >= 0)):
        raise ValueError(f"{op}: argument 'code' has negative values; pruning acts on "
                         f"activations, which are non-negative")
    return xp


def _subset(xp, code: SparseCode, keep) -> SparseCode:
    """The entries of ``code`` where ``keep`` is True, in their order."""
    (idx,) = xp.nonzero(keep)
    return SparseCode(xp.take(code.rows, idx), xp.take(code.cols, idx),
                      xp.take(code.values, idx), code.shape)


def _number(op: str, name: str, value, low: float, high: float = math.inf) -> float:
    v = C.finite_number(op, name, value)
    if not low <= v <= high:
        hi = "" if high == math.inf else f", {high}"
        raise ValueError(f"{op}: argument '{name}' must be in [{low}{hi}{']' if hi else ', inf)'}, got {v}")
    return v


# --- lowest-k per sample ----------------------------------------------------------------------
def lowest_k(code: SparseCode, k: int) -> SparseCode:
    r"""Drop each row's ``k`` smallest positive entries.

    .. math:: f'_{ij} = f_{ij}\, \mathbb 1\big[\mathrm{rank}_i(j) > k\big],

    with :math:`\mathrm{rank}_i(j)` the 1-based position of :math:`f_{ij}` among row i's
    positive entries in ascending order. Row i loses exactly :math:`\min(k, L0_i)` entries.

    **Ties.** The project's selections keep the lower column among equal values when picking
    the largest; removing the smallest is its mirror image: among equal values the higher
    column goes first. So ``lowest_k(code, k)`` keeps exactly the entries a top-(L0 - k)
    selection of the row would keep, identically on every backend.

    Parameters
    ----------
    code : SparseCode, non-negative values; entries in any order, places unique
    k : int >= 0 (0 returns ``code`` itself)

    >>> import numpy as np
    >>> from sae_ref.sparse import SparseCode
    >>> f = np.array([[1.0, 1.0, 1.0, 4.0]])
    >>> lowest_k(SparseCode.from_mask(f, f > 0), 2).to_dense().tolist()   # ties: higher column first
    [[1.0, 0.0, 0.0, 4.0]]
    """
    xp = _check_code("lowest_k", code)
    k = C.integer_in("lowest_k", "k", k, 0, 2**62)
    if k == 0 or code.nnz == 0:
        return code
    h = code.shape[1]
    dev = device_of(code.values)
    inf = xp.asarray(math.inf, dtype=code.values.dtype, device=dev)
    key = xp.where(code.values > 0, code.values, inf)  # zeros rank after every positive entry
    # order by (row, value ascending, column descending): stable sorts, least significant first
    perm = xp.argsort(code.rows * h + (h - 1 - code.cols), stable=False)  # unique keys
    perm = xp.take(perm, xp.argsort(xp.take(key, perm), stable=True))
    perm = xp.take(perm, xp.argsort(xp.take(code.rows, perm), stable=True))
    rows_sorted = xp.take(code.rows, perm)
    first = xp.searchsorted(rows_sorted, rows_sorted, side="left")
    rank = xp.arange(code.nnz, dtype=first.dtype, device=dev) - first  # 0-based within the row
    drop_sorted = (rank < k) & (xp.take(code.values, perm) > 0)
    drop = xp.take(drop_sorted, xp.argsort(perm, stable=False))  # back to the code's order
    return _subset(xp, code, ~drop)


# --- frozen reference statistics --------------------------------------------------------------
@dataclass(frozen=True)
class PruningStats:
    """Per-latent statistics of reference codes, computed once by :func:`reference_stats`.

    Attributes
    ----------
    latent_max : float array [h]
        :math:`M_j`, the largest reference value of latent j (0 if it never fired).
    counts : int64 array [h]
        :math:`m_j`, how many positive reference values latent j has.
    starts : int64 array [h] or None
        Where latent j's values begin in ``sorted_values``.
    sorted_values : float array [sum m_j] or None
        Every positive reference value, grouped by latent (ascending j), ascending within a
        latent; None when computed with ``keep_values=False`` (no quantiles then).
    n_rows : int
        Reference samples seen.
    """

    latent_max: Any
    counts: Any
    starts: Any
    sorted_values: Any
    n_rows: int

    @property
    def h(self) -> int:
        return int(self.latent_max.shape[0])


def _grouped(xp, cols, values, h: int):
    """``values`` sorted by (latent, value), with each latent's start and count."""
    order = xp.argsort(values, stable=False)
    order = xp.take(order, xp.argsort(xp.take(cols, order), stable=True))
    cols_sorted = xp.take(cols, order)
    lat = xp.arange(h, dtype=cols.dtype, device=device_of(cols))
    starts = xp.searchsorted(cols_sorted, lat, side="left")
    ends = xp.searchsorted(cols_sorted, lat, side="right")
    return xp.take(values, order), starts, ends - starts


def _group_max(xp, sorted_values, starts, counts):
    if sorted_values.shape[0] == 0:
        return xp.zeros(starts.shape, dtype=sorted_values.dtype, device=device_of(sorted_values))
    last = xp.clip(starts + counts - 1, min=0)
    zero = xp.zeros((), dtype=sorted_values.dtype, device=device_of(sorted_values))
    return xp.where(counts > 0, xp.take(sorted_values, last), zero)


def reference_stats(codes, *, keep_values: bool = True) -> PruningStats:
    r"""Freeze the per-latent statistics of reference codes (one or an iterable of batches).

    .. math:: M_j = \max_i f_{ij}, \qquad m_j = \#\{i : f_{ij} > 0\},

    and, with ``keep_values=True``, every positive value grouped by latent and sorted (two
    sorts: by value, then stably by latent), from which :func:`latent_quantile` reads its
    thresholds. The max streams over batches in O(h) memory; the values need O(nnz) memory,
    so pass ``keep_values=False`` when only ``percent_of_max`` is wanted.

    >>> import numpy as np
    >>> from sae_ref.sparse import SparseCode
    >>> f = np.array([[1.0, 0.0], [3.0, 2.0], [2.0, 0.0]])
    >>> s = reference_stats(SparseCode.from_mask(f, f > 0))
    >>> s.latent_max.tolist(), s.counts.tolist(), s.sorted_values.tolist()
    ([3.0, 2.0], [3, 1], [1.0, 2.0, 3.0, 2.0])
    """
    op = "reference_stats"
    batches = [codes] if isinstance(codes, SparseCode) else list(codes)
    if not batches:
        raise ValueError(f"{op}: argument 'codes' holds no code")
    h = batches[0].shape[1] if isinstance(batches[0], SparseCode) else None
    xp = None
    cols, vals, running, n_rows = [], [], None, 0
    for i, c in enumerate(batches):
        xp_i = _check_code(op, c)
        if xp is None:
            xp = xp_i
        else:
            C.namespace(op, first=batches[0].values, **{f"codes[{i}]": c.values})
            C.same_dtype(op, first=batches[0].values, **{f"codes[{i}]": c.values})
        if c.shape[1] != h:
            raise ValueError(f"{op}: argument 'codes' mixes h = {h} and h = {c.shape[1]} (batch {i})")
        pos = xp.nonzero(c.values > 0)[0]
        cj, vj = xp.take(c.cols, pos), xp.take(c.values, pos)
        n_rows += c.shape[0]
        if keep_values:
            cols.append(cj)
            vals.append(vj)
        else:
            s, st, ct = _grouped(xp, cj, vj, h)
            m = _group_max(xp, s, st, ct)
            cnt = ct
            running = (m, cnt) if running is None else (xp.maximum(running[0], m), running[1] + cnt)
    if not keep_values:
        return PruningStats(running[0], running[1], None, None, n_rows)
    s, starts, counts = _grouped(xp, xp.concat(cols), xp.concat(vals), h)
    return PruningStats(_group_max(xp, s, starts, counts), counts, starts, s, n_rows)


def _check_stats(op: str, code: SparseCode, stats, need_values: bool = False):
    if not isinstance(stats, PruningStats):
        raise TypeError(f"{op}: argument 'stats' must be PruningStats (from reference_stats), "
                        f"got {type(stats).__name__}")
    C.namespace(op, code=code.values, stats=stats.latent_max)
    C.same_dtype(op, code=code.values, stats=stats.latent_max)
    if stats.h != code.shape[1]:
        raise ValueError(f"{op}: argument 'stats' is for h = {stats.h} latents, the code has "
                         f"h = {code.shape[1]}")
    if need_values and stats.sorted_values is None:
        raise ValueError(f"{op}: argument 'stats' was computed with keep_values=False and holds no "
                         f"quantiles; call reference_stats(codes) with keep_values=True")


# --- percent of each latent's max ---------------------------------------------------------------
def percent_of_max(code: SparseCode, p: float, stats: PruningStats) -> SparseCode:
    r"""Zero every activation below the fraction ``p`` of its latent's reference max.

    .. math:: f'_{ij} = f_{ij}\, \mathbb 1[f_{ij} \ge p\, M_j]

    ``p`` is a fraction (0.1 is "10 % of max"), ``p >= 0``; ``p = 0`` keeps every entry. A
    latent that never fired on the reference data has :math:`M_j = 0` and keeps all its
    activations. With frozen ``stats`` the map is idempotent.

    >>> import numpy as np
    >>> from sae_ref.sparse import SparseCode
    >>> f = np.array([[1.0, 0.5], [4.0, 1.0]])
    >>> code = SparseCode.from_mask(f, f > 0)
    >>> percent_of_max(code, 0.5, reference_stats(code)).to_dense().tolist()
    [[0.0, 0.5], [4.0, 1.0]]
    """
    op = "percent_of_max"
    xp = _check_code(op, code)
    p = _number(op, "p", p, 0.0)
    _check_stats(op, code, stats)
    cut = xp.take(stats.latent_max, code.cols) * p
    return _subset(xp, code, code.values >= cut)


# --- per-latent quantile ------------------------------------------------------------------------
def _count_below(xp, counts, q: float):
    r""":math:`\lfloor q\, m_j \rfloor`, products within 1e-9 (relative) of an integer taken as it."""
    m = xp.astype(counts, xp.float64)
    t = m * q
    r = xp.round(t)
    near = xp.abs(t - r) <= 1e-9 * xp.maximum(t, xp.ones_like(t))
    return xp.astype(xp.where(near, r, xp.floor(t)), counts.dtype)


def quantile_thresholds(stats: PruningStats, q: float):
    r"""The per-latent thresholds :math:`\tau_j(q)` of :func:`latent_quantile` (shape [h]).

    With latent j's positive reference values sorted, :math:`v_{j,1} \le \dots \le v_{j,m_j}`,
    and :math:`n_j = \lfloor q\, m_j \rfloor` (a product within :math:`10^{-9}` relative of an
    integer counts as that integer, so ``q = 0.29`` of 100 values is 29, not 28):

    .. math:: \tau_j(q) = v_{j, n_j} \text{ if } n_j \ge 1, \quad -\infty \text{ otherwise}.

    ``0 <= q <= 1``.
    """
    op = "quantile_thresholds"
    if not isinstance(stats, PruningStats):
        raise TypeError(f"{op}: argument 'stats' must be PruningStats, got {type(stats).__name__}")
    if stats.sorted_values is None:
        raise ValueError(f"{op}: argument 'stats' was computed with keep_values=False and holds no quantiles")
    q = _number(op, "q", q, 0.0, 1.0)
    xp = array_namespace(stats.latent_max)
    s = stats.sorted_values
    n = _count_below(xp, stats.counts, q)
    ninf = xp.full(stats.latent_max.shape, -math.inf, dtype=s.dtype, device=device_of(s))
    if s.shape[0] == 0:
        return ninf
    at = xp.take(s, xp.clip(stats.starts + n - 1, min=0, max=s.shape[0] - 1))
    return xp.where(n >= 1, at, ninf)


def latent_quantile(code: SparseCode, q: float, stats: PruningStats) -> SparseCode:
    r"""Zero the lowest fraction ``q`` of each latent's activations, as the reference saw them.

    .. math:: f'_{ij} = f_{ij}\, \mathbb 1[f_{ij} > \tau_j(q)]

    with :math:`\tau_j(q)` the :math:`\lfloor q m_j\rfloor`-th smallest positive reference
    value of latent j (:func:`quantile_thresholds`). On the reference data itself this removes
    exactly :math:`\lfloor q m_j \rfloor` activations of latent j when its values are distinct
    (more when values tie with :math:`\tau_j`, since all of them go). ``q = 0`` keeps every
    entry, including those of latents that never fired on the reference data; ``q = 1`` keeps
    only values above the reference max.

    >>> import numpy as np
    >>> from sae_ref.sparse import SparseCode
    >>> f = np.array([[1.0], [2.0], [3.0], [4.0]])
    >>> code = SparseCode.from_mask(f, f > 0)
    >>> latent_quantile(code, 0.5, reference_stats(code)).values.tolist()
    [3.0, 4.0]
    """
    op = "latent_quantile"
    xp = _check_code(op, code)
    q = _number(op, "q", q, 0.0, 1.0)
    _check_stats(op, code, stats, need_values=True)
    tau = quantile_thresholds(stats, q)
    return _subset(xp, code, code.values > xp.take(tau, code.cols))


# --- one global threshold ---------------------------------------------------------------------
def global_threshold(code: SparseCode, t: float) -> SparseCode:
    r"""Zero every activation below one threshold ``t >= 0``.

    .. math:: f'_{ij} = f_{ij}\, \mathbb 1[f_{ij} \ge t]

    ``t = 0`` keeps every entry; the map is idempotent. (The seed post found this the best of
    the four.)

    >>> import numpy as np
    >>> from sae_ref.sparse import SparseCode
    >>> f = np.array([[0.05, 0.3]])
    >>> global_threshold(SparseCode.from_mask(f, f > 0), 0.1).values.tolist()
    [0.3]
    """
    xp = _check_code("global_threshold", code)
    t = _number("global_threshold", "t", t, 0.0)
    cut = xp.asarray(t, dtype=code.values.dtype, device=device_of(code.values))
    return _subset(xp, code, code.values >= cut)


# --- one entry point ---------------------------------------------------------------------------
def prune(code: SparseCode, method: str, value, stats: PruningStats | None = None) -> SparseCode:
    """Apply the named method (one of :data:`METHODS`) with parameter ``value``.

    ``stats`` is required by ``percent_of_max`` and ``latent_quantile``.

    >>> import numpy as np
    >>> from sae_ref.sparse import SparseCode
    >>> f = np.array([[0.05, 0.3, 0.2]])
    >>> prune(SparseCode.from_mask(f, f > 0), "lowest_k", 2).values.tolist()
    [0.3]
    """
    C.choice("prune", "method", method, METHODS)
    if method == "lowest_k":
        return lowest_k(code, value)
    if method == "global_threshold":
        return global_threshold(code, value)
    if stats is None:
        raise ValueError(f"prune: method {method!r} needs argument 'stats' (from reference_stats)")
    if method == "percent_of_max":
        return percent_of_max(code, value, stats)
    return latent_quantile(code, value, stats)


# --- the pruned SAE and the sweep ---------------------------------------------------------------
@dataclass(frozen=True)
class PrunedSAE:
    """An SAE whose code is pruned before decoding; calling it reconstructs ``x``.

    ``pruned(x)`` is encode (with the config's standardisation), :func:`prune`, decode, and
    the map back to ``x``'s own space. ``d`` is the input width (what downstream splices check).
    """

    params: SAEParams
    config: SAEConfig
    method: str
    value: Any
    stats: PruningStats | None = None

    @property
    def d(self) -> int:
        return self.params.d

    def code(self, x) -> SparseCode:
        """The pruned code of ``x``."""
        return prune(forward(self.params, x, self.config).code, self.method, self.value, self.stats)

    def __call__(self, x):
        fwd = forward(self.params, x, self.config)
        return _reconstruct(self.params, fwd, prune(fwd.code, self.method, self.value, self.stats))


def _reconstruct(params, fwd, code):
    x_hat = decode(params, code)
    return x_hat if fwd.stats is None else unstandardize(x_hat, fwd.stats)


@dataclass(frozen=True)
class PruningPoint:
    """One point of a pruning sweep, over all evaluation rows.

    l0 : mean number of nonzero activations per row
    mse : mean of :math:`(\\hat x - x)^2` over all elements, in the input's own space
    nmse : :math:`\\sum \\|\\hat x_b - x_b\\|^2 / \\sum \\|x_b\\|^2` (about zero, as
        :func:`sae_ref.losses.nmse` with ``reduce="pooled"``)
    fvu : :math:`\\sum \\|\\hat x_b - x_b\\|^2 / \\sum \\|x_b - \\bar x\\|^2`, :math:`\\bar x`
        the mean of all evaluation rows (fraction of variance unexplained)
    downstream : the downstream callback's value, or None
    """

    method: str
    value: float
    l0: float
    mse: float
    nmse: float
    fvu: float
    n_rows: int
    downstream: float | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class _Moments:
    """Streaming float64 sums of one input stream: rows, sum ||x||^2, mean and sum ||x - mean||^2."""

    def __init__(self):
        self.n, self.sq, self.mean, self.m2 = 0, 0.0, None, 0.0

    def add(self, xp, x64):
        nb = x64.shape[0]
        mb = xp.mean(x64, axis=0)
        m2b = float(xp.sum((x64 - mb) ** 2))
        self.sq += float(xp.sum(x64 * x64))
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        n = self.n + nb
        delta = mb - self.mean  # Chan et al.'s pairwise update of the centred sum of squares
        self.m2 += m2b + float(xp.sum(delta * delta)) * self.n * nb / n
        self.mean = self.mean + delta * (nb / n)
        self.n = n


def _check_values(method: str, values) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"sweep: argument 'values' must be a non-empty sequence of numbers, got {values!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"sweep: argument 'values' must hold numbers, got {v!r}")
    return list(values)


def sweep(params: SAEParams, config: SAEConfig, batches: Iterable, method: str,
          values: Sequence, *, stats: PruningStats | None = None,
          downstream: Callable[[PrunedSAE], float] | None = None) -> list[PruningPoint]:
    r"""Evaluate one pruning method at each parameter value over evaluation batches.

    Each batch ``x`` [B, d] is encoded once; every value prunes that code, which is decoded
    (:func:`sae_ref.sae.decode`) and mapped back to the input's own space (undoing
    ``config.standardize``) before it is compared with ``x``. Sums are accumulated in float64.

    Parameters
    ----------
    params, config : the SAE
    batches : iterable of arrays [B, d] (read once)
    method : one of :data:`METHODS`
    values : the parameter values, e.g. ``[0, 0.05, 0.1]`` (0 is the unpruned SAE)
    stats : frozen :class:`PruningStats` (``percent_of_max``, ``latent_quantile``)
    downstream : optional ``downstream(pruned) -> float``, called once per value with the
        :class:`PrunedSAE`; e.g. a downstream loss through a model splice, ``lambda p:
        loss_recovered(model, texts, layer=3, sae_fn=sae_replace(p.params, p.config,
        fn=p))["loss_sae"]`` with :mod:`sae_ref.downstream`

    Returns
    -------
    list of :class:`PruningPoint`, one per value, in the order given.

    >>> import numpy as np
    >>> from sae_ref.sae import SAEConfig, init_params
    >>> params = init_params(6, 12, xp=np, seed=0, dtype=np.float64)
    >>> x = np.random.default_rng(0).standard_normal((5, 6))
    >>> pts = sweep(params, SAEConfig("relu"), [x], "global_threshold", [0.0, 0.5])
    >>> pts[0].l0 >= pts[1].l0
    True
    """
    C.choice("sweep", "method", method, METHODS)
    values = _check_values(method, values)
    if method in ("percent_of_max", "latent_quantile") and stats is None:
        raise ValueError(f"sweep: method {method!r} needs argument 'stats' (from reference_stats)")
    if downstream is not None and not callable(downstream):
        raise TypeError(f"sweep: argument 'downstream' must be callable, got {type(downstream).__name__}")
    mom = _Moments()
    l0 = [0.0] * len(values)
    sse = [0.0] * len(values)
    d = None
    for x in batches:
        fwd = forward(params, x, config)
        xp = array_namespace(x)
        x64 = xp.astype(x, xp.float64)
        mom.add(xp, x64)
        d = x.shape[1]
        for i, v in enumerate(values):
            code = prune(fwd.code, method, v, stats)
            r = xp.astype(_reconstruct(params, fwd, code), xp.float64) - x64
            sse[i] += float(xp.sum(r * r))
            l0[i] += float(xp.count_nonzero(code.values))
    if mom.n == 0:
        raise ValueError("sweep: argument 'batches' holds no rows")
    out = []
    for i, v in enumerate(values):
        ds = None
        if downstream is not None:
            ds = float(downstream(PrunedSAE(params, config, method, v, stats)))
        out.append(PruningPoint(method, float(v), l0[i] / mom.n, sse[i] / (mom.n * d),
                                sse[i] / mom.sq if mom.sq > 0 else math.nan,
                                sse[i] / mom.m2 if mom.m2 > 0 else math.nan, mom.n, ds))
    return out


__all__ = [
    "METHODS", "PrunedSAE", "PruningPoint", "PruningStats", "global_threshold", "latent_quantile",
    "lowest_k", "percent_of_max", "prune", "quantile_thresholds",
    "reference_stats", "sweep",
]
