r"""``sae-ref report``: evaluate trained SAEs on held-out activations and write one page.

For each run directory (or SAELens directory), on the last ``eval_rows`` rows of an
activation store (the tail :func:`sae_ref.fit.fit` holds out):

1. the named metrics of :mod:`sae_ref.metrics` (L0, MSE, NMSE, every FVU definition, cosine,
   L2 ratio, relative reconstruction bias, dead and dense latents, the log-density histogram);
2. the AFA view of :mod:`sae_ref.zf`: :math:`\|z\|` against :math:`\|\tilde f\|`, the
   :math:`\varepsilon_{LBO}` and per-token NMSE distributions;
3. downstream, when the store was harvested from the packaged model (or a model is given):
   the sentence embedding recovered against mean and zero ablation on held-out documents;
4. lowest-activation pruning (:mod:`sae_ref.pruning`) of the chosen runs: the four methods
   with frozen statistics from the rows just before the held-out tail, each a sweep of
   (L0, NMSE, downstream) points, and which method gives the lowest NMSE at matched L0;
5. frontier fits (:mod:`sae_ref.frontier`) per family (the training architecture):
   :math:`x = 1/L_0` against the performance hit :math:`1 -` recovered (or NMSE when there is
   no downstream metric), Hill with coefficient 1 (and free, linear and power law when the
   family has enough points), and the ratio of the families' :math:`x_{1/2}`;
6. the papers' claims checked on these numbers (:mod:`sae_ref.findings`), each with its
   measurement, its rule and a verdict.

BatchTopK SAEs are evaluated at the :math:`\theta` of their final weights when their run
records one (:mod:`sae_ref.calibrate`), and the L0 of the running estimate is shown beside it.

The evaluated rows are held out: a run whose record (:func:`sae_ref.fit.trained_rows`) says
it trained on some of them on this store (the same shards, wherever the store lies) is
refused, naming how many rows it held out; runs without such a record (SAELens directories,
runs on another store) are listed on the page as not checked. A run of another ``d`` than
the store's is refused naming both.

Everything lands in ``out``: ``report.md``, ``results.json`` and ``figures/*.png``, each
file written atomically. BatchTopK runs are evaluated with their threshold inference
(:func:`sae_ref.train.inference_config`), so no code depends on the evaluation batch.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sae_ref import _checks as C
from sae_ref.io import _atomic

#: Below this relative spread of ||z|| ((q95 - q05) / median) the ZF figure shows
#: ||f~|| / ||z|| per SAE instead of the scatter (:func:`sae_ref.zf_plots.plot_zf_ratio`).
ZF_CONSTANT_SPREAD = 0.05
#: Parameter grids of the pruning sweeps; ``global_threshold`` is given as quantiles of the
#: reference activations (turned into values once, from the frozen reference).
PRUNE_GRID = {
    "lowest_k": (0, 2, 4, 8, 12, 16),
    "percent_of_max": (0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
    "latent_quantile": (0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
    "global_threshold": (0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
}


@dataclass(frozen=True)
class ReportConfig:
    """What the report evaluates and how.

    eval_rows : the store's last rows, evaluated (fit's held-out tail by default size)
    ref_rows : rows just before them, the frozen reference of the pruning statistics
    batch_size : evaluation batch rows
    prune : run directories to prune ("all", or names; empty: none)
    downstream : "auto" (the packaged model when the store came from it), "none"
    eval_docs : held-out documents of the downstream metric (the corpus' last ones)
    backend, device : where the SAEs run
    nonfinite : "raise" on an evaluation batch with NaN/inf (naming the shard and row), or
        "skip" it
    """

    eval_rows: int = 8192
    ref_rows: int = 16384
    batch_size: int = 1024
    prune: tuple[str, ...] = ()
    downstream: str = "auto"
    eval_docs: int = 64
    backend: str = "numpy"
    device: str | None = None
    nonfinite: str = "raise"
    prune_grid: dict = field(default_factory=lambda: dict(PRUNE_GRID))


def _downstream(store, cfg: ReportConfig, echo):
    """The downstream baseline (:class:`sae_ref.downstream.Baseline`: clean and ablated losses
    computed once), or None."""
    if cfg.downstream == "none":
        return None
    try:
        from sae_ref.data.corpus import stdlib_corpus
        from sae_ref.data.harvest import check_store_matches, load_default_model
        from sae_ref.downstream import Baseline, tokenize
    except ImportError as e:  # the data extra is missing
        echo(f"downstream metric skipped: {e}")
        return None
    meta = store.metadata
    model, tok, name = load_default_model()
    if meta.get("model", {}).get("name") != name:
        echo(f"downstream metric skipped: the store was not harvested from {name}")
        return None
    layer = int(meta["layer"])
    check_store_matches(store, model, layer)
    texts = stdlib_corpus()[-cfg.eval_docs:]
    batches = [tokenize(tok, texts[i:i + 16], max_length=128) for i in range(0, len(texts), 16)]
    return Baseline(model, batches, layer=layer, kind="embedding")


def _recovered(ds, sae_fn) -> dict:
    return ds.recovered(sae_fn)


def _family(loaded) -> str:
    if loaded.train_config is not None:
        return loaded.train_config.arch
    return f"saelens-{loaded.config.activation}"


def _batches(store, cfg, rows, xp, dev, dtype):
    from sae_ref.metrics import store_batches

    return store_batches(store, cfg.batch_size, xp=xp, device=dev, dtype=dtype, rows=rows,
                         nonfinite=cfg.nonfinite)


def heldout_overlaps(runs, store, eval_rows: int) -> list[tuple[str, int]]:
    """``(run, rows it held out)`` for each run that trained on some of the store's last
    ``eval_rows`` rows, by its record (:func:`sae_ref.fit.trained_rows`); runs without a
    record of this store are not listed."""
    from sae_ref.fit import trained_rows

    out = []
    fingerprint = store.fingerprint()
    for r in runs:
        rec = trained_rows(r)
        if rec is None or rec["fingerprint"] != fingerprint:
            continue
        held = store.n_rows - rec["train_rows"][1]
        if eval_rows > held:
            out.append((str(r), held))
    return out


def _unchecked(runs, store) -> list[str]:
    """The runs whose record says nothing of this store's rows (their held-out tail unknown)."""
    from sae_ref.fit import trained_rows

    fingerprint = store.fingerprint()
    return [Path(r).name for r in runs
            if (rec := trained_rows(r)) is None or rec["fingerprint"] != fingerprint]


def evaluate_run(path, store, cfg: ReportConfig, ds=None, *, prune: bool = False) -> dict:
    """Every measurement of one run on the store's held-out tail (see the module docs).

    Returns a dict with ``label``, ``family``, ``metrics`` (summary), ``zf`` (summary),
    ``downstream`` (or None), ``pruning`` (or None), and the host objects ``_metrics``,
    ``_zf`` for the figures.
    """
    from sae_ref.arrays import resolve
    from sae_ref.calibrate import inference_config, read_record
    from sae_ref.fit import load_run
    from sae_ref.metrics import evaluate_store
    from sae_ref.zf import zf_points, zf_summary

    xp, dev = resolve(cfg.backend, cfg.device)
    loaded = load_run(path, xp=xp, device=dev)
    record = read_record(path)
    params, (config, used) = loaded.params, inference_config(loaded, record)
    if params.d != store.d:
        raise ValueError(f"report: run '{path}' has d={params.d} but the store '{store.directory}' "
                         f"has d={store.d}: evaluate it on activations of the model and layer it "
                         "was trained on")
    n = store.n_rows
    rows = (n - cfg.eval_rows, n)
    dt = params.W_enc.dtype
    with C.no_checks():
        m = evaluate_store(params, config, store, batch_size=cfg.batch_size, rows=rows,
                           nonfinite=cfg.nonfinite)
        zf = zf_points(params, config, _batches(store, cfg, rows, xp, dev, dt))
    out = {"label": Path(path).name, "path": str(path), "family": _family(loaded),
           "source": loaded.source, "activation": config.activation, "theta": config.theta,
           "k": config.k, "metrics": {**m.summary(), **l0_quantiles(m.l0_histogram)},
           "zf": zf_summary(zf), "_metrics": m, "_zf": zf,
           "downstream": None, "pruning": None,
           "thetas": _thetas(loaded, record, used, m.l0_mean, rows, lambda: _batches(store, cfg, rows, xp, dev, dt))}
    if ds is not None:
        from sae_ref.downstream import sae_replace

        out["downstream"] = _recovered(ds, sae_replace(params, config))
    if prune:
        out["pruning"] = _prune(params, config, store, cfg, rows, ds, xp, dev, dt)
    return out


def _thetas(loaded, record, used, l0_used, rows, batches) -> dict | None:
    """BatchTopK's two thetas and the L0 each gives on the evaluated rows (None for other SAEs):
    ``used`` ("calibrated", or "running" when the run has no calibration record), ``running``,
    ``calibrated`` ± ``stderr``, ``l0_running``, ``l0_calibrated``, ``k``, and how many of the
    evaluated rows calibrated theta (``calibration_overlap``: then its L0 is in-sample)."""
    from sae_ref.calibrate import mean_l0, threshold_config

    tc = loaded.train_config
    if record is None and not (tc is not None and tc.arch == "batchtopk"):
        return None
    if record is not None and "theta" not in record:  # calibration skipped: the reason
        record = None
    running = loaded.config.theta if record is None else record.get("theta_running")
    out = {"used": used or "running", "running": running,
           "estimator": tc.theta_estimator if tc is not None else (record or {}).get("theta_estimator"),
           "k": tc.k if tc is not None else (record or {}).get("k"),
           "calibrated": None, "stderr": None, "l0_calibrated": None, "l0_running": None,
           "calibration_rows": None, "calibration_overlap": None}
    if record is None:
        out["l0_running"] = l0_used
        return out
    out.update(calibrated=record["theta"], stderr=record["stderr"], l0_calibrated=l0_used,
               calibration_rows=record.get("calibration_rows"))
    if running is not None:
        with C.no_checks():
            out["l0_running"] = mean_l0(loaded.params, threshold_config(loaded.config, running), batches())[0]
    cal = record.get("calibration_rows")
    if cal is not None:
        out["calibration_overlap"] = max(0, min(cal[1], rows[1]) - max(cal[0], rows[0]))
    return out


def l0_quantiles(histogram, qs=(0.05, 0.5, 0.95)) -> dict:
    """The per-sample L0 distribution from its histogram (counts of L0 = 0..h): the std and
    the quantiles ``l0_qNN`` (the smallest L0 whose cumulative share reaches q)."""
    hist = np.asarray(histogram, dtype=np.float64)
    n = hist.sum()
    values = np.arange(hist.shape[0], dtype=np.float64)
    mean = float((values * hist).sum() / n)
    out = {"l0_std": float(np.sqrt((((values - mean) ** 2) * hist).sum() / n))}
    cum = np.cumsum(hist) / n
    for q in qs:
        out[f"l0_q{round(100 * q):02d}"] = int(np.searchsorted(cum, q - 1e-12))
    return out


def _prune(params, config, store, cfg, rows, ds, xp, dev, dt) -> dict:
    from sae_ref import pruning as P
    from sae_ref.arrays import to_numpy
    from sae_ref.sae import encode

    start = max(0, rows[0] - cfg.ref_rows)
    if start == rows[0]:
        raise ValueError("report: no rows before the held-out tail for the pruning reference "
                         f"(eval_rows {cfg.eval_rows} of {store.n_rows})")
    with C.no_checks():
        codes = [encode(params, x, config) for x in _batches(store, cfg, (start, rows[0]), xp, dev, dt)]
    stats = P.reference_stats(codes)
    ref_values = np.concatenate([to_numpy(c.values) for c in codes])
    sweeps = {}
    for method, grid in cfg.prune_grid.items():
        values = list(grid)
        if method == "global_threshold":  # quantiles of the reference activations -> values
            values = [0.0] + [float(np.quantile(ref_values, q)) for q in grid if q > 0]
        downstream = None
        if ds is not None:
            def downstream(pruned):
                from sae_ref.downstream import sae_replace

                return ds.loss(sae_replace(pruned.params, pruned.config, fn=pruned))
        with C.no_checks():
            pts = P.sweep(params, config, _batches(store, cfg, rows, xp, dev, dt), method, values,
                          stats=stats, downstream=downstream)
        sweeps[method] = [p.as_dict() for p in pts]
    best = {"nmse": best_pruning(sweeps, "nmse")}
    if ds is not None:
        best["downstream"] = best_pruning(sweeps, "downstream")
    return {"reference_rows": [start, rows[0]], "sweeps": sweeps, "best": best}


def best_pruning(sweeps: dict, metric: str = "nmse") -> dict:
    r"""The method with the lowest ``metric`` ("nmse" or "downstream") at matched L0.

    Each sweep's :math:`\log_{10}` metric is interpolated linearly in :math:`\log L_0` on
    the L0 range every sweep covers (20 log-spaced points); the method with the smallest mean
    wins. Returns ``{"metric", "l0_range": [lo, hi], "mean_log10": {method: v}, "best": method}``
    (``best`` None when the ranges do not overlap).
    """
    curves = {}
    for method, pts in sweeps.items():
        l0 = np.array([p["l0"] for p in pts], dtype=np.float64)
        nmse = np.array([p[metric] for p in pts], dtype=np.float64)
        ok = (l0 > 0) & (nmse > 0)
        order = np.argsort(l0[ok])
        curves[method] = (np.log10(l0[ok][order]), np.log10(nmse[ok][order]))
    lo = max(c[0][0] for c in curves.values())
    hi = min(c[0][-1] for c in curves.values())
    if not lo < hi:
        return {"metric": metric, "l0_range": None, "mean_log10": {}, "best": None}
    grid = np.linspace(lo, hi, 20)
    means = {m: float(np.mean(np.interp(grid, c[0], c[1]))) for m, c in curves.items()}
    return {"metric": metric, "l0_range": [10**lo, 10**hi], "mean_log10": means,
            "best": min(means, key=means.get)}


def frontier(rows: list[dict]) -> dict:
    r"""Fits of :math:`y` against :math:`x = 1/L_0` per family and the families' comparison.

    ``y`` is the performance hit :math:`1 -` recovered (mean ablation) when every row has a
    downstream metric, else the pooled NMSE. Hill with coefficient 1 always (one parameter);
    linear with 1+ points; free Hill and power law with 3+ points.
    """
    from sae_ref.frontier import FrontierWarning, compare, fit_frontier

    use_ds = all(r["downstream"] is not None for r in rows)
    y_name = "1 - recovered (mean ablation)" if use_ds else "NMSE"
    fams: dict[str, tuple[list, list]] = {}
    for r in rows:
        x = 1.0 / r["metrics"]["l0_mean"] if r["metrics"]["l0_mean"] > 0 else math.nan
        y = 1.0 - r["downstream"]["recovered_mean"] if use_ds else r["metrics"]["nmse"]
        fams.setdefault(r["family"], ([], []))
        fams[r["family"]][0].append(x)
        fams[r["family"]][1].append(y)
    fits, notes = {}, []
    for name, (x, y) in fams.items():
        fits[name] = {}
        models = ["hill1", "linear"] + (["hill", "power"] if len(x) >= 3 else [])
        for model in models:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", FrontierWarning)
                try:
                    fits[name][model] = fit_frontier(np.array(x), np.array(y), model)
                except ValueError as e:
                    notes.append(f"{name} {model}: {e}")
            notes += [f"{name} {model}: {w.message}" for w in caught]
    names = sorted(fams)
    comparisons = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if "hill1" in fits[a] and "hill1" in fits[b]:
                c = compare(fits[a]["hill1"], fits[b]["hill1"])
                comparisons.append({"a": a, "b": b, **asdict(c)})
    return {"y": y_name, "families": {k: {"x": v[0], "y": v[1]} for k, v in fams.items()},
            "fits": fits, "comparisons": comparisons, "notes": notes}


def _expand_sweeps(runs: list[Path], echo) -> list[Path]:
    """Each sweep directory (one with ``sweep.json``, :mod:`sae_ref.sweep`) replaced by its
    members' run directories; a member stopped during the sweep is left out, with a line."""
    from sae_ref.sweep import MANIFEST, load_sweep

    out = []
    for r in runs:
        if not (r / MANIFEST).is_file():
            out.append(r)
            continue
        for m in load_sweep(r)["members"]:
            if m.get("state") == "stopped":
                echo(f"{r / m['dir']}: left out ({m.get('stopped')})")
            else:
                out.append(r / m["dir"])
    return out


def build_report(runs, store, out, *, config: ReportConfig = ReportConfig(), echo=print) -> dict:
    """Evaluate ``runs`` (run, sweep or SAELens directories; a sweep stands for its members) on
    ``store`` and write the report into ``out``; returns the JSON-ready results (also
    ``out/results.json``)."""
    from sae_ref.data.store import ActivationStore

    op = "build_report"
    runs = _expand_sweeps([Path(r) for r in runs], echo)
    if not runs:
        raise ValueError(f"{op}: argument 'runs' is empty")
    C.choice(op, "config.downstream", config.downstream, ("auto", "none"))
    C.choice(op, "config.nonfinite", config.nonfinite, ("raise", "skip"))
    if not isinstance(store, ActivationStore):
        store = ActivationStore(store)
    C.integer_in(op, "config.eval_rows", config.eval_rows, 1, store.n_rows)
    overlaps = heldout_overlaps(runs, store, config.eval_rows)
    if overlaps:
        raise ValueError(f"{op}: argument 'config.eval_rows' ({config.eval_rows}) reaches into "
                         "rows that runs trained on: " + "; ".join(
                             f"'{r}' held out only the last {n} rows" for r, n in overlaps))
    names = [r.name for r in runs]
    unknown = [p for p in config.prune if p != "all" and p not in names]
    if unknown:
        raise ValueError(f"{op}: argument 'prune' names {unknown}, not among the runs {names}")
    t0 = time.perf_counter()
    ds = _downstream(store, config, echo)
    rows = []
    for r in runs:
        t = time.perf_counter()
        prune = "all" in config.prune or r.name in config.prune
        row = evaluate_run(r, store, config, ds, prune=prune)
        rows.append(row)
        echo(f"evaluated {row['label']}: L0 {row['metrics']['l0_mean']:.2f}  NMSE {row['metrics']['nmse']:.4f}"
             + (f"  recovered {row['downstream']['recovered_mean']:.3f}" if row["downstream"] else "")
             + (f"  pruned ({row['pruning']['best']['nmse']['best']} best by NMSE)" if row["pruning"] else "")
             + f"  [{time.perf_counter() - t:.0f} s]")
    front = frontier(rows)
    from sae_ref.findings import findings

    checks = findings(rows, front)
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    figures = _figures(out / "figures", rows, front)
    results = {"store": str(store.directory), "n_rows": store.n_rows,
               "eval_rows": [store.n_rows - config.eval_rows, store.n_rows],
               "heldout_unchecked": _unchecked(runs, store),
               "config": {k: v for k, v in asdict(config).items()},
               "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
               "frontier": {**{k: v for k, v in front.items() if k != "fits"},
                            "fits": {f: {m: fit.as_dict() for m, fit in fs.items()}
                                     for f, fs in front["fits"].items()}},
               "figures": figures, "zf_view": zf_view(rows), "findings": checks, "seconds": time.perf_counter() - t0}
    _atomic.atomic_write_bytes(out / "results.json", json.dumps(results, indent=2, default=_json).encode())
    from sae_ref.report_page import markdown

    _atomic.atomic_write_bytes(out / "report.md", markdown(results).encode())
    return results


def _json(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON-serialisable: {type(v).__name__}")


def zf_view(rows) -> dict:
    """Which ZF figure the report draws: ``{"view": "ratio" | "scatter", "z_spread": s, "space"}``,
    the ratio view when the relative spread of ||z|| over all tokens is below
    :data:`ZF_CONSTANT_SPREAD`."""
    from sae_ref.zf_plots import z_norm_spread

    spread = z_norm_spread({r["label"]: r["_zf"] for r in rows})
    return {"view": "ratio" if spread < ZF_CONSTANT_SPREAD else "scatter", "z_spread": spread,
            "space": sorted({r["_zf"].space for r in rows}), "d": int(rows[0]["_metrics"].d)}


def _figures(d: Path, rows, front) -> dict:
    """Draw every figure into ``d`` (nothing without matplotlib); names relative to the page."""
    from sae_ref.zf_plots import have_matplotlib

    if not have_matplotlib():
        return {}
    from sae_ref import frontier_plots as FP
    from sae_ref.metrics import plot_log_density
    from sae_ref.zf_plots import plot_zf, plot_zf_ratio, plot_zf_violins

    figs = {}
    zf = {r["label"]: r["_zf"] for r in rows}
    if zf_view(rows)["view"] == "ratio":  # ||z|| one value (standardised inputs): show what varies
        plot_zf_ratio(zf, groups={r["label"]: r["family"] for r in rows}, path=d / "zf.png",
                      title=r"$\|\tilde f\| / \|z\|$ per held-out token (" + zf[rows[0]["label"]].space + " space)")
        plot_zf(zf, path=d / "zf_scatter.png", title="||z|| against ||f~|| (held-out tokens)")
        figs["zf_scatter"] = "figures/zf_scatter.png"
    else:
        plot_zf(zf, path=d / "zf.png", title="||z|| against ||f~|| (held-out tokens)")
    plot_zf_violins({r["label"]: r["_zf"] for r in rows}, xlabel="SAE", path=d / "zf_violins.png")
    figs["zf"], figs["zf_violins"] = "figures/zf.png", "figures/zf_violins.png"
    fams: dict[str, tuple[list, list]] = {}
    for r in rows:
        fams.setdefault(r["family"], ([], []))
        fams[r["family"]][0].append(r["metrics"]["l0_mean"])
        fams[r["family"]][1].append(r["metrics"]["nmse"])
    FP.plot_l0_frontier({k: (np.array(a), np.array(b)) for k, (a, b) in fams.items()}, metric="NMSE",
                        path=d / "l0_frontier.png")
    figs["l0_frontier"] = "figures/l0_frontier.png"
    pts = {k: (np.array(v["x"]), np.array(v["y"])) for k, v in front["families"].items()}
    # the Hill curves (the linear fit reaches 1/2 at x_half / 2: its mark would mislead)
    fits = {k: [f for m, f in v.items() if m in ("hill1", "hill")] for k, v in front["fits"].items() if v}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        FP.plot_hit_plane(pts, fits, path=d / "hit_plane.png")
    figs["hit_plane"] = "figures/hit_plane.png"
    for r in rows:
        if r["pruning"] is not None:
            from sae_ref.pruning import PruningPoint

            sw = {m: [PruningPoint(**p) for p in v if p["l0"] > 0 and p["nmse"] > 0]  # log axes
                  for m, v in r["pruning"]["sweeps"].items()}
            name = f"pruning_{r['label']}.png"
            FP.plot_pruning_sweep(sw, title=f"pruning {r['label']}", path=d / name)
            figs[f"pruning_{r['label']}"] = f"figures/{name}"
        name = f"density_{r['label']}.png"
        plot_log_density(r["_metrics"], path=d / name, title=r["label"])
        figs[f"density_{r['label']}"] = f"figures/{name}"
    return figs
