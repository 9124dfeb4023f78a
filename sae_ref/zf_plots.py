r"""Figures of the ZF evaluation (:mod:`sae_ref.zf`): the ZF scatter and per-layer violins.

:func:`plot_zf` scatters :math:`\|z\|` (x) against :math:`\|\tilde f\|` (y) for one or
several SAEs, with the line :math:`y = x` and, for each band level :math:`c = \varepsilon(h-1)`,
the lines

.. math:: y = \frac{x}{\sqrt{1 + c}} \quad\text{and}\quad y = \frac{x}{\sqrt{1 - c}}
          \;(c < 1 \text{ only}),

between which the AFA bound puts a token when the decoder is :math:`\varepsilon`-quasi-orthogonal
(:func:`sae_ref.afa.afa_bounds`). :func:`plot_zf_violins` draws, per layer (or per SAE), the
distributions of :math:`\varepsilon_{LBO}` and NMSE as violins, of :math:`\log_{10}` of the
values by default; with two families per layer (e.g. TopK and top-AFA) each takes one half.

matplotlib (the ``plots`` extra) is imported inside the functions; figures are
``matplotlib.figure.Figure`` objects made without pyplot (no global state, nothing to close)
and are written with :func:`save_figure` (atomic: a reader never sees half a file).

>>> import numpy as np
>>> from sae_ref.zf import ZFPoints
>>> from sae_ref.zf_plots import have_matplotlib, plot_zf
>>> r = np.random.default_rng(0).uniform(1.0, 2.0, size=(2, 50))
>>> pts = ZFPoints(r[0], r[1], np.abs(r[0] ** 2 - r[1] ** 2) / (15 * r[1] ** 2),
...                np.full(50, 0.1), np.full(50, 4.0), h=16, b_dec_norm=0.0)
>>> fig = plot_zf({"topk": pts}) if have_matplotlib() else None
>>> fig is None or fig.axes[0].get_xlabel() == r"$\|z\|$"
True
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from sae_ref import _checks as C
from sae_ref.io._atomic import atomic_write
from sae_ref.zf import BANDS, ZFPoints

#: Metrics :func:`plot_zf_violins` can draw, with their axis labels.
VIOLIN_METRICS = {"eps_lbo": r"\varepsilon_{LBO}", "nmse": r"\mathrm{NMSE}"}
_BAND_STYLES = (":", "--", "-.", (0, (1, 3)), (0, (5, 5)))


def have_matplotlib() -> bool:
    """Whether matplotlib (the ``plots`` extra) can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(op: str, ncols: int, figsize):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(f"{op}: matplotlib is not installed; pip install matplotlib "
                          "(or the plots extra: pip install 'sae-ref[plots]')") from None
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def save_figure(fig, path, *, dpi: int = 150) -> Path:
    """Write ``fig`` to ``path`` atomically; the format comes from the suffix (png, pdf, svg, ...)."""
    op = "save_figure"
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(f"{op}: argument 'path' must end in one of "
                         f"{sorted('.' + k for k in supported)}, got {str(path)!r}")
    dpi = C.integer_in(op, "dpi", dpi, 1, 10_000)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi)
    data = buf.getvalue()
    atomic_write(path, lambda f: f.write(data))
    return path


def _groups(op: str, points) -> dict[str, ZFPoints]:
    if isinstance(points, ZFPoints):
        return {"": points}
    if not isinstance(points, Mapping) or not points:
        raise TypeError(f"{op}: argument 'points' must be ZFPoints or a non-empty mapping "
                        f"{{label: ZFPoints}}, got {type(points).__name__}")
    for k, v in points.items():
        if not isinstance(v, ZFPoints):
            raise TypeError(f"{op}: argument 'points[{k!r}]' must be ZFPoints, got {type(v).__name__}")
    return {str(k): v for k, v in points.items()}


def _subsample(n: int, max_points: int, seed: int) -> np.ndarray:
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


