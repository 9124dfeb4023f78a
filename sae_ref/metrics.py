r"""Evaluation metrics of an SAE, streamed over any number of batches in float64.

A pure accumulator: :func:`init` makes float64 sums on the backend, :func:`update` adds a
batch (``x``, ``x_hat`` [B, d] and the code f, a :class:`~sae_ref.sparse.SparseCode`
[B, h]), :func:`merge` adds two disjoint evaluations, :func:`result` reads the sums back
once and returns a :class:`Metrics`. :func:`evaluate` runs an SAE over an iterable of
batches, :func:`evaluate_store` over an activation store's rows in order.

What is measured, over the :math:`N` evaluated tokens (:math:`r_b = x_b - \hat x_b`):

- reconstruction: ``mse_per_element`` :math:`\sum_b\|r_b\|^2/(Nd)` (the BatchTopK authors'
  unit), ``mse_per_sample`` :math:`\sum_b\|r_b\|^2/N` (SAELens', dictionary_learning's
  unit), ``nmse`` :math:`\sum_b\|r_b\|^2/\sum_b\|x_b\|^2` (as
  :func:`sae_ref.losses.nmse` with ``reduce="pooled"``; equal to ``fvu_about_zero``), and
  the FVU under each definition of :mod:`sae_ref.fvu` (``fvu_<name>``;
  :meth:`Metrics.explained_variance` is one minus it);
- direction and scale: ``cosine_similarity`` :math:`\frac1N\sum_b \cos(x_b, \hat x_b)`,
  ``l2_ratio`` :math:`\frac1N\sum_b \|\hat x_b\|/\|x_b\|`, and the relative reconstruction
  bias (Wright & Sharkey) :math:`\gamma = \mathbb E\|\hat x\|^2 / \mathbb E[\hat x\cdot x]`,
  the :math:`\gamma` minimising :math:`\mathbb E\|\hat x/\gamma - x\|^2`
  (:math:`\gamma < 1`: shrinkage);
- sparsity: ``l0_mean`` and ``l0_histogram`` (tokens with L0 = 0, 1, ..., h);
- latents: ``latent_counts`` (tokens each latent fired on: a nonzero code value),
  ``firing_frequency`` = counts / N, dead latents (never fired in the window of
  ``dead_window_tokens`` = N tokens), dense latents (frequency strictly above 1% and 10%),
  and the histogram of :math:`\log_{10}` frequency over :data:`LOG10_DENSITY_EDGES` with the
  dead latents counted apart (:math:`\log_{10} 0 = -\infty`).

A per-token mean (cosine, L2 ratio, per-token FVUs) is nan when a token makes its
denominator zero; :math:`\gamma` is nan when :math:`\sum_b \hat x_b\cdot x_b = 0`; the pooled
rules are in :mod:`sae_ref.fvu`. Nothing is ever inf by division.

>>> import numpy as np
>>> from sae_ref import metrics
>>> from sae_ref.sparse import SparseCode
>>> f = np.array([[1., 0., 0.], [2., 3., 0.]])
>>> code = SparseCode.from_mask(f, f != 0)
>>> x = np.array([[1., 0.], [0., 2.]])
>>> s = metrics.update(metrics.init(2, 3, xp=np), x, 0.5 * x, code)
>>> m = metrics.result(s)
>>> m.l0_mean, m.l0_histogram.tolist(), m.n_dead, m.l2_ratio, m.relative_reconstruction_bias
(1.5, [0, 1, 1, 0], 1, 0.5, 0.5)
"""

from __future__ import annotations

#: Modules the docstring examples need (the tests skip them where one is not installed).
__doctest_requires__ = {"plot_log_density": ("matplotlib",)}

import io
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device as device_of

from sae_ref import _checks as C
from sae_ref import fvu as F
from sae_ref.arrays import to_numpy
from sae_ref.backends import get_backend
from sae_ref.sparse import SparseCode

#: Edges of the log10 firing-frequency histogram: -10 to 0 in steps of 0.25. Bin i holds
#: the frequencies in [10**e[i], 10**e[i+1]) (the last bin also 1); frequencies under 1e-10
#: (only with more than 1e10 tokens) go to the first bin.
LOG10_DENSITY_EDGES = tuple(-10.0 + 0.25 * i for i in range(41))

