"""``sae-ref report``: evaluation of saved runs on a store's held-out tail, pruning summaries,
frontier fits across families, and the files it writes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from sae_ref.data.store import write_store
from sae_ref.data.synthetic import SyntheticSource
from sae_ref.fit import fit
from sae_ref.report import ReportConfig, best_pruning, build_report, frontier
from sae_ref.train import TrainConfig

D, H, N = 16, 64, 3072


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    x = SyntheticSource(D, 96, k=3, seed=0).sample(N, seed=1)[0].astype(np.float32) + 0.5
    store = write_store(root / "store", x, shard_rows=1000)
    runs = []
    for arch in ("topk", "batchtopk"):
        for k in (2, 4):
            cfg = TrainConfig(arch=arch, h=H, k=k, steps=25, k_aux=8, lr=3e-3, dead_after=5)
            fit(cfg, store, batch_size=256, run_dir=root / f"{arch}-k{k}", holdout_batches=2,
                checkpoint_every=None, progress=False)
            runs.append(root / f"{arch}-k{k}")
    return root, store, x, runs


def _oracle_nmse(params, config, x):
    """NMSE of a TopK / threshold SAE written in NumPy (inputs standardised per row)."""
    mu = x.mean(axis=1, keepdims=True)
    sd = x.std(axis=1, ddof=1, keepdims=True) + 1e-5
    xs = (x - mu) / sd
    pre = (xs - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    if config.activation == "topk":
        keep = np.zeros_like(pre, dtype=bool)
        order = np.argsort(-pre, axis=1, kind="stable")[:, :config.k]
        np.put_along_axis(keep, order, True, axis=1)
        f = np.where(keep & (pre > 0), pre, 0.0)
    else:
        f = np.where((pre > config.theta) & (pre > 0), pre, 0.0)
    out = (f @ params["W_dec"] + params["b_dec"]) * sd + mu
    return float(((out - x) ** 2).sum() / (x.astype(np.float64) ** 2).sum()), float((f != 0).sum(1).mean())


def test_report_evaluates_each_run_on_the_held_out_tail_as_a_numpy_oracle(setup, tmp_path):
    """L0 and NMSE of every run on the last eval_rows rows equal a NumPy re-implementation
    of its inference (TopK; BatchTopK through the theta of its final weights); files land in out."""
    from dataclasses import replace

    from sae_ref.arrays import to_numpy
    from sae_ref.calibrate import read_record
    from sae_ref.fit import load_run

    root, store, x, runs = setup
    cfg = ReportConfig(eval_rows=512, ref_rows=1024, batch_size=256, prune=("batchtopk-k4",),
                       downstream="none")
    res = build_report(runs, store, tmp_path / "rep", config=cfg, echo=lambda *_: None)
    tail = x[-512:].astype(np.float64)
    for path, row in zip(runs, res["runs"], strict=True):
        loaded = load_run(path)
        p = {n: to_numpy(getattr(loaded.params, n)).astype(np.float64) for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        config = loaded.config
        if config.activation == "threshold":  # the theta of the final weights, as recorded
            config = replace(config, theta=read_record(path)["theta"])
            assert row["theta"] == config.theta
        nmse, l0 = _oracle_nmse(p, config, tail)
        # theta is calibrated on the first held-out batch, which is evaluated here too: theta
        # equals one pre-activation of these rows, which float64 may put on the other side
        assert row["metrics"]["nmse"] == pytest.approx(nmse, rel=1e-4 if config.theta is None else 5e-4)
        assert row["metrics"]["l0_mean"] == pytest.approx(l0, abs=0.01)
        assert row["family"] == path.name.split("-")[0]
    assert res["runs"][2]["activation"] == "threshold"  # BatchTopK evaluated with theta
    saved = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert saved["eval_rows"] == [N - 512, N] and len(saved["runs"]) == 4
    page = (tmp_path / "rep" / "report.md").read_text()
    assert all(p.name in page for p in runs) and "### Pruning batchtopk-k4" in page


def test_report_pruning_sweeps_never_raise_l0_and_start_unpruned(setup, tmp_path):
    root, store, x, runs = setup
    cfg = ReportConfig(eval_rows=512, ref_rows=1024, batch_size=256, prune=("all",), downstream="none")
    res = build_report(runs[:1], store, tmp_path / "rep", config=cfg, echo=lambda *_: None)
    row = res["runs"][0]
    for method, pts in row["pruning"]["sweeps"].items():
        assert pts[0]["value"] == 0 and pts[0]["l0"] == pytest.approx(row["metrics"]["l0_mean"])
        l0 = [p["l0"] for p in pts]
        assert all(b <= a + 1e-12 for a, b in zip(l0, l0[1:])), method
    assert row["pruning"]["reference_rows"] == [N - 512 - 1024, N - 512]


def test_best_pruning_picks_the_lowest_curve_at_matched_l0():
    def sweep(l0s, f):
        return [{"l0": v, "nmse": f(v)} for v in l0s]

    sweeps = {"a": sweep([30, 20, 10], lambda v: 2 / v), "b": sweep([28, 15, 5], lambda v: 1 / v),
              "c": sweep([29, 12], lambda v: 3 / v)}
    got = best_pruning(sweeps)
    assert got["best"] == "b" and got["l0_range"] == pytest.approx([12, 28])
    assert got["mean_log10"]["b"] < got["mean_log10"]["a"] < got["mean_log10"]["c"]
    apart = best_pruning({"a": sweep([30, 20], lambda v: 1 / v), "b": sweep([10, 5], lambda v: 1 / v)})
    assert apart["best"] is None


def test_frontier_recovers_hill_half_points_and_their_ratio():
    """Rows on y = x / (x + x_half) with x_half 0.2 (family a) and 0.1 (family b): the
    fits recover them and the comparison gives 2."""
    rows = []
    for fam, xh in (("a", 0.2), ("b", 0.1)):
        for l0 in (8.0, 16.0, 32.0, 64.0):
            x = 1 / l0
            rows.append({"family": fam, "metrics": {"l0_mean": l0, "nmse": 0.5},
                         "downstream": {"recovered_mean": 1 - x / (x + xh)}})
    fr = frontier(rows)
    assert fr["y"].startswith("1 - recovered")
    assert fr["fits"]["a"]["hill1"].x_half == pytest.approx(0.2, rel=1e-6)
    assert fr["fits"]["b"]["hill"].x_half == pytest.approx(0.1, rel=1e-6)
    (c,) = fr["comparisons"]
    assert (c["a"], c["b"]) == ("a", "b") and c["ratio"] == pytest.approx(2.0, rel=1e-6)


def test_report_cli_writes_the_page_and_names_a_bad_prune_target(setup, tmp_path):
    root, store, x, runs = setup
    base = [sys.executable, "-m", "sae_ref.cli", "report", *map(str, runs[:2]), "--data", str(root / "store"),
            "--eval-rows", "512", "--ref-rows", "512", "--batch-size", "256", "--downstream", "none"]
    r = subprocess.run(base + ["--out", str(tmp_path / "ok")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ok" / "report.md").is_file()
    r = subprocess.run(base + ["--out", str(tmp_path / "bad"), "--prune", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "'prune'" in r.stderr and "nope" in r.stderr
    assert not (tmp_path / "bad" / "report.md").exists()


def test_l0_quantiles_read_the_histogram_like_numpy_on_the_samples():
    from sae_ref.report import l0_quantiles

    l0 = np.random.default_rng(0).integers(0, 40, size=997)
    got = l0_quantiles(np.bincount(l0, minlength=64))
    assert got["l0_std"] == pytest.approx(l0.std())
    for q in (0.05, 0.5, 0.95):
        assert got[f"l0_q{round(100 * q):02d}"] == np.quantile(l0, q, method="inverted_cdf")


def test_report_refuses_rows_a_run_trained_on_and_lists_runs_it_could_not_check(setup, tmp_path):
    """The runs held out 2 batches of 256: 1024 evaluated rows reach into their training rows.
    A SAELens directory has no record of its training rows: evaluated, and named on the page
    as not checked."""
    root, store, x, runs = setup
    cfg = ReportConfig(eval_rows=1024, ref_rows=1024, batch_size=256, downstream="none")
    with pytest.raises(ValueError, match=r"'config.eval_rows' \(1024\) reaches into rows that runs "
                                         r"trained on: '.*topk-k2' held out only the last 512 rows"):
        build_report(runs[:1], store, tmp_path / "rep", config=cfg, echo=lambda *_: None)
    assert not (tmp_path / "rep").exists()
    cfg = ReportConfig(eval_rows=512, ref_rows=1024, batch_size=256, downstream="none")
    res = build_report([runs[0], runs[1] / "sae"], store, tmp_path / "rep", config=cfg, echo=lambda *_: None)
    assert res["heldout_unchecked"] == ["sae"]
    page = (tmp_path / "rep" / "report.md").read_text()
    assert "Not checked to be held out for sae" in page and "the other runs did not train" in page


def test_report_draws_the_ratio_view_when_z_norm_is_one_value_and_checks_the_papers_claims(setup, tmp_path):
    """These SAEs standardise their input, so ||z|| is one value: zf.png is the ratio view, the
    scatter is kept as zf_scatter.png and the page says which space and why; every finding is
    in results.json and on the page with a known verdict."""
    pytest.importorskip("matplotlib")
    from sae_ref.findings import VERDICTS

    root, store, x, runs = setup
    cfg = ReportConfig(eval_rows=512, ref_rows=1024, batch_size=256, downstream="none")
    res = build_report(runs, store, tmp_path / "rep", config=cfg, echo=lambda *_: None)
    assert res["zf_view"]["view"] == "ratio" and res["zf_view"]["z_spread"] < 0.05
    assert res["zf_view"]["space"] == ["standardized"]
    assert {"zf", "zf_scatter"} <= set(res["figures"])
    assert (tmp_path / "rep" / "figures" / "zf_scatter.png").stat().st_size > 0
    page = (tmp_path / "rep" / "report.md").read_text()
    assert "‖f̃‖/‖z‖ per token" in page and f"√(d − 1) = {np.sqrt(D - 1):.2f} (d = {D})" in page
    saved = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert len(saved["findings"]) == 9 and all(f["verdict"] in VERDICTS for f in saved["findings"])
    assert "## The papers' claims, checked" in page
    assert all(f["claim"] in page for f in saved["findings"])
