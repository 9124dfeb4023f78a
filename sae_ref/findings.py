r"""The papers' claims, checked on a report's SAEs.

Each check turns one published claim into a measurement on the evaluated rows and a verdict
by a stated rule: ``"reproduced"``, ``"not reproduced"`` or ``"not decidable"`` (some SAEs one
way and some the other, a difference within its error, or the report lacks what the check
needs: the reason says which). Small
runs on small data decide little: the page prints the numbers beside each verdict.

Comparisons at matched sparsity interpolate the reference family's metric at the other
SAE's L0, linearly in log–log coordinates between the reference's neighbouring points
(:func:`interpolate_at_l0`):

.. math:: \log y(L) = \log y_i + \frac{\log L - \log L_i}{\log L_{i+1} - \log L_i}
          \left(\log y_{i+1} - \log y_i\right), \qquad L_i \le L \le L_{i+1},

and nothing outside the reference's L0 range (no extrapolation).

>>> round(float(interpolate_at_l0([4.0, 16.0], [0.4, 0.1], 8.0)), 12)  # sqrt(0.4 * 0.1)
0.2
"""

from __future__ import annotations

import math

import numpy as np

#: Verdicts a check can give.
VERDICTS = ("reproduced", "not reproduced", "not decidable")
#: BatchTopK's inference L0 counts as "k" within this relative tolerance.
L0_TOLERANCE = 0.03
#: AFA: a SAE's tokens are "near y = x" when at least this share lies inside band c = 0.5.
AFA_INSIDE = 0.9


def interpolate_at_l0(l0, y, at):
    r"""``y`` of a family interpolated at L0 ``at`` (log–log linear between its points; NaN
    outside their L0 range). Points with a non-positive L0 or y are left out."""
    l0 = np.asarray(l0, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if l0.shape != y.shape or l0.ndim != 1:
        raise ValueError(f"interpolate_at_l0: arguments 'l0' and 'y' must be 1-D of one length, "
                         f"got shapes {l0.shape} and {y.shape}")
    ok = (l0 > 0) & (y > 0) & np.isfinite(l0) & np.isfinite(y)
    order = np.argsort(l0[ok])
    lx, ly = np.log(l0[ok][order]), np.log(y[ok][order])
    at = np.asarray(at, dtype=np.float64)
    if lx.size == 0:
        return np.full(at.shape, np.nan)
    la = np.log(np.where(at > 0, at, np.nan))
    inside = (la >= lx[0]) & (la <= lx[-1])
    return np.where(inside, np.exp(np.interp(la, lx, ly)), np.nan)


def _verdict(flags: list[bool], empty_reason: str) -> tuple[str, str | None]:
    if not flags:
        return "not decidable", empty_reason
    if all(flags):
        return "reproduced", None
    if not any(flags):
        return "not reproduced", None
    return "not decidable", "some SAEs agree with the claim and some do not"


def _families(rows) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["family"], []).append(r)
    return out


def matched_l0(rows, value, *, family: str = "batchtopk", reference: str = "topk") -> list[dict]:
    """Per SAE of ``family``: its L0 and ``value(row)``, the reference family's value
    interpolated at that L0 (:func:`interpolate_at_l0`) and their ratio (NaN outside the
    reference's L0 range)."""
    fams = _families(rows)
    ref = fams.get(reference, [])
    ref_l0 = [r["metrics"]["l0_mean"] for r in ref]
    ref_y = [value(r) for r in ref]
    out = []
    for r in fams.get(family, []):
        l0, y = r["metrics"]["l0_mean"], value(r)
        y_ref = float(interpolate_at_l0(ref_l0, ref_y, l0)) if ref else math.nan
        out.append({"label": r["label"], "l0": l0, "value": y, "reference": y_ref,
                    "ratio": y / y_ref if y_ref > 0 else math.nan})
    return out


def _finding(claim, source, measure, verdict, reason, values, rule) -> dict:
    return {"claim": claim, "source": source, "measure": measure, "verdict": verdict,
            "reason": reason, "rule": rule, "values": values}