#: Frequencies above which a latent counts as dense.
DENSE_THRESHOLDS = (0.01, 0.1)


@dataclass(frozen=True)
class MetricState:
    """The running sums (float64 arrays on the backend) of one evaluation.

    var : the FVU sums (:class:`sae_ref.fvu.VarianceSums`), which also count the tokens
    h : latents
    sq_xhat, dot : :math:`\\sum_b\\|\\hat x_b\\|^2`, :math:`\\sum_b \\hat x_b\\cdot x_b`
    cos, l2_ratio : sums over tokens of :math:`\\cos(x_b, \\hat x_b)` and
        :math:`\\|\\hat x_b\\|/\\|x_b\\|`
    l0_hist : [h + 1], tokens with each L0
    counts : [h], tokens each latent fired on
    """

    var: F.VarianceSums
    h: int
    sq_xhat: Any
    dot: Any
    cos: Any
    l2_ratio: Any
    l0_hist: Any
    counts: Any

    @property
    def n_tokens(self) -> int:
        return self.var.n


def init(d: int, h: int, *, xp, device=None, mean=None) -> MetricState:
    r"""Empty sums for tokens of ``d`` features and codes of ``h`` latents.

    .. math:: N = 0, \quad \textstyle\sum(\cdot) = 0

    ``mean`` ([d]) is the reference mean of ``fvu_per_token`` (e.g. the dataset mean from a
    first pass); without it that metric is None.

    >>> import numpy as np
    >>> from sae_ref import metrics
    >>> metrics.init(4, 16, xp=np).counts.shape
    (16,)
    """
    h = C.integer_in("metrics.init", "h", h, 1, 2**40)
    var = F.init(d, xp=xp, device=device, mean=mean)
    xp = array_namespace(var.mean_x)
    dev = device_of(var.mean_x)
    z = xp.zeros((), dtype=xp.float64, device=dev)
    return MetricState(var, h, z, z, z, z, xp.zeros((h + 1,), dtype=xp.float64, device=dev),
                       xp.zeros((h,), dtype=xp.float64, device=dev))


def update(state: MetricState, x, x_hat, code: SparseCode) -> MetricState:
    r"""The sums with one more batch of tokens ``x``, reconstructions ``x_hat`` and code f.

    .. math:: \textstyle\sum_b \to \sum_b + \sum_{b \in \text{batch}}

    ``x`` and ``x_hat`` are [B, d] of any real floating dtype (cast to float64); ``code`` has
    shape (B, h) and unique places (as every activation makes it).

    >>> import numpy as np
    >>> from sae_ref import metrics
    >>> from sae_ref.sparse import SparseCode
    >>> f = np.array([[0., 2.]])
    >>> s = metrics.update(metrics.init(1, 2, xp=np), np.ones((1, 1)), np.ones((1, 1)),
    ...                    SparseCode.from_mask(f, f > 0))
    >>> s.n_tokens, s.counts.tolist()
    (1, [0.0, 1.0])
    """
    op = "metrics.update"
    if not isinstance(state, MetricState):
        raise TypeError(f"{op}: argument 'state' must be MetricState, got {type(state).__name__}")
    xp = F._check_pair(op, state.var, x, x_hat)
    _check_code(op, xp, state, code, x)
    return merge(state, _batch_state(xp, state, x, x_hat, code))


def _check_code(op, xp, state, code, x):
    if not isinstance(code, SparseCode):
        raise TypeError(f"{op}: argument 'code' must be a SparseCode, got {type(code).__name__}")
    C.namespace(op, x=x, code_values=code.values, code_rows=code.rows, code_cols=code.cols)
    want = (int(x.shape[0]), state.h)
    if tuple(code.shape) != want:
        raise ValueError(f"{op}: argument 'code' must have shape {want} (B of 'x', h of the "
                         f"state), got {tuple(code.shape)}")
    C.floating(op, xp, "code.values", code.values, ndim=1)


