r"""Figures of sparsity-performance frontiers and pruning sweeps (the ``plots`` extra).

Three figures, each returned as a :class:`matplotlib.figure.Figure` (built without pyplot, so
no global state and no display backend is touched) and written to ``path`` when one is given,
atomically (:func:`sae_ref.io._atomic.atomic_write`: a reader never sees half a file); the
format follows the suffix (``.png``, ``.pdf``, ``.svg``).

- :func:`plot_l0_frontier`: :math:`L_0` against a reconstruction or downstream metric, both
  axes logarithmic, one line per SAE family;
- :func:`plot_hit_plane`: the plane :math:`(1/L_0,\ 1 - \text{loss recovered})` with each
  family's points, its fitted curves (:func:`sae_ref.frontier.fit_frontier`) and their
  :math:`x_{1/2}` marked where the curve crosses 1/2;
- :func:`plot_pruning_sweep`: :math:`L_0` against NMSE (or another field) along each pruning
  method's sweep (:func:`sae_ref.pruning.sweep`), the unpruned SAE marked.

Arrays of any backend are copied to the host for drawing. matplotlib is imported inside each
function, so the rest of sae-ref works without it.

>>> fig = plot_l0_frontier({"TopK": ([16, 32, 64], [0.30, 0.21, 0.15])}, metric="NMSE")
>>> [ax.get_xscale() for ax in fig.axes]
['log']
"""

from __future__ import annotations

#: Modules the docstring examples need (the tests skip them where one is not installed).
__doctest_requires__ = {"*": ("matplotlib",)}

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from array_api_compat import is_array_api_obj

from sae_ref.arrays import to_numpy
from sae_ref.frontier import FrontierFit
from sae_ref.io._atomic import atomic_write

FORMATS = ("png", "pdf", "svg")
_STYLE = {"linear": ":", "hill1": "-", "hill": "--", "power": "-."}


def _figure(figsize=(5.5, 4.0)):
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("sae_ref.frontier_plots needs matplotlib: pip install 'sae-ref[plots]'") from None
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _host(op: str, name: str, a) -> np.ndarray:
    v = to_numpy(a) if is_array_api_obj(a) else a
    try:
        out = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: argument '{name}' must be numbers or an array, got {a!r}") from None
    if out.ndim != 1:
        raise ValueError(f"{op}: argument '{name}' must be 1-D, got shape {out.shape}")
    return out


def _pairs(op: str, families) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if not isinstance(families, Mapping) or not families:
        raise ValueError(f"{op}: argument 'families' must be a non-empty mapping name -> (x, y)")
    out = {}
    for name, pair in families.items():
        if not (isinstance(pair, Sequence) and len(pair) == 2):
            raise ValueError(f"{op}: argument 'families[{name!r}]' must be a pair (x, y)")
        x, y = _host(op, f"families[{name!r}][0]", pair[0]), _host(op, f"families[{name!r}][1]", pair[1])
        if x.shape != y.shape:
            raise ValueError(f"{op}: argument 'families[{name!r}]' has {x.size} x and {y.size} y values")
        out[str(name)] = (x, y)
    return out