def check_matched(rows, metric: str) -> dict:
    """Bussmann et al.: BatchTopK reconstructs better than TopK at the same mean L0."""
    if metric == "nmse":
        value, what = (lambda r: r["metrics"]["nmse"]), "NMSE"
    else:
        value, what = (lambda r: 1.0 - r["downstream"]["recovered_mean"]), "1 − recovered (mean abl.)"
    if metric != "nmse" and not all(r["downstream"] for r in rows):
        pts = []
    else:
        pts = matched_l0(rows, value)
    used = [p for p in pts if math.isfinite(p["ratio"])]
    verdict, reason = _verdict([p["ratio"] < 1 for p in used],
                               "no BatchTopK SAE has an L0 inside the TopK SAEs' L0 range"
                               if pts else "needs TopK and BatchTopK SAEs" + ("" if metric == "nmse" else " with the downstream metric"))
    return _finding(f"BatchTopK has a lower {what} than TopK at the same mean L0",
                    "Bussmann et al. 2024 (BatchTopK)",
                    f"{what} of each BatchTopK SAE / TopK's {what} interpolated (log–log) at its L0",
                    verdict, reason, pts, "reproduced if every ratio < 1, not reproduced if every ratio > 1")


def check_theta_l0(rows) -> dict:
    """Bussmann et al.: with θ, BatchTopK's average L0 is set directly by k."""
    pts = []
    for r in rows:
        t = r.get("thetas")
        if not t or not t.get("k"):
            continue
        k = t["k"]
        pts.append({"label": r["label"], "k": k, "used": t["used"],
                    "l0": r["metrics"]["l0_mean"], "off": r["metrics"]["l0_mean"] / k - 1,
                    "l0_running": t.get("l0_running"),
                    "off_running": None if t.get("l0_running") is None else t["l0_running"] / k - 1})
    verdict, reason = _verdict([abs(p["off"]) <= L0_TOLERANCE for p in pts], "no BatchTopK SAE")
    return _finding("BatchTopK's average L0 at inference is k (the threshold θ replaces the batch selection)",
                    "Bussmann et al. 2024 (BatchTopK)",
                    "held-out mean L0 / k − 1 with the θ the metrics use (and with the running estimate)",
                    verdict, reason, pts, f"reproduced if every |L0/k − 1| ≤ {L0_TOLERANCE:.0%}")


def check_variable_l0(rows) -> dict:
    """Bussmann et al.: BatchTopK uses a variable number of latents per sample (TopK: exactly k)."""
    pts = [{"label": r["label"], "family": r["family"], "l0": r["metrics"]["l0_mean"],
            "l0_std": r["metrics"].get("l0_std"), "q05": r["metrics"].get("l0_q05"),
            "q95": r["metrics"].get("l0_q95")}
           for r in rows if r["family"] in ("topk", "batchtopk")]
    bt = [p for p in pts if p["family"] == "batchtopk" and p["l0_std"] is not None]
    verdict, reason = _verdict([p["l0_std"] > 0 and p["q95"] > p["q05"] for p in bt], "no BatchTopK SAE")
    return _finding("BatchTopK gives each sample its own number of latents (TopK: k for every sample)",
                    "Bussmann et al. 2024 (BatchTopK)", "per-token L0: std and q05–q95",
                    verdict, reason, pts, "reproduced if every BatchTopK SAE's q05 < q95")


def check_top_afa_l0(rows) -> dict:
    """Lee et al.: top-AFA chooses each sample's number of latents (no k), while TopK keeps
    exactly k for every sample."""
    pts = [{"label": r["label"], "family": r["family"], "l0": r["metrics"]["l0_mean"],
            "q05": r["metrics"].get("l0_q05"), "q95": r["metrics"].get("l0_q95")}
           for r in rows if r["family"] in ("topk", "top-afa")]
    afa = [p for p in pts if p["family"] == "top-afa" and p["q05"] is not None]
    tk = [p for p in pts if p["family"] == "topk" and p["q05"] is not None]
    if not afa or not tk:
        return _finding("top-AFA's L0 varies per sample while TopK's does not",
                        "Lee et al. 2025 (AFA)", "per-token L0: q05–q95", "not decidable",
                        "needs a top-AFA and a TopK SAE in the report", pts,
                        "reproduced if every top-AFA SAE has q05 < q95 and every TopK SAE q05 = q95")
    flags = [p["q95"] > p["q05"] for p in afa] + [p["q95"] == p["q05"] for p in tk]
    verdict, reason = _verdict(flags, "")
    return _finding("top-AFA's L0 varies per sample while TopK's does not", "Lee et al. 2025 (AFA)",
                    "per-token L0: q05–q95", verdict, reason, pts,
                    "reproduced if every top-AFA SAE has q05 < q95 and every TopK SAE q05 = q95")