def _batch_state(xp, state, x, x_hat, code) -> MetricState:
    be = get_backend(xp)
    B, h = code.shape
    x64 = xp.astype(x, xp.float64)
    xh = xp.astype(x_hat, xp.float64)
    nx = xp.sqrt(xp.sum(x64 * x64, axis=1))
    nh = xp.sqrt(xp.sum(xh * xh, axis=1))
    dots = xp.sum(x64 * xh, axis=1)
    cos = F._ratio(xp, dots, nx * nh, nx * nh)
    fired = xp.astype(code.values != 0, xp.float64)
    l0 = be.segment_sum(code.rows, fired, B)
    ones = xp.ones((B,), dtype=xp.float64, device=device_of(x64))
    return MetricState(
        F._batch_sums(xp, x, x_hat, state.var.ref_mean), h, xp.sum(nh * nh), xp.sum(dots),
        xp.sum(cos), xp.sum(F._ratio(xp, nh, nx, nx)),
        be.segment_sum(xp.astype(l0, xp.int64), ones, h + 1),
        be.segment_sum(code.cols, fired, h),
    )


def merge(a: MetricState, b: MetricState) -> MetricState:
    r"""The sums of two disjoint evaluations (e.g. two shards evaluated apart).

    .. math:: \textstyle\sum_{a \cup b} = \sum_a + \sum_b \quad
              \text{(moments by Chan's rule, see :func:`sae_ref.fvu.merge`)}

    >>> import numpy as np
    >>> from sae_ref import metrics
    >>> metrics.merge(metrics.init(2, 3, xp=np), metrics.init(2, 3, xp=np)).n_tokens
    0
    """
    for name, s in (("a", a), ("b", b)):
        if not isinstance(s, MetricState):
            raise TypeError(f"metrics.merge: argument '{name}' must be MetricState, got {type(s).__name__}")
    if a.h != b.h:
        raise ValueError(f"metrics.merge: states of h = {a.h} and h = {b.h} cannot be merged")
    return MetricState(F.merge(a.var, b.var), a.h, a.sq_xhat + b.sq_xhat, a.dot + b.dot,
                       a.cos + b.cos, a.l2_ratio + b.l2_ratio, a.l0_hist + b.l0_hist,
                       a.counts + b.counts)


@dataclass(frozen=True)
class Metrics:
    """The metrics of one evaluation, on the host: Python numbers and NumPy arrays.

    Scalars are floats (nan where undefined, see the module notes), ``fvu_per_token`` None
    when no reference mean was given; arrays are NumPy (counts as int64).
    """

    n_tokens: int
    d: int
    h: int
    mse_per_element: float
    mse_per_sample: float
    nmse: float
    fvu_pooled: float
    fvu_about_zero: float
    fvu_residual_centred: float
    fvu_batch_mean: float
    fvu_per_token: float | None
    fvu_per_token_batch_mean: float
    fvu_per_token_about_zero: float
    cosine_similarity: float
    l2_ratio: float
    relative_reconstruction_bias: float
    l0_mean: float
    l0_histogram: np.ndarray
    latent_counts: np.ndarray
    firing_frequency: np.ndarray
    dead_window_tokens: int
    n_dead: int
    n_dense_1pct: int
    n_dense_10pct: int
    log10_density_edges: np.ndarray
    log10_density_histogram: np.ndarray

    def fvu(self, definition: str = "pooled") -> float | None:
        """The FVU under a definition of :data:`sae_ref.fvu.DEFINITIONS`."""
        C.choice("Metrics.fvu", "definition", definition, F.DEFINITIONS)
        return getattr(self, "fvu_" + definition)

    def explained_variance(self, definition: str = "pooled") -> float | None:
        """One minus :meth:`fvu` under the same definition (None where the FVU is None)."""
        v = self.fvu(definition)
        return None if v is None else 1.0 - v

    def summary(self) -> dict[str, Any]:
        """The scalar metrics (and ``explained_variance_<name>``) as a JSON-ready dict."""
        out = {k: v for k, v in asdict(self).items() if not isinstance(v, np.ndarray)}
        for name in F.DEFINITIONS:
            out["explained_variance_" + name] = self.explained_variance(name)
        out["frac_dead"] = self.n_dead / self.h
        return out


