"""The report's page: :func:`markdown` renders the results of
:func:`sae_ref.report.build_report` as Markdown tables and figure links."""

from __future__ import annotations

import math

from sae_ref.fvu import DEFINITIONS


def _f(v, spec=".4f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, spec)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + \
           ["| " + " | ".join(r) + " |" for r in rows]


def _fig(results, key, alt) -> list[str]:
    path = results["figures"].get(key)
    return ["", f"![{alt}]({path})"] if path else []


def _metrics(results) -> list[str]:
    runs = results["runs"]
    head = ["SAE", "family", "inference", "L0", "L0 q05–q95", "NMSE", "FVU pooled", "cosine", "L2 ratio",
            "rel. bias", "dead", "dense >1%", "dense >10%", "recovered (mean abl.)", "recovered (zero abl.)"]
    rows = []
    for r in runs:
        m, ds = r["metrics"], r["downstream"] or {}
        inf = r["activation"] + (f" θ={r['theta']:.4g}" if r["theta"] is not None else "")
        rows.append([r["label"], r["family"], inf, _f(m["l0_mean"], ".2f"),
                     f"{m['l0_q05']}–{m['l0_q95']}", _f(m["nmse"]),
                     _f(m["fvu_pooled"]), _f(m["cosine_similarity"]), _f(m["l2_ratio"]),
                     _f(m["relative_reconstruction_bias"]), str(m["n_dead"]), str(m["n_dense_1pct"]),
                     str(m["n_dense_10pct"]), _f(ds.get("recovered_mean"), ".3f"),
                     _f(ds.get("recovered_zero"), ".3f")])
    window = runs[0]["metrics"]["dead_window_tokens"]
    out = ["## Metrics", "", (f"Dead: no activation in the {window:,} evaluated tokens; dense: "
           "firing on more than 1% / 10% of them. NMSE = Σ‖x − x̂‖² / Σ‖x‖²; FVU pooled = "
           "Σ‖x − x̂‖² / Σ‖x − x̄‖² (x̄ the mean of the evaluated tokens). Recovered: "
           "(L_abl − L_sae) / (L_abl − L_clean) of the sentence embedding (1 − cos)."), ""]
    out += _table(head, rows)
    out += ["", "Every FVU definition (see `sae_ref.fvu` for which library uses which):", ""]
    out += _table(["SAE"] + list(DEFINITIONS),
                  [[r["label"]] + [_f(r["metrics"].get("fvu_" + d)) for d in DEFINITIONS] for r in runs])
    for r in runs:
        out += _fig(results, f"density_{r['label']}", f"latent density {r['label']}")
    return out


def _theta(results) -> list[str]:
    runs = [r for r in results["runs"] if r.get("thetas")]
    if not runs:
        return []
    rows, notes = [], []
    for r in runs:
        t = r["thetas"]
        k = t["k"]

        def off(l0):
            return "–" if l0 is None or not k else f"{100 * (l0 / k - 1):+.1f}%"
        cal = "–" if t["calibrated"] is None else f"{t['calibrated']:.4g} ± {_f(t['stderr'], '.1g')}"
        rows.append([r["label"], str(k), f"{_f(t['running'], '.4g')} ({t['estimator'] or '?'})",
                     _f(t["l0_running"], ".2f"), off(t["l0_running"]), cal,
                     _f(t["l0_calibrated"], ".2f"), off(t["l0_calibrated"]), t["used"]])
        if t["calibrated"] is None:
            notes.append(f"- {r['label']}: no θ of the final weights recorded (a run of an older "
                         f"sae-ref, or no held-out rows); `sae-ref calibrate {r['label']} --data STORE` adds it.")
        elif t["calibration_overlap"]:
            notes.append(f"- {r['label']}: θ was calibrated on {t['calibration_overlap']:,} of the "
                         "evaluated rows: its L0 here is partly in-sample.")
    out = ["## BatchTopK's θ: running estimate and final model", "",
           ("θ = E_X[min kept activation] of a batch of the training size. The running estimate "
            "averages the minima of past training steps (earlier weights); the final model's θ is "
            "the mean over calibration batches the training did not use, of the final weights' "
            "minima (± its standard error). L0 on the evaluated rows with each; the metrics below "
            "use the θ in the last column."), ""]
    out += _table(["SAE", "k", "θ running (estimator)", "L0", "vs k", "θ final model", "L0", "vs k",
                   "used below"], rows)
    return out + ([""] + notes if notes else [])


def _zf(results) -> list[str]:
    rows = []
    for r in results["runs"]:
        z = r["zf"]
        rows.append([r["label"], _f(z["eps"]["eps_h1"], ".1f"), _f(z["eps_lbo"].get("q50"), ".2e"),
                     _f(z["eps_lbo"].get("q95"), ".2e"), _f(z["frac_under"], ".3f"), _f(z["frac_over"], ".3f"),
                     _f(z["frac_outside"].get("0.5"), ".3f"), _f(z["frac_outside"].get("1.0"), ".3f"),
                     _f(z["nmse"].get("mean")), _f(z["l0_mean"], ".1f")])
    out = ["## AFA: ‖z‖ against ‖f̃‖", "", ("f̃: the features times their decoder row norms, with "
           "‖b_dec‖ as one more coefficient; under: ‖f̃‖ < ‖z‖ (under-activated). Outside c: outside "
           "the band ‖z‖/√(1+c) ≤ ‖f̃‖ ≤ ‖z‖/√(1−c). ε(h−1): the decoder's measured quasi-orthogonality "
           f"times h − 1. Space: {results['runs'][0]['zf']['space']}."), ""]
    out += _table(["SAE", "ε(h−1)", "εLBO median", "εLBO q95", "under", "over", "outside c=0.5",
                   "outside c=1", "NMSE per token (mean)", "L0"], rows)
    return out + _zf_caption(results) + _fig(results, "zf", "ZF plot") + _fig(results, "zf_violins", "ZF violins")


def _zf_caption(results) -> list[str]:
    v = results.get("zf_view")
    if not v:
        return []
    space = "/".join(v["space"])
    if v["view"] == "ratio":
        d = v.get("d")
        return ["", (f"The figure: ‖f̃‖/‖z‖ per token, one violin per SAE (median, 5–95% bar), "
                f"against 1 and the band limits 1/√(1 ± c). Why not ‖z‖ against ‖f̃‖: z lives in "
                f"the {space} space, where each token is centred and scaled to unit std, so every "
                f"‖z‖ is √(d − 1)" + (f" = {math.sqrt(d - 1):.2f} (d = {d})" if d else "")
                + f" up to the 1e-5 in the std (relative spread {v['z_spread']:.1e}); the scatter "
                "is one column there and its points overlap. Dividing by ‖z‖ keeps everything "
                "that varies: a token is inside band c exactly when its ratio is between the "
                "limits, and under-activated when it is below 1 (the share written at the top)."
                + (" The scatter itself: `figures/zf_scatter.png`." if "zf_scatter" in results["figures"] else ""))]
    return ["", f"The figure: ‖z‖ against ‖f̃‖ per token in the {space} space, with y = x and the bands."]



def _pruning(results) -> list[str]:
    out = []
    for r in results["runs"]:
        p = r["pruning"]
        if p is None:
            continue
        out += ["", f"### Pruning {r['label']}", "",
                f"Statistics frozen on reference rows {p['reference_rows'][0]:,}–{p['reference_rows'][1]:,}."]
        for best in p["best"].values():
            if best["best"] is None:
                out += [f"- {best['metric']}: the sweeps' L0 ranges do not overlap."]
                continue
            lo, hi = best["l0_range"]
            out += [f"- lowest {best['metric']} at matched L0 ({lo:.1f}–{hi:.1f}): **{best['best']}** "
                    "(mean log10 " + best["metric"] + ": "
                    + ", ".join(f"{m} {v:.4f}" for m, v in best["mean_log10"].items()) + ")"]
        out += [""]
        rows = [[m, _f(pt["value"], ".4g"), _f(pt["l0"], ".2f"), _f(pt["nmse"]), _f(pt["fvu"]),
                 _f(pt["downstream"])] for m, pts in p["sweeps"].items() for pt in pts]
        out += _table(["method", "parameter", "L0", "NMSE", "FVU", "downstream loss"], rows)
        out += _fig(results, f"pruning_{r['label']}", f"pruning {r['label']}")
    return (["## Removing lowest activations"] + out) if out else []


def _frontier(results) -> list[str]:
    fr = results["frontier"]
    out = ["## Sparsity–performance frontier", "", (f"x = 1/L0, y = {fr['y']}; fits by "
           "Levenberg–Marquardt from closed-form starts (standard errors from s²(JᵀJ)⁻¹)."), ""]
    rows = []
    for fam, fits in fr["fits"].items():
        for model, f in fits.items():
            params = ", ".join(f"{k} = {v:.4g} ± {_f(f['stderr'].get(k), '.2g')}" for k, v in f["params"].items())
            rows.append([fam, model, str(f["n_used"]), _f(f["x_half"], ".4g"), _f(f["x_half_stderr"], ".2g"),
                         params, _f(f["rss"], ".3g")])
    out += _table(["family", "model", "points", "x½", "± se", "parameters", "RSS"], rows)
    for c in fr["comparisons"]:
        out += ["", (f"x½({c['a']}) / x½({c['b']}) = **{c['ratio']:.3f} ± {c['stderr']:.3f}** "
                f"(Hill, n = 1; > 1: {c['a']} takes the larger sparsity for half the hit).")]
    out += [f"- {n}" for n in fr["notes"]] if fr["notes"] else []
    return out + _fig(results, "hit_plane", "hit plane") + _fig(results, "l0_frontier", "L0 frontier")


def _value_text(f) -> str:
    """One line of a finding's numbers."""
    def pct(v):
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:+.1f}%"
    parts = []
    for v in f["values"]:
        if "ratio" in v and "label" in v:
            parts.append(f"{v['label']}: L0 {v['l0']:.2f}, {v['value']:.4g} vs {_f(v['reference'], '.4g')} "
                         f"(ratio {_f(v['ratio'], '.3f')})")
        elif "ratio" in v:
            parts.append(f"x½ ratio {v['ratio']:.3f} ± {_f(v['stderr'], '.2g')} (y = {v['y']})")
        elif "off" in v:
            parts.append(f"{v['label']}: L0 {v['l0']:.2f} for k = {v['k']} ({pct(v['off'])}, θ {v['used']}; "
                         f"running θ {pct(v['off_running'])})")
        elif "l0_std" in v:
            parts.append(f"{v['label']}: std {_f(v['l0_std'], '.2f')}, q05–q95 {v['q05']}–{v['q95']}")
        elif "best" in v:
            parts.append(f"{v['label']}: {v['best']} (L0 {v['l0_range'][0]:.1f}–{v['l0_range'][1]:.1f})")
        elif "inside_0.5" in v:
            parts.append(f"{v['label']}: inside {100 * v['inside_0.5']:.0f}%, under {100 * v['under']:.0f}%, "
                         f"median ratio {_f(v['ratio_q50'], '.3f')}")
    return "; ".join(parts)