def check_pruning(rows) -> list[dict]:
    """Riggs Smith: of the four ways to remove the lowest activations, one global threshold is best."""
    out = []
    for metric in ("nmse", "downstream"):
        pts = []
        for r in rows:
            best = (r.get("pruning") or {}).get("best", {}).get(metric)
            if best is not None and best["best"] is not None:
                pts.append({"label": r["label"], "best": best["best"], "l0_range": best["l0_range"],
                            "mean_log10": best["mean_log10"]})
        verdict, reason = _verdict([p["best"] == "global_threshold" for p in pts],
                                   "no pruned SAE" + ("" if metric == "nmse" else " with the downstream metric"))
        what = "NMSE" if metric == "nmse" else "downstream loss"
        out.append(_finding(f"Removing lowest activations: one global threshold gives the lowest {what} "
                            "of the four methods at matched L0", "Riggs Smith 2024",
                            f"mean log10 {what} over the L0 range all four sweeps cover",
                            verdict, reason, pts, "reproduced if global_threshold is lowest for every pruned SAE"))
    return out


def check_afa(rows) -> dict:
    """Lee et al.: ‖f̃‖ is approximated by ‖z‖ (tokens near y = x, inside the ε(h−1) bands)."""
    pts = []
    for r in rows:
        z = r.get("zf")
        if not z:
            continue
        pts.append({"label": r["label"], "inside_0.5": 1.0 - z["frac_outside"]["0.5"],
                    "under": z["frac_under"], "ratio_q50": (z.get("ratio") or {}).get("q50"),
                    "eps_h1": z["eps"]["eps_h1"]})
    verdict, reason = _verdict([p["inside_0.5"] >= AFA_INSIDE for p in pts], "no ZF points")
    return _finding("‖f̃‖ ≈ ‖z‖: a trained SAE's tokens lie near y = x, inside the band ε(h−1) = 0.5",
                    "Lee et al. 2025 (AFA)", "share of tokens inside band c = 0.5; median ‖f̃‖/‖z‖; share under-activated",
                    verdict, reason, pts, f"reproduced if every SAE has ≥ {AFA_INSIDE:.0%} of its tokens inside, "
                    f"not reproduced if none has")


def check_hill(front) -> dict:
    """Bostock: the Hill curve's x½ compares families; here BatchTopK against TopK."""
    pts = [c for c in front.get("comparisons", []) if {c["a"], c["b"]} == {"batchtopk", "topk"}]
    vals = []
    for c in pts:
        r, se = (c["ratio"], c["stderr"]) if c["a"] == "batchtopk" else (1 / c["ratio"], c["stderr"] / c["ratio"] ** 2)
        vals.append({"ratio": r, "stderr": se, "y": front.get("y")})
    flags = [v["ratio"] - 2 * v["stderr"] > 1 for v in vals if math.isfinite(v["stderr"])]
    against = [v["ratio"] + 2 * v["stderr"] < 1 for v in vals if math.isfinite(v["stderr"])]
    if not vals:
        verdict, reason = "not decidable", "needs Hill fits of both TopK and BatchTopK"
    elif flags and all(flags):
        verdict, reason = "reproduced", None
    elif against and all(against):
        verdict, reason = "not reproduced", None
    else:
        verdict, reason = "not decidable", "the ratio is within two standard errors of 1 (or has none)"
    return _finding("On the (1/L0, hit) plane BatchTopK's Hill x½ exceeds TopK's (more sparsity for half the hit)",
                    "Bussmann et al. 2024, measured the way Bostock 2024 proposes (Hill, n = 1)",
                    "x½(BatchTopK) / x½(TopK) ± standard error", verdict, reason, vals,
                    "reproduced if ratio − 2 se > 1, not reproduced if ratio + 2 se < 1, else not decidable")


def findings(rows, front) -> list[dict]:
    """Every check on a report's rows (:func:`sae_ref.report.evaluate_run` dicts) and frontier."""
    return [check_matched(rows, "nmse"), check_matched(rows, "downstream"), check_hill(front),
            check_theta_l0(rows), check_variable_l0(rows), check_top_afa_l0(rows),
            *check_pruning(rows), check_afa(rows)]


__all__ = ["AFA_INSIDE", "L0_TOLERANCE", "VERDICTS", "check_afa", "check_hill", "check_matched",
           "check_pruning", "check_theta_l0", "check_top_afa_l0", "check_variable_l0", "findings", "interpolate_at_l0",
           "matched_l0"]