def result(state: MetricState) -> Metrics:
    r"""Read the sums back to the host (once) and form every metric.

    .. math:: \mathrm{FVU}_{pooled} = \frac{\sum_b \|r_b\|^2}{\sum_b \|x_b - \mu\|^2}, \quad
              \gamma = \frac{\sum_b \|\hat x_b\|^2}{\sum_b \hat x_b \cdot x_b}, \quad \dots

    >>> import numpy as np
    >>> from sae_ref import metrics
    >>> from sae_ref.sparse import SparseCode
    >>> f = np.array([[1.], [0.]])
    >>> s = metrics.update(metrics.init(1, 1, xp=np), np.array([[1.], [3.]]),
    ...                    np.array([[1.], [2.]]), SparseCode.from_mask(f, f > 0))
    >>> m = metrics.result(s)
    >>> m.fvu_pooled, m.mse_per_sample, m.firing_frequency.tolist()
    (0.5, 0.5, [0.5])
    """
    if not isinstance(state, MetricState):
        raise TypeError(f"metrics.result: argument 'state' must be MetricState, got {type(state).__name__}")
    v = F.values(state.var)  # raises on an empty state
    xp = array_namespace(state.counts)
    n, d, h = state.n_tokens, state.var.d, state.h
    sq_r = float(state.var.sq_r)
    nonzero = state.dot != 0
    gamma = xp.where(nonzero, state.sq_xhat / xp.where(nonzero, state.dot, xp.ones_like(state.dot)),
                     xp.full_like(state.dot, float("nan")))
    counts = to_numpy(state.counts)
    freq = counts / n
    edges = np.asarray(LOG10_DENSITY_EDGES)
    return Metrics(
        n_tokens=n, d=d, h=h,
        mse_per_element=sq_r / (n * d), mse_per_sample=sq_r / n, nmse=float(v["about_zero"]),
        **{"fvu_" + k: float(v[k]) if k in v else None for k in F.DEFINITIONS},
        cosine_similarity=float(state.cos) / n, l2_ratio=float(state.l2_ratio) / n,
        relative_reconstruction_bias=float(gamma),
        l0_mean=float(np.dot(np.arange(h + 1), to_numpy(state.l0_hist))) / n,
        l0_histogram=to_numpy(state.l0_hist).astype(np.int64),
        latent_counts=counts.astype(np.int64), firing_frequency=freq,
        dead_window_tokens=n, n_dead=int(np.sum(counts == 0)),
        n_dense_1pct=int(np.sum(freq > DENSE_THRESHOLDS[0])),
        n_dense_10pct=int(np.sum(freq > DENSE_THRESHOLDS[1])),
        log10_density_edges=edges,
        log10_density_histogram=to_numpy(_density_histogram(xp, state.counts, n, edges)),
    )


def _density_histogram(xp, counts, n, edges):
    # bins compared in frequency (edges 10**e), not after a log: every backend bins alike
    dev = device_of(counts)
    f_edges = xp.asarray([10.0 ** float(e) for e in edges], dtype=xp.float64, device=dev)
    nb = len(edges) - 1
    alive = counts > 0
    idx = xp.searchsorted(f_edges, counts / n, side="right") - 1
    idx = xp.clip(idx, min=0, max=nb - 1)
    hist = get_backend(xp).segment_sum(xp.astype(idx, xp.int64), xp.astype(alive, xp.float64), nb)
    return xp.astype(hist, xp.int64)