# --- the ZF scatter -----------------------------------------------------------------------------
def plot_zf(points, *, bands: Sequence[float] = BANDS, max_points: int = 20_000, seed: int = 0,
            log: bool = False, title: str | None = None, path=None, dpi: int = 150):
    r"""The ZF plot: :math:`\|z\|` against :math:`\|\tilde f\|` per token, one colour per SAE.

    Parameters
    ----------
    points : ZFPoints or mapping {label: ZFPoints}
        One SAE, or several overlaid (e.g. ``{"TopK": a, "top-AFA": b}``).
    bands : levels :math:`c = \varepsilon(h-1)` of the band lines.
    max_points : at most this many tokens per SAE are drawn (a seeded uniform subsample).
    log : logarithmic axes.
    title, path, dpi : a title; where to save (format from the suffix) and its resolution.

    Returns
    -------
    matplotlib.figure.Figure
    """
    op = "plot_zf"
    groups = _groups(op, points)
    bands = [C.positive_number(op, f"bands[{i}]", c) for i, c in enumerate(bands)]
    max_points = C.integer_in(op, "max_points", max_points, 1, 2**40)
    seed = C.integer_in(op, "seed", seed, 0, 2**63 - 1)
    fig, (ax,) = _figure(op, 1, (5.2, 5.0))
    top, low = 0.0, np.inf
    for i, (label, p) in enumerate(groups.items()):
        idx = _subsample(len(p), max_points, seed)
        z, f = p.z_norm[idx], p.f_norm[idx]
        name = f"{label} ({len(p):,} tokens)" if label else f"{len(p):,} tokens"
        ax.scatter(z, f, s=5, alpha=0.4, color=f"C{i}", edgecolors="none", label=name, rasterized=True)
        both = np.concatenate([z, f])
        both = both[np.isfinite(both)]
        top = max(top, float(both.max(initial=0.0)))
        pos = both[both > 0]
        low = min(low, float(pos.min(initial=np.inf)))
    _band_lines(ax, bands, top, low, log)
    space = {p.space for p in groups.values()}
    ax.set_xlabel(r"$\|z\|$" if space == {"input"} else r"$\|z\|$ (" + "/".join(sorted(space)) + ")")
    ax.set_ylabel(r"$\|\tilde f\|$ (features $\times$ decoder norms, with $\|b_{dec}\|$)")
    if title:
        ax.set_title(title)
    ax.legend(loc="upper left", fontsize="small", markerscale=2)
    if path is not None:
        save_figure(fig, path, dpi=dpi)
    return fig


def _band_lines(ax, bands, top, low, log):
    top = top * 1.05 if top > 0 else 1.0
    if log:
        low = low / 1.05 if np.isfinite(low) else top / 10
        xs = np.geomspace(low, top, 200)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(low, top)
        ax.set_ylim(low, top)
    else:
        xs = np.linspace(0.0, top, 200)
        ax.set_xlim(0.0, top)
        ax.set_ylim(0.0, top)
    ax.plot(xs, xs, color="k", lw=1.0, label="$y = x$")
    for j, c in enumerate(bands):
        style = {"color": "0.35", "lw": 0.9, "ls": _BAND_STYLES[j % len(_BAND_STYLES)]}
        ax.plot(xs, xs / np.sqrt(1.0 + c), label=rf"$\varepsilon(h-1) = {c:g}$", **style)
        if c < 1:
            ax.plot(xs, xs / np.sqrt(1.0 - c), **style)


# --- the ratio view ------------------------------------------------------------------------------
def z_norm_spread(points) -> float:
    r"""The relative spread of :math:`\|z\|` over every token of ``points`` (ZFPoints or a
    mapping of them): :math:`(q_{95} - q_{05}) / q_{50}`. Near 0 (standardised inputs:
    :math:`\|z\| = \sqrt{d-1}\,s/(s+10^{-5})` for every token) the ZF scatter is one column
    and :func:`plot_zf_ratio` shows what varies."""
    groups = _groups("z_norm_spread", points)
    z = np.concatenate([p.z_norm for p in groups.values()])
    z = z[np.isfinite(z)]
    if z.size == 0:
        return float("nan")
    q05, q50, q95 = np.quantile(z, (0.05, 0.5, 0.95))
    return float((q95 - q05) / q50) if q50 > 0 else float("nan")


def zf_ratio(points: ZFPoints) -> np.ndarray:
    r""":math:`\|\tilde f\| / \|z\|` per token (tokens with :math:`z = 0` left out); below 1:
    under-activated; inside band c exactly when between :math:`1/\sqrt{1+c}` and
    :math:`1/\sqrt{1-c}`."""
    ok = (points.z_norm > 0) & np.isfinite(points.f_norm)
    return points.f_norm[ok] / points.z_norm[ok]