def _findings(results) -> list[str]:
    fs = results.get("findings")
    if not fs:
        return []
    out = ["## The papers' claims, checked", "",
           ("Each claim measured on the evaluated rows, with the rule that gives its verdict. Few, "
            "short-trained SAEs on a small store decide little: read the numbers, not only the "
            "verdicts."), ""]
    out += _table(["claim", "source", "verdict"],
                  [[f["claim"], f["source"], f"**{f['verdict']}**"] for f in fs])
    out += [""]
    for f in fs:
        line = f"- *{f['claim']}* — {f['measure']}; {f['rule']}."
        if f["reason"]:
            line += f" {f['verdict'].capitalize()}: {f['reason']}."
        vals = _value_text(f)
        out += [line + (f" Measured: {vals}." if vals else "")]
    return out


def _heldout_note(results) -> str:
    unchecked = results.get("heldout_unchecked", [])
    if not unchecked:
        return "No run trained on these rows (each run's record of this store says so)."
    others = len(results["runs"]) - len(unchecked)
    return (f"Not checked to be held out for {', '.join(unchecked)}: no record of training on "
            "this store (a SAELens directory, a run on another store, or of an older sae-ref)"
            + ("; the other runs did not train on these rows." if others else "."))


def markdown(results: dict) -> str:
    """The page, from the JSON-ready results."""
    lo, hi = results["eval_rows"]
    lines = ["# sae-ref report", "",
             (f"Store `{results['store']}`: held-out rows {lo:,}–{hi:,} ({hi - lo:,} tokens). "
             f"{len(results['runs'])} SAE(s); {results['seconds']:.0f} s."), "",
             _heldout_note(results), ""]
    lines += _findings(results) + [""] + _theta(results) + [""] + _metrics(results) + [""] + _zf(results) + [""] + _pruning(results) + [""] + _frontier(results)
    return "\n".join(lines) + "\n"
