"""The papers' claims checked in the report (sae_ref.findings): the arithmetic of matched-L0
comparisons and each verdict rule on hand-made report rows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sae_ref.findings import (check_afa, check_hill, check_matched, check_pruning, check_theta_l0,
                              check_variable_l0, findings, interpolate_at_l0, matched_l0)


def _row(label, family, l0, nmse, *, recovered=None, thetas=None, std=1.0, q=(1, 9), zf=None, pruning=None):
    return {"label": label, "family": family,
            "metrics": {"l0_mean": l0, "nmse": nmse, "l0_std": std, "l0_q05": q[0], "l0_q95": q[1]},
            "downstream": None if recovered is None else {"recovered_mean": recovered},
            "thetas": thetas, "zf": zf, "pruning": pruning}


def test_interpolation_at_matched_l0_is_linear_in_log_log_as_computed_by_hand():
    """TopK at L0 (4, 16, 64) with NMSE (0.4, 0.1, 0.05): at L0 8, log-midpoint of 4 and 16,
    NMSE is sqrt(0.4 * 0.1) = 0.2; at L0 32, log-midpoint of 16 and 64, sqrt(0.1 * 0.05);
    at L0 16 a point itself; outside [4, 64] nothing (no extrapolation)."""
    l0, y = [16.0, 4.0, 64.0], [0.1, 0.4, 0.05]  # unsorted on purpose
    got = interpolate_at_l0(l0, y, np.array([8.0, 32.0, 16.0, 2.0, 100.0]))
    assert got[0] == pytest.approx(0.2, rel=1e-12)
    assert got[1] == pytest.approx(math.sqrt(0.005), rel=1e-12)
    assert got[2] == pytest.approx(0.1, rel=1e-12)
    assert np.isnan(got[3]) and np.isnan(got[4])
    # a third of the way in log: 4 * 4**(1/3); y = 0.4 * (0.1/0.4)**(1/3)
    assert float(interpolate_at_l0(l0, y, 4 * 4 ** (1 / 3))) == pytest.approx(0.4 * 0.25 ** (1 / 3), rel=1e-12)


def test_matched_l0_ratios_against_the_hand_computed_interpolation():
    """A BatchTopK SAE at L0 8 with NMSE 0.15 against TopK's 0.2 interpolated there: ratio 0.75;
    one at L0 2 (outside TopK's range) has no ratio; a verdict from the matched one only."""
    rows = [_row("t4", "topk", 4.0, 0.4), _row("t16", "topk", 16.0, 0.1),
            _row("b8", "batchtopk", 8.0, 0.15), _row("b2", "batchtopk", 2.0, 0.5)]
    pts = {p["label"]: p for p in matched_l0(rows, lambda r: r["metrics"]["nmse"])}
    assert pts["b8"]["reference"] == pytest.approx(0.2) and pts["b8"]["ratio"] == pytest.approx(0.75)
    assert math.isnan(pts["b2"]["ratio"])
    assert check_matched(rows, "nmse")["verdict"] == "reproduced"
    rows[2]["metrics"]["nmse"] = 0.25  # worse than TopK at matched L0
    assert check_matched(rows, "nmse")["verdict"] == "not reproduced"


def test_matched_verdicts_mixed_and_not_checked():
    """One BatchTopK better and one worse is mixed; no overlap in L0, or no downstream metric,
    is not checked with the reason."""
    rows = [_row("t4", "topk", 4.0, 0.4, recovered=0.6), _row("t16", "topk", 16.0, 0.1, recovered=0.9),
            _row("b8", "batchtopk", 8.0, 0.15, recovered=0.85), _row("b12", "batchtopk", 12.0, 0.2, recovered=0.7)]
    assert check_matched(rows, "nmse")["verdict"] == "not decidable"
    # downstream: y = 1 - recovered; TopK at 8: sqrt(0.4 * 0.1) = 0.2 against 0.15
    ds = check_matched(rows, "downstream")
    assert ds["values"][0]["reference"] == pytest.approx(0.2) and ds["values"][0]["value"] == pytest.approx(0.15)
    far = [_row("t4", "topk", 4.0, 0.4), _row("t8", "topk", 8.0, 0.2), _row("b64", "batchtopk", 64.0, 0.05)]
    f = check_matched(far, "nmse")
    assert f["verdict"] == "not decidable" and "L0 range" in f["reason"]
    assert check_matched(far, "downstream")["verdict"] == "not decidable"


def test_theta_l0_verdict_uses_the_three_percent_tolerance_on_the_theta_in_use():
    """L0 7.9 for k = 8 (-1.25%) is within 3%; 7.0 (-12.5%) is not; the running theta's
    miss is reported but does not decide."""
    th = {"k": 8, "used": "calibrated", "l0_running": 7.0}
    ok = [_row("b8", "batchtopk", 7.9, 0.2, thetas=th)]
    f = check_theta_l0(ok)
    assert f["verdict"] == "reproduced"
    assert f["values"][0]["off"] == pytest.approx(-0.0125) and f["values"][0]["off_running"] == pytest.approx(-0.125)
    bad = [_row("b8", "batchtopk", 7.0, 0.2, thetas={**th, "used": "running"})]
    assert check_theta_l0(bad)["verdict"] == "not reproduced"
    assert check_theta_l0([_row("t8", "topk", 8.0, 0.2)])["verdict"] == "not decidable"


def test_variable_l0_pruning_and_afa_rules():
    """BatchTopK with q05 < q95 varies per sample; global_threshold best for every pruned SAE
    supports Riggs Smith; AFA needs 90% of tokens inside band 0.5 for every SAE."""
    rows = [_row("t8", "topk", 8.0, 0.2, std=0.0, q=(8, 8)), _row("b8", "batchtopk", 8.0, 0.2, std=2.0, q=(4, 12))]
    assert check_variable_l0(rows)["verdict"] == "reproduced"
    rows[1]["metrics"].update(l0_std=0.0, l0_q05=8, l0_q95=8)
    assert check_variable_l0(rows)["verdict"] == "not reproduced"
    best = {"nmse": {"best": "global_threshold", "l0_range": [2, 8], "mean_log10": {}}}
    pr = check_pruning([_row("b8", "batchtopk", 8, 0.2, pruning={"best": best})])
    assert [f["verdict"] for f in pr] == ["reproduced", "not decidable"]
    best["nmse"]["best"] = "lowest_k"
    assert check_pruning([_row("b8", "batchtopk", 8, 0.2, pruning={"best": best})])[0]["verdict"] == "not reproduced"

    def zf(outside):
        return {"frac_outside": {"0.5": outside}, "frac_under": 0.5, "ratio": {"q50": 1.0}, "eps": {"eps_h1": 3.0}}
    assert check_afa([_row("a", "topk", 8, 0.2, zf=zf(0.05))])["verdict"] == "reproduced"
    assert check_afa([_row("a", "topk", 8, 0.2, zf=zf(0.05)), _row("b", "topk", 8, 0.2, zf=zf(0.5))])["verdict"] == "not decidable"


def test_hill_ratio_verdict_needs_two_standard_errors_and_reads_either_order():
    """x-half ratio 1.5 +- 0.1 (BatchTopK over TopK) supports; 1.1 +- 0.1 is mixed; a comparison
    written TopK over BatchTopK (ratio 0.5) is inverted to 2.0."""
    def front(a, b, r, se):
        return {"y": "NMSE", "comparisons": [{"a": a, "b": b, "ratio": r, "stderr": se}]}
    assert check_hill(front("batchtopk", "topk", 1.5, 0.1))["verdict"] == "reproduced"
    assert check_hill(front("batchtopk", "topk", 1.1, 0.1))["verdict"] == "not decidable"
    assert check_hill(front("batchtopk", "topk", 0.5, 0.1))["verdict"] == "not reproduced"
    f = check_hill(front("topk", "batchtopk", 0.5, 0.05))
    assert f["values"][0]["ratio"] == pytest.approx(2.0) and f["values"][0]["stderr"] == pytest.approx(0.2)
    assert check_hill({"comparisons": []})["verdict"] == "not decidable"


def test_findings_lists_every_check_with_a_known_verdict():
    """findings() returns the nine checks, each with a verdict from VERDICTS, on any rows."""
    from sae_ref.findings import VERDICTS

    fs = findings([_row("t8", "topk", 8.0, 0.2)], {"comparisons": []})
    assert len(fs) == 9 and all(f["verdict"] in VERDICTS for f in fs)


def test_top_afa_claim_needs_both_families_and_compares_their_l0_spreads():
    """Invariant: the top-AFA claim is reproduced when every top-AFA SAE's per-token L0 spreads
    (q05 < q95) and every TopK SAE's does not (q05 = q95), not reproduced when neither holds,
    and not decidable without one of the two families."""
    from sae_ref.findings import check_top_afa_l0

    def row(label, family, q05, q95):
        return {"label": label, "family": family, "metrics": {"l0_mean": (q05 + q95) / 2, "l0_q05": q05, "l0_q95": q95}}

    good = [row("afa", "top-afa", 3.0, 40.0), row("tk", "topk", 8.0, 8.0)]
    assert check_top_afa_l0(good)["verdict"] == "reproduced"
    bad = [row("afa", "top-afa", 9.0, 9.0), row("tk", "topk", 2.0, 8.0)]
    assert check_top_afa_l0(bad)["verdict"] == "not reproduced"
    only = check_top_afa_l0([row("tk", "topk", 8.0, 8.0)])
    assert only["verdict"] == "not decidable" and "top-AFA" in only["reason"]