def plot_zf_ratio(points, *, bands: Sequence[float] = BANDS, groups: Mapping[str, str] | None = None,
                  title: str | None = None, path=None, dpi: int = 150):
    r"""The ZF plot's vertical axis relative to the horizontal one: per SAE, the distribution of
    :math:`\|\tilde f\|/\|z\|` over its tokens (a violin with its median and 5–95% range),
    against :math:`y = 1` and the band limits :math:`1/\sqrt{1 \pm c}`.

    A token lies inside band c of the ZF plot exactly when its ratio lies between the two
    limits, so this is the ZF plot with :math:`\|z\|` divided out: the view to use when
    :math:`\|z\|` is (nearly) one value (:func:`z_norm_spread`). Each SAE's share of tokens
    below 1 (under-activated) is written above its violin.

    Parameters
    ----------
    points : ZFPoints or mapping {label: ZFPoints}
        SAEs in the order drawn, left to right.
    bands : levels :math:`c = \varepsilon(h-1)` of the limit lines.
    groups : mapping {label: group}, optional
        A colour per group (e.g. the training architecture); default one per SAE.
    title, path, dpi : a title; where to save (format from the suffix) and its resolution.

    Returns
    -------
    matplotlib.figure.Figure
    """
    op = "plot_zf_ratio"
    sets = _groups(op, points)
    bands = [C.positive_number(op, f"bands[{i}]", c) for i, c in enumerate(bands)]
    if groups is not None and not isinstance(groups, Mapping):
        raise TypeError(f"{op}: argument 'groups' must be a mapping {{label: group}}, got {type(groups).__name__}")
    names = list(sets)
    fams = [str((groups or {}).get(n, n)) for n in names]
    colour = {f: f"C{i}" for i, f in enumerate(dict.fromkeys(fams))}
    fig, (ax,) = _figure(op, 1, (max(6.0, 0.8 * len(names) + 4.2), 4.6))
    lo, hi = 1.0, 1.0
    for i, (name, fam) in enumerate(zip(names, fams)):
        r = zf_ratio(sets[name])
        if r.size == 0:
            continue
        q = np.quantile(r, (0.005, 0.05, 0.5, 0.95, 0.995))
        lo, hi = min(lo, q[0]), max(hi, q[-1])
        parts = ax.violinplot([np.clip(r, q[0], q[-1])], positions=[i], widths=0.8, showextrema=False)
        for body in parts["bodies"]:
            body.set_facecolor(colour[fam])
            body.set_edgecolor(colour[fam])
            body.set_alpha(0.55)
        ax.vlines(i, q[1], q[3], color="k", lw=1.0)
        ax.hlines(q[2], i - 0.25, i + 0.25, color="k", lw=1.5)
        ax.text(i, 0.985, f"{100 * float(np.mean(r < 1)):.0f}% < 1", transform=ax.get_xaxis_transform(),
                ha="center", va="top", fontsize="x-small", color="0.2")
    limits = [(c, 1 / np.sqrt(1 + c), 1 / np.sqrt(1 - c) if c < 1 else None) for c in bands]
    span_lo = min([lo] + [a for _, a, _ in limits])
    span_hi = max([hi] + [b for _, _, b in limits if b is not None and b < 2 * hi])
    pad = 0.04 * (span_hi - span_lo)
    ax.set_ylim(span_lo - pad, span_hi + 4 * pad)  # room for the shares at the top
    ax.axhline(1.0, color="k", lw=1.0, label=r"$\|\tilde f\| = \|z\|$")
    for j, (c, a, b) in enumerate(limits):
        style = {"color": "0.35", "lw": 0.9, "ls": _BAND_STYLES[j % len(_BAND_STYLES)]}
        sign = r"\pm" if c < 1 else "+"  # no upper limit for c >= 1
        ax.axhline(a, label=rf"$1/\sqrt{{1 {sign} c}}$, $c = \varepsilon(h-1) = {c:g}$", **style)
        if b is not None:
            ax.axhline(b, **style)
    ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel(r"$\|\tilde f\| \,/\, \|z\|$ per token")
    handles, labels = ax.get_legend_handles_labels()
    if len(colour) < len(names):
        from matplotlib.patches import Patch

        handles += [Patch(color=c, alpha=0.55) for c in colour.values()]
        labels += list(colour)
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="x-small")
    if title:
        ax.set_title(title)
    if path is not None:
        save_figure(fig, path, dpi=dpi)
    return fig


# --- per-layer violins -----------------------------------------------------------------------------
def _layers(op: str, groups) -> tuple[list[str], list[str], dict]:
    if not isinstance(groups, Mapping) or not groups:
        raise TypeError(f"{op}: argument 'groups' must be a non-empty mapping {{layer: ZFPoints}} or "
                        f"{{layer: {{family: ZFPoints}}}}, got {type(groups).__name__}")
    table, families = {}, []
    for layer, v in groups.items():
        row = {"": v} if isinstance(v, ZFPoints) else v
        if not isinstance(row, Mapping) or not row:
            raise TypeError(f"{op}: argument 'groups[{layer!r}]' must be ZFPoints or a non-empty "
                            f"mapping {{family: ZFPoints}}, got {type(v).__name__}")
        for fam, p in row.items():
            if not isinstance(p, ZFPoints):
                raise TypeError(f"{op}: argument 'groups[{layer!r}][{fam!r}]' must be ZFPoints, "
                                f"got {type(p).__name__}")
            if str(fam) not in families:
                families.append(str(fam))
        table[str(layer)] = {str(k): p for k, p in row.items()}
    if len(families) > 2:
        raise ValueError(f"{op}: argument 'groups' has {len(families)} families {families}; "
                         "half-violins show at most 2 per layer")
    return list(table), families, table


