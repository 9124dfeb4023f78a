"""BatchTopK's theta of the final weights (sae_ref.calibrate): its accuracy, its definition,
where fit records it (summary, checkpoint, SAELens export) and the on-demand command."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from sae_ref.calibrate import (calibrate_path, calibrate_theta, mean_l0, read_record, split_heldout,
                               threshold_config)
from sae_ref.data.store import write_store
from sae_ref.data.synthetic import SyntheticSource
from sae_ref.fit import fit, load_run
from sae_ref.io.checkpoint import load_checkpoint
from sae_ref.io.saelens import load_saelens, read_saelens_cfg
from sae_ref.sae import SAEConfig, init_params
from sae_ref.train import TrainConfig

D, H = 32, 256


def _batches(src, seed, n, rows=1024):
    s = src.stream(rows, seed=seed, xp=np, dtype=np.float32)
    return [next(s) for _ in range(n)]


@pytest.fixture(scope="module")
def frozen():
    """Two short BatchTopK runs (k = 4, 32) on synthetic data: their final weights, frozen."""
    src = SyntheticSource(D, 256, k=4.0, seed=0)
    out = {}
    for k in (4, 32):
        cfg = TrainConfig(arch="batchtopk", h=H, k=k, steps=60, k_aux=32, lr=3e-3, dead_after=10)
        out[k] = fit(cfg, src, batch_size=1024, holdout_batches=2, progress=False)
    return src, out


@pytest.mark.parametrize("k", [4, 32])
def test_calibrated_theta_gives_heldout_mean_l0_within_2_percent_of_k_on_a_frozen_sae(frozen, k):
    """On a frozen SAE, theta calibrated on 8 batches of the training size gives a mean L0 on 8
    other batches (another seed) within 2% of k; the running estimate of the same 60-step run
    misses by more (so the tolerance tells the two apart)."""
    src, runs = frozen
    state = runs[k].state
    cfg = state.config.sae_config()
    cal = calibrate_theta(state.params, cfg, _batches(src, 11, 8))
    held = _batches(src, 12, 8)
    l0, n = mean_l0(state.params, threshold_config(cfg, cal.theta), held)
    assert n == 8 * 1024
    assert abs(l0 / k - 1) < 0.02, (l0, k)
    running = runs[k].summary["theta_calibration"]["theta_running"]
    l0_run, _ = mean_l0(state.params, threshold_config(cfg, running), held)
    assert abs(l0_run / k - 1) > 0.02, (l0_run, k)


def test_calibrate_theta_is_the_mean_and_standard_error_of_each_batchs_smallest_kept_value():
    """theta is the mean over batches of the smallest of the B k largest pre-activations (a NumPy
    oracle of the batch selection), and its stderr is their sample std / sqrt(n)."""
    params = init_params(8, 32, xp=np, seed=3, dtype=np.float64)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((16, 8)) for _ in range(5)]
    cal = calibrate_theta(params, SAEConfig("batchtopk", k=3), batches)
    minima = []
    for x in batches:
        pre = np.maximum((x - params.b_dec) @ params.W_enc + params.b_enc, 0.0)
        kept = np.sort(pre.ravel())[::-1][:16 * 3]
        minima.append(kept[kept > 0].min())
    assert cal.theta == pytest.approx(np.mean(minima), rel=1e-12)
    assert cal.stderr == pytest.approx(np.std(minima, ddof=1) / math.sqrt(5), rel=1e-10)
    assert (cal.n_batches, cal.batch_rows) == (5, 16)


def test_calibrate_theta_errors_name_the_argument():
    """Not the batch selection, batches of two sizes and no batch are refused, naming them."""
    params = init_params(8, 32, xp=np, seed=0, dtype=np.float64)
    x = np.ones((4, 8))
    with pytest.raises(ValueError, match="argument 'config'"):
        calibrate_theta(params, SAEConfig("topk", k=2), [x])
    with pytest.raises(ValueError, match=r"argument 'batches\[1\]' has 3 rows"):
        calibrate_theta(params, SAEConfig("batchtopk", k=2), [x, x[:3]])
    with pytest.raises(ValueError, match="argument 'batches' holds no batch"):
        calibrate_theta(params, SAEConfig("batchtopk", k=2), [])


def test_split_heldout_gives_disjoint_calibration_and_evaluation_batches():
    """H held-out batches: the first floor(H/2) calibrate, the rest evaluate; H = 1 is in-sample."""
    assert split_heldout((100, 500), 100) == ((100, 300), (300, 500), False)
    assert split_heldout((100, 400), 100) == ((100, 200), (200, 400), False)
    assert split_heldout((0, 100), 100) == ((0, 100), (0, 100), True)
    with pytest.raises(ValueError, match="argument 'rows'"):
        split_heldout((0, 50), 100)


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    x = SyntheticSource(16, 96, k=3, seed=0).sample(4096, seed=1)[0].astype(np.float32)
    store = write_store(root / "store", x, shard_rows=1000)
    cfg = TrainConfig(arch="batchtopk", h=64, k=4, steps=30, k_aux=8, lr=3e-3, dead_after=5)
    res = fit(cfg, store, batch_size=256, run_dir=root / "run", holdout_batches=4,
              checkpoint_every=None, progress=False)
    return root, store, res


def test_fit_records_both_thetas_in_the_summary_the_checkpoint_and_the_saelens_export(stored_run):
    """After fit: summary.json, the newest checkpoint and sae/cfg.json hold one record; the
    calibration rows are the first half of the held-out tail, the L0 rows the second; the
    export's threshold is the calibrated theta; the checkpoint still loads and verifies."""
    root, store, res = stored_run
    rec = json.loads((root / "run" / "summary.json").read_text())["theta_calibration"]
    assert rec == res.summary["theta_calibration"]
    n = store.n_rows
    assert rec["calibration_rows"] == [n - 1024, n - 512] and rec["heldout_rows"] == [n - 512, n]
    assert rec["batches"] == 2 and rec["batch_size"] == 256 and rec["k"] == 4
    assert rec["theta"] == pytest.approx(np.mean(rec["minima"]))
    assert rec["theta_running"] != rec["theta"] and rec["export"] == "calibrated"
    _, meta, _ = load_checkpoint(root / "run" / "checkpoints")
    assert meta["theta_calibration"] == rec
    _, cfg, raw = load_saelens(root / "run" / "sae")
    assert cfg.activation == "threshold" or cfg.activation == "jumprelu"
    params, _, _ = load_saelens(root / "run" / "sae")
    theta = float(params.theta[0]) if params.theta is not None else cfg.theta
    assert theta == pytest.approx(rec["theta"], rel=1e-6)
    assert raw["metadata"]["theta_calibration"]["theta"] == rec["theta"]
    assert raw["metadata"]["training_architecture_details"]["theta"] == rec["theta"]
    assert read_record(root / "run") == rec