# --- running an SAE ---------------------------------------------------------------------------
def evaluate(params, config, batches: Iterable, *, mean=None) -> Metrics:
    r"""Run the SAE over every batch ``x`` [B, d] and return the metrics of all tokens.

    .. math:: \hat x = \mathrm{SAE}(x) \text{ in } x\text{'s own space}, \quad
              \text{metrics}(x, \hat x, f)

    With ``config.standardize`` the metrics compare ``x`` with the output mapped back to the
    input space (:meth:`sae_ref.sae.Forward.output`), not the standardised pair. BatchTopK
    selects over each batch, so its codes (and every metric) depend on the batch size; a
    threshold config (:mod:`sae_ref.theta`) does not. ``mean`` as in :func:`init`.

    >>> import numpy as np
    >>> from sae_ref.metrics import evaluate
    >>> from sae_ref.sae import SAEConfig, init_params
    >>> params = init_params(4, 8, xp=np, dtype=np.float64)
    >>> x = np.random.default_rng(0).standard_normal((6, 4))
    >>> m = evaluate(params, SAEConfig("topk", k=2), [x[:3], x[3:]])
    >>> m.n_tokens, m.l0_mean <= 2
    (6, True)
    """
    from sae_ref.sae import SAEParams, forward

    if not isinstance(params, SAEParams):
        raise TypeError(f"evaluate: argument 'params' must be SAEParams, got {type(params).__name__}")
    xp = array_namespace(params.W_enc)
    state = init(params.d, params.h, xp=xp, device=device_of(params.W_enc), mean=mean)
    for x in batches:
        fwd = forward(params, x, config)
        state = update(state, x, fwd.output(), fwd.code)
    if state.n_tokens == 0:
        raise ValueError("evaluate: argument 'batches' yielded no batch")
    return result(state)