def violin_values(points: ZFPoints, metric: str, *, log: bool = True) -> np.ndarray:
    """The values one violin shows: the finite ones of ``metric``; with ``log``, log10 of the
    positive ones (zeros and infinities cannot be drawn on a log axis and are left out)."""
    C.choice("violin_values", "metric", metric, tuple(VIOLIN_METRICS))
    v = np.asarray(getattr(points, metric), dtype=np.float64)
    v = v[np.isfinite(v)]
    return np.log10(v[v > 0]) if log else v


def plot_zf_violins(groups, *, metrics: Sequence[str] = ("eps_lbo", "nmse"), log: bool = True,
                    xlabel: str = "layer", title: str | None = None, path=None, dpi: int = 150):
    r"""Per-layer violins of :math:`\varepsilon_{LBO}` and NMSE, one panel per metric.

    Parameters
    ----------
    groups : mapping {layer: ZFPoints} or {layer: {family: ZFPoints}}
        Layers in the order given along x. With two families (e.g. ``{"TopK": a,
        "top-AFA": b}``) the first is drawn as the left half of each violin and the second as
        the right half; with one, whole violins. A short line marks each median.
    metrics : names from :data:`VIOLIN_METRICS`.
    log : violins of :math:`\log_{10}` of the values (see :func:`violin_values`).
    xlabel, title, path, dpi : labels; where to save (format from the suffix).

    Returns
    -------
    matplotlib.figure.Figure
    """
    op = "plot_zf_violins"
    layers, families, table = _layers(op, groups)
    if isinstance(metrics, str) or not metrics:
        raise ValueError(f"{op}: argument 'metrics' must be a non-empty list of {list(VIOLIN_METRICS)}, got {metrics!r}")
    for m in metrics:
        C.choice(op, "metrics", m, tuple(VIOLIN_METRICS))
    fig, axes = _figure(op, len(metrics), (max(4.0, 0.9 * len(layers) + 1.5) * len(metrics), 3.8))
    for ax, metric in zip(axes, metrics):
        for i, layer in enumerate(layers):
            for j, fam in enumerate(families):
                p = table[layer].get(fam)
                if p is not None:
                    _violin(ax, violin_values(p, metric, log=log), i, j if len(families) == 2 else None)
        ax.set_xticks(range(len(layers)), layers)
        ax.set_xlim(-0.6, len(layers) - 0.4)
        ax.set_xlabel(xlabel)
        sym = VIOLIN_METRICS[metric]
        ax.set_ylabel(rf"$\log_{{10}}\,{sym}$" if log else rf"${sym}$")
    if families != [""]:
        from matplotlib.patches import Patch

        axes[0].legend(handles=[Patch(color=f"C{j}", alpha=0.6, label=fam or "(unnamed)")
                                for j, fam in enumerate(families)], fontsize="small")
    if title:
        fig.suptitle(title)
    if path is not None:
        save_figure(fig, path, dpi=dpi)
    return fig


def _violin(ax, values: np.ndarray, x: float, half: int | None):
    """One violin at ``x``; ``half`` 0 keeps its left half, 1 its right half, None both."""
    if values.size == 0:
        return
    color = f"C{half or 0}"
    parts = ax.violinplot([values], positions=[x], widths=0.8, showextrema=False)
    for body in parts["bodies"]:
        verts = body.get_paths()[0].vertices
        if half == 0:
            verts[:, 0] = np.minimum(verts[:, 0], x)
        elif half == 1:
            verts[:, 0] = np.maximum(verts[:, 0], x)
        body.set_facecolor(color)
        body.set_edgecolor(color)
        body.set_alpha(0.6)
    lo, hi = (x - 0.3, x) if half == 0 else (x, x + 0.3) if half == 1 else (x - 0.3, x + 0.3)
    ax.hlines(float(np.median(values)), lo, hi, color="k", lw=1.2)


__all__ = ["VIOLIN_METRICS", "have_matplotlib", "plot_zf", "plot_zf_ratio", "plot_zf_violins",
           "save_figure", "violin_values", "z_norm_spread", "zf_ratio"]