def test_calibrate_path_exports_the_running_theta_on_request_and_calibrates_a_saelens_directory(stored_run, tmp_path):
    """export="running" puts the running estimate into the SAELens threshold (the record keeps
    both); a copied SAELens directory is calibrated with its recorded k, to the run's theta
    on the same rows; one without a k needs the argument."""
    root, store, res = stored_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    rec = calibrate_path(run, store, export="running")
    assert rec["theta_exported"] == rec["theta_running"]
    assert rec["theta"] == pytest.approx(res.summary["theta_calibration"]["theta"], rel=1e-6)
    params, _, _ = load_saelens(run / "sae")
    assert float(params.theta[0]) == pytest.approx(rec["theta_running"], rel=1e-6)
    sae = tmp_path / "sae"
    shutil.copytree(root / "run" / "sae", sae)
    rec2 = calibrate_path(sae, store, batch_size=256, rows=(store.n_rows - 1024, store.n_rows))
    assert rec2["theta"] == pytest.approx(rec["theta"], rel=1e-5) and rec2["k"] == 4
    assert read_saelens_cfg(sae)["metadata"]["theta_calibration"]["theta"] == rec2["theta"]
    cfg = json.loads((sae / "cfg.json").read_text())
    del cfg["metadata"]["training_architecture_details"]
    (sae / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="argument 'k'"):
        calibrate_path(sae, store, batch_size=256, write=False)


def test_report_evaluates_a_batchtopk_run_at_its_calibrated_theta_and_shows_the_running_one(stored_run, tmp_path):
    """The report's BatchTopK row uses the recorded theta of the final weights (its L0 within
    3% of k here) and lists the running estimate's L0 on the same rows."""
    from sae_ref.report import ReportConfig, build_report

    root, store, res = stored_run
    cfg = ReportConfig(eval_rows=512, ref_rows=1024, batch_size=256, downstream="none")
    out = build_report([root / "run"], store, tmp_path / "rep", config=cfg, echo=lambda *_: None)
    row = out["runs"][0]
    t = row["thetas"]
    assert t["used"] == "calibrated" and row["theta"] == t["calibrated"]
    assert t["calibration_overlap"] == 0
    assert abs(row["metrics"]["l0_mean"] / 4 - 1) < 0.03
    loaded = load_run(root / "run")
    tail = np.asarray(store.read(store.n_rows - 512, store.n_rows), dtype=np.float32)
    l0_run, _ = mean_l0(loaded.params, loaded.config, [tail])
    assert t["l0_running"] == pytest.approx(l0_run)
    page = (tmp_path / "rep" / "report.md").read_text()
    assert "## BatchTopK's θ: running estimate and final model" in page


def test_calibrate_command_prints_the_estimate_and_writes_nothing_on_a_dry_run(stored_run, tmp_path, capsys):
    """`sae-ref calibrate RUN --data STORE --dry-run` prints theta, its L0 and the running
    one's, and leaves the run's files as they were; a bad --rows is one line."""
    from sae_ref.cli import main

    root, store, _ = stored_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    before = (run / "sae" / "cfg.json").read_bytes()
    assert main(["calibrate", str(run), "--data", str(store.directory), "--dry-run"]) == 0
    line = capsys.readouterr().out
    assert "theta (final weights)" in line and "held-out L0" in line and "running estimate" in line
    assert (run / "sae" / "cfg.json").read_bytes() == before
    with pytest.raises(SystemExit):
        main(["calibrate", str(run), "--data", str(store.directory), "--rows", "a:b"])