def save_figure(fig, path) -> Path:
    """Write ``fig`` to ``path`` atomically; the format is the suffix (png, pdf or svg)."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"save_figure: argument 'path' must end in one of "
                         f"{['.' + f for f in FORMATS]}, got {str(path.name)!r}")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=150)
    data = buf.getvalue()
    atomic_write(path, lambda f: f.write(data))
    return path


def plot_l0_frontier(families, *, metric: str = "NMSE", title: str | None = None, path=None):
    r"""Log-log frontier: :math:`L_0` (x) against a metric (y), one line per family.

    Parameters
    ----------
    families : mapping name -> (l0, values)
        Each family's SAEs: their mean :math:`L_0` and metric (MSE, NMSE or downstream loss
        minus the clean loss: anything positive). Points are joined in order of :math:`L_0`.
    metric : the y-axis label
    title : optional title
    path : optional file to write (png, pdf, svg)

    Returns
    -------
    matplotlib.figure.Figure
    """
    op = "plot_l0_frontier"
    data = _pairs(op, families)
    for name, (l0, v) in data.items():
        if np.any(l0 <= 0) or np.any(v <= 0) or not np.all(np.isfinite(l0) & np.isfinite(v)):
            raise ValueError(f"{op}: family {name!r} has values that a log axis cannot show "
                             f"(L0 and {metric} must be positive and finite)")
    fig, ax = _figure()
    for i, (name, (l0, v)) in enumerate(data.items()):
        o = np.argsort(l0, kind="stable")
        ax.plot(l0[o], v[o], "o-", color=f"C{i}", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"$L_0$ (active latents per sample)")
    ax.set_ylabel(metric)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_hit_plane(families, fits=None, *, title: str | None = None, path=None):
    r"""The plane :math:`x = 1/L_0`, :math:`y = 1 - \text{loss recovered}`, with fitted curves.

    Parameters
    ----------
    families : mapping name -> (x, y)
        Each family's points (e.g. from :func:`sae_ref.frontier.hit_plane`).
    fits : optional mapping name -> FrontierFit or sequence of FrontierFit
        Curves to draw in the family's colour (line style by model); each curve's
        :math:`x_{1/2}` is marked at :math:`y = 1/2` with a dotted drop line.
    title, path : as :func:`plot_l0_frontier`

    Returns
    -------
    matplotlib.figure.Figure

    >>> from sae_ref.frontier import fit_frontier
    >>> x, y = [0.02, 0.05, 0.1], [0.2, 0.4, 0.55]
    >>> fig = plot_hit_plane({"A": (x, y)}, {"A": fit_frontier(x, y, "hill1")})
    >>> len(fig.axes[0].lines)        # points, curve, x_half mark and drop line, y = 1/2
    5
    """
    op = "plot_hit_plane"
    data = _pairs(op, families)
    fits = _fits(op, fits, data)
    fig, ax = _figure()
    xmax = max([float(np.max(x)) for x, _ in data.values() if x.size] + [0.0])
    for fl in fits.values():
        xmax = max([xmax] + [f.x_half for f in fl if math.isfinite(f.x_half)])
    xmax = 1.1 * xmax if xmax > 0 else 1.0
    grid = np.linspace(xmax * 1e-4, xmax, 300)
    for i, (name, (x, y)) in enumerate(data.items()):
        color = f"C{i}"
        ax.plot(x, y, "o", color=color, label=name)
        for f in fits.get(name, ()):
            xh = f.x_half
            ax.plot(grid, f.predict(grid), _STYLE[f.model], color=color,
                    label=f"{name}: {f.model}, $x_{{1/2}}$ = {xh:.3g}")
            if math.isfinite(xh) and 0 < xh <= xmax:
                ax.plot([xh], [0.5], "x", color=color, markersize=9)
                ax.plot([xh, xh], [0.0, 0.5], ":", color=color, linewidth=0.8)
    ax.axhline(0.5, color="0.6", linewidth=0.6)
    ax.set_xlim(0.0, xmax)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel(r"sparsity $1/L_0$")
    ax.set_ylabel("performance hit (1 - loss recovered)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    if path is not None:
        save_figure(fig, path)
    return fig


def _fits(op, fits, data) -> dict[str, list[FrontierFit]]:
    if fits is None:
        return {}
    if not isinstance(fits, Mapping):
        raise TypeError(f"{op}: argument 'fits' must be a mapping name -> FrontierFit(s)")
    out = {}
    for name, fl in fits.items():
        fl = [fl] if isinstance(fl, FrontierFit) else list(fl)
        if str(name) not in data:
            raise ValueError(f"{op}: argument 'fits' names {name!r}, which is not one of the families {list(data)}")
        for f in fl:
            if not isinstance(f, FrontierFit):
                raise TypeError(f"{op}: argument 'fits[{name!r}]' must hold FrontierFit, got {type(f).__name__}")
        out[str(name)] = fl
    return out


def plot_pruning_sweep(sweeps, *, metric: str = "nmse", title: str | None = None, path=None):
    r""":math:`L_0` (x) against ``metric`` (y) along pruning sweeps, log-log, unpruned SAE starred.

    Parameters
    ----------
    sweeps : mapping label -> sequence of :class:`~sae_ref.pruning.PruningPoint`, or one
        sequence of points (grouped by their ``method``)
    metric : the point field on the y axis: "nmse", "mse", "fvu" or "downstream"
    title, path : as :func:`plot_l0_frontier`

    The unpruned SAE is the point(s) with parameter value 0, drawn as a black star.

    >>> from sae_ref.pruning import PruningPoint
    >>> pts = [PruningPoint("global_threshold", t, l0, 0.1 / l0, 0.1 / l0, 0.2 / l0, 8)
    ...        for t, l0 in ((0.0, 40.0), (0.1, 25.0), (0.2, 12.0))]
    >>> fig = plot_pruning_sweep(pts)
    >>> fig.axes[0].get_legend_handles_labels()[1]
    ['global_threshold', 'unpruned']
    """
    from sae_ref.pruning import PruningPoint

    op = "plot_pruning_sweep"
    if metric not in ("nmse", "mse", "fvu", "downstream"):
        raise ValueError(f"{op}: argument 'metric' must be one of ['nmse', 'mse', 'fvu', 'downstream'], got {metric!r}")
    if isinstance(sweeps, Mapping):
        groups = {str(k): list(v) for k, v in sweeps.items()}
    else:
        groups = {}
        for p in sweeps:
            groups.setdefault(getattr(p, "method", None), []).append(p)
    if not groups or not all(groups.values()):
        raise ValueError(f"{op}: argument 'sweeps' holds no points")
    fig, ax = _figure()
    unpruned = []
    for i, (label, pts) in enumerate(groups.items()):
        for p in pts:
            if not isinstance(p, PruningPoint):
                raise TypeError(f"{op}: argument 'sweeps' must hold PruningPoint, got {type(p).__name__}")
            v = getattr(p, metric)
            if v is None or not (v > 0 and math.isfinite(v)) or not p.l0 > 0:
                raise ValueError(f"{op}: a {p.method} point at value {p.value} has {metric} = {v} and "
                                 f"L0 = {p.l0}; a log axis needs positive finite values")
        pts = sorted(pts, key=lambda p: p.value)
        ax.plot([p.l0 for p in pts], [getattr(p, metric) for p in pts], "o-", color=f"C{i}",
                markersize=4, label=label)
        unpruned += [p for p in pts if p.value == 0]
    if unpruned:
        ax.plot([p.l0 for p in unpruned], [getattr(p, metric) for p in unpruned], "*", color="k",
                markersize=14, label="unpruned", zorder=5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"$L_0$ (active latents per sample)")
    ax.set_ylabel(metric.upper() if metric != "downstream" else "downstream loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    if path is not None:
        save_figure(fig, path)
    return fig


__all__ = ["FORMATS", "plot_hit_plane", "plot_l0_frontier", "plot_pruning_sweep", "save_figure"]