def store_batches(store, batch_size: int, *, xp=None, device=None, dtype=None,
                  rows: tuple[int, int] | None = None, nonfinite: str = "raise") -> Iterator:
    r"""The store's rows ``[start, stop)`` in file order, as batches of ``batch_size`` rows.

    .. math:: \text{batch } i = \text{rows } [start + iB, \min(start + (i+1)B, stop))

    Deterministic and unshuffled (the last batch may be shorter); each batch is checked for
    NaN/inf on the host (:class:`~sae_ref.data.stream.NonFiniteBatch`, a ValueError naming the
    shard and row; with ``nonfinite="skip"`` such a batch is left out) and moved with
    ``xp.asarray`` to ``device`` in ``dtype`` (default float32), as the store's streams do.

    >>> import tempfile, numpy as np
    >>> from sae_ref.data.store import write_store
    >>> from sae_ref.metrics import store_batches
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     store = write_store(tmp, np.arange(10.).reshape(5, 2), shard_rows=2)
    ...     print([b[:, 0].tolist() for b in store_batches(store, 3)])
    [[0.0, 2.0, 4.0], [6.0, 8.0]]
    """
    from sae_ref.data.store import ActivationStore
    from sae_ref.data.stream import BatchStream

    op = "store_batches"
    if not isinstance(store, ActivationStore):
        raise TypeError(f"{op}: argument 'store' must be an ActivationStore, got {type(store).__name__}")
    B = C.integer_in(op, "batch_size", batch_size, 1, 2**40)
    start, stop = _row_range(op, store, rows)

    n_batches = -(-(stop - start) // B)

    def make(i):
        s = start + i * B
        if i >= n_batches:  # past the last batch (after skipping it): an empty end marker
            return np.zeros((0, store.d), dtype=store.dtype), s
        return store.read(s, min(s + B, stop)), s

    def describe(batch, s):
        r = int(np.flatnonzero(~np.isfinite(batch).all(axis=1))[0])
        name, local = store.locate(s + r)
        return f": store row {s + r} (row {local} of shard '{name}')"

    stream = BatchStream(f"store_batches({store.directory!r})", make, describe, xp=xp,
                         device=device, dtype=dtype, nonfinite=nonfinite, max_skips=n_batches + 1)
    return _until_empty(stream, n_batches)


def _until_empty(stream, n_batches: int) -> Iterator:
    while stream.position < n_batches:
        x = next(stream)
        if x.shape[0] == 0:
            return
        yield x


def _row_range(op, store, rows) -> tuple[int, int]:
    if rows is None:
        start, stop = 0, store.n_rows
    elif not isinstance(rows, (tuple, list)) or len(rows) != 2:
        raise ValueError(f"{op}: argument 'rows' must be a pair (start, stop), got {rows!r}")
    else:
        start = C.integer_in(op, "rows[0]", rows[0], 0, store.n_rows)
        stop = C.integer_in(op, "rows[1]", rows[1], start, store.n_rows)
    if stop == start:
        raise ValueError(f"{op}: no rows to evaluate (rows [{start}, {stop}) of a store of "
                         f"{store.n_rows} rows)")
    return start, stop


def evaluate_store(params, config, store, *, batch_size: int = 4096,
                   rows: tuple[int, int] | None = None, per_token_mean: bool = True,
                   nonfinite: str = "raise") -> Metrics:
    r"""Evaluate the SAE on a store's rows in order (see :func:`store_batches`).

    .. math:: m = \frac1N \textstyle\sum_b x_b \text{ (first pass)}, \quad
              \text{metrics}(x, \hat x, f) \text{ (second pass)}

    Rows are moved to the parameters' backend, device and dtype. With ``per_token_mean`` a
    first pass (no SAE) computes the dataset mean, the reference of ``fvu_per_token``.
    ``nonfinite``: "raise" on a batch with NaN/inf (naming the shard and row), or "skip" it
    (the batch is left out of both passes).

    >>> import tempfile, numpy as np
    >>> from sae_ref.data.store import write_store
    >>> from sae_ref.metrics import evaluate_store
    >>> from sae_ref.sae import SAEConfig, init_params
    >>> x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     m = evaluate_store(init_params(4, 8, xp=np), SAEConfig("relu"),
    ...                        write_store(tmp, x, shard_rows=3), batch_size=4)
    >>> m.n_tokens, m.fvu_per_token is not None
    (10, True)
    """
    from sae_ref.sae import SAEParams

    if not isinstance(params, SAEParams):
        raise TypeError(f"evaluate_store: argument 'params' must be SAEParams, got {type(params).__name__}")
    xp = array_namespace(params.W_enc)
    where = {"xp": xp, "device": device_of(params.W_enc), "dtype": params.W_enc.dtype, "rows": rows,
             "nonfinite": nonfinite}
    mean = None
    if per_token_mean:
        total, n = None, 0
        for x in store_batches(store, batch_size, **where):
            s = xp.sum(xp.astype(x, xp.float64), axis=0)
            total, n = (s if total is None else total + s), n + int(x.shape[0])
        mean = total / n
    return evaluate(params, config, store_batches(store, batch_size, **where), mean=mean)


# --- plotting ---------------------------------------------------------------------------------
def plot_log_density(metrics: Metrics, *, path=None, ax=None, title: str | None = None):
    r"""Histogram of the latents' log10 firing frequency, dead latents noted apart.

    .. math:: \text{bar } i = \#\{j : 10^{e_i} \le \mathrm{freq}_j < 10^{e_{i+1}}\}

    Draws into ``ax`` if given (else a new Figure, no pyplot state) and returns the Figure;
    with ``path`` saves it atomically, in the format its suffix names (``.png``, ``.svg``,
    ``.pdf``). Needs matplotlib (the ``plots`` extra).

    >>> import numpy as np
    >>> from sae_ref.metrics import evaluate, plot_log_density
    >>> from sae_ref.sae import SAEConfig, init_params
    >>> x = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    >>> fig = plot_log_density(evaluate(init_params(4, 32, xp=np), SAEConfig("topk", k=2), [x]))
    >>> fig.axes[0].get_xlabel()
    'log10 firing frequency'
    """
    if not isinstance(metrics, Metrics):
        raise TypeError(f"plot_log_density: argument 'metrics' must be Metrics, got {type(metrics).__name__}")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plot_log_density needs matplotlib: pip install 'sae-ref[plots]'") from None
    if ax is None:
        fig = Figure(figsize=(6, 3.5), layout="constrained")
        ax = fig.add_subplot()
    fig = ax.figure
    e = metrics.log10_density_edges
    ax.stairs(metrics.log10_density_histogram, e, fill=True)
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title(title or f"{metrics.n_dead} of {metrics.h} latents dead in "
                          f"{metrics.dead_window_tokens} tokens")
    if path is not None:
        _save(fig, path)
    return fig


def _save(fig, path) -> None:
    from pathlib import Path

    from sae_ref.io._atomic import atomic_write_bytes

    fmt = Path(path).suffix.lstrip(".").lower()
    if fmt not in ("png", "svg", "pdf"):
        raise ValueError(f"plot_log_density: argument 'path' must end in .png, .svg or .pdf, got {str(path)!r}")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    atomic_write_bytes(path, buf.getvalue())
