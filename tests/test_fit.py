"""The training loop at the edge: kill and resume, corrupt checkpoints, NaN data, the CLI's
files (metrics log, SAELens export, summary), and feature recovery on planted features."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sae_ref.arrays import to_numpy
from sae_ref.cli import main
from sae_ref.data.store import write_store
from sae_ref.data.synthetic import SyntheticSource, mean_max_cosine
from sae_ref.fit import fit
from sae_ref.io.checkpoint import latest_checkpoint, load_checkpoint
from sae_ref.io.saelens import load_saelens
from sae_ref.sae import init_params
from sae_ref.train import TrainConfig

# a run long enough to be killed half way (about 10 ms a step), small enough for CI
KILL_ARGS = ["--data", "synthetic", "--synthetic", "32,256,4", "--h", "256", "--k", "4",
             "--steps", "400", "--batch-size", "256", "--checkpoint-every", "20",
             "--set", "k_aux=32", "--set", "dead_after=10", "--set", "lr=0.003",
             "--log-every", "20", "--no-progress", "--holdout-batches", "2"]


def _cli(args, **kw):
    env = dict(os.environ, PYTHONHASHSEED="0")
    return subprocess.Popen([sys.executable, "-m", "sae_ref.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _final_arrays(run: Path):
    arrays, meta, step = load_checkpoint(run / "checkpoints")
    return arrays, step


def test_sigkill_mid_run_then_resume_equals_the_uninterrupted_run_bit_for_bit(tmp_path):
    """A real process killed with SIGKILL between checkpoints, resumed from the last one,
    ends with exactly the parameters, moments and counters of a run never interrupted."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    p = _cli(["--out", str(whole), *KILL_ARGS])
    assert p.wait(timeout=300) == 0, p.stderr.read()
    p = _cli(["--out", str(cut), *KILL_ARGS])
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        ck = latest_checkpoint(cut / "checkpoints") if (cut / "checkpoints").exists() else None
        if ck is not None and int(ck.stem.split("-")[1]) >= 100:
            break
        time.sleep(0.01)
    assert p.poll() is None, "the run finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=60) == -signal.SIGKILL
    killed_at = load_checkpoint(cut / "checkpoints")[2]
    assert 100 <= killed_at < 400
    p = _cli(["--out", str(cut), "--resume", *KILL_ARGS])
    assert p.wait(timeout=300) == 0, p.stderr.read()
    a, step_a = _final_arrays(whole)
    b, step_b = _final_arrays(cut)
    assert step_a == step_b == 400
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # the metrics log holds every logged step exactly once
    steps = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(20, 401, 20))


def test_resume_refuses_a_truncated_checkpoint_with_a_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--out", str(run), *KILL_ARGS[:KILL_ARGS.index("--steps")], "--steps", "40",
            "--batch-size", "64", "--checkpoint-every", "20", "--no-progress"]
    assert main(["train", *args]) == 0
    newest = latest_checkpoint(run / "checkpoints")
    tensors = newest.with_suffix(".safetensors")
    tensors.write_bytes(tensors.read_bytes()[:-100])
    capsys.readouterr()
    assert main(["train", *args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert tensors.name in err and ("sha256" in err or "truncated" in err or "corrupt" in err)


def test_a_nan_row_in_the_store_stops_training_or_is_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2048, 16)).astype(np.float32)
    x[700, 3] = np.nan
    store = write_store(tmp_path / "store", x, shard_rows=512)
    config = TrainConfig(h=64, k=4, k_aux=16, steps=40)  # more than one epoch
    with pytest.raises(ValueError, match=r"(?i)nan"):
        fit(config, store, batch_size=64, progress=False, holdout_batches=2)
    result = fit(TrainConfig(h=64, k=4, k_aux=16, steps=40, nonfinite="skip"), store,
                 batch_size=64, progress=False, holdout_batches=2)
    assert result.summary["skipped"] >= 1
    assert np.all(np.isfinite(to_numpy(result.state.params.W_enc)))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_cli_train_on_a_store_writes_log_checkpoint_summary_and_a_loadable_saelens_sae(tmp_path, backend):
    pytest.importorskip("torch") if backend == "torch" else None
    src = SyntheticSource(24, 96, k=3, seed=0)
    x, _ = src.sample(4096, seed=1)
    write_store(tmp_path / "store", x.astype(np.float32), shard_rows=1000, format="safetensors")
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "store"), "--backend", backend, "--h", "96",
                 "--k", "3", "--steps", "30", "--batch-size", "128", "--out", str(run),
                 "--set", "k_aux=16", "--log-every", "10", "--no-progress"]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20, 30]
    assert {"l0", "nmse", "dead_fraction", "tokens_per_s", "mse_unit"} <= lines[-1].keys()
    summary = json.loads((run / "summary.json").read_text())
    held = summary["heldout"]
    assert held["theta"] > 0 and held["l0_inference"] > 0
    params, config, cfg = load_saelens(run / "sae")
    assert cfg["architecture"] == "jumprelu"
    assert cfg["metadata"]["training_architecture_details"]["architecture"] == "batchtopk"
    exported = summary["theta_calibration"]["theta_exported"]  # the final model's theta by default
    np.testing.assert_allclose(to_numpy(params.theta), exported, rtol=1e-6)
    arrays, meta, step = load_checkpoint(run / "checkpoints")
    assert step == 30 and meta["config"]["k"] == 3


def test_batchtopk_recovers_planted_features_in_seconds(tmp_path):
    """64 true unit features in R^32 (2x overcomplete, ~3 active per sample). After 600 steps
    the learned atoms match them with mean max cosine > 0.95. The threshold is far from chance:
    a random dictionary of the same size scores 0.49 here (each true atom's best match among
    256 random directions in 32-d) and the untrained SAE 0.47."""
    src = SyntheticSource(32, 64, k=3, seed=0)
    config = TrainConfig(h=256, k=3, k_aux=32, lr=3e-3, dead_after=20, steps=600)
    result = fit(config, src, batch_size=256, progress=False, holdout_batches=1)
    W = to_numpy(result.state.params.W_dec)
    score = mean_max_cosine(W, src.atoms)
    rand = np.random.default_rng(12345).standard_normal(W.shape)
    assert mean_max_cosine(rand, src.atoms) < 0.6
    assert mean_max_cosine(to_numpy(init_params(32, 256, xp=np, seed=0).W_dec), src.atoms) < 0.6
    assert score > 0.95, score


def test_cli_train_names_a_bad_option_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(tmp_path / "r"), "--set", "no_such_field=1", "--no-progress"])
    assert e.value.code == 2 and "no_such_field" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "r"), "--preset", "nope"])
    assert "preset" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "--data", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_fit_refuses_a_run_dir_holding_a_run_unless_resumed_or_overwritten(tmp_path):
    from sae_ref.fit import RunDirError, RunMismatch

    src = SyntheticSource(8, 32, k=2, seed=0)
    cfg = TrainConfig(h=32, k=2, k_aux=8, steps=6)
    kw = dict(batch_size=32, holdout_batches=1, progress=False, checkpoint_every=3)
    run = tmp_path / "run"
    fit(cfg, src, run_dir=run, **kw)
    with pytest.raises(RunDirError, match="already holds a run .*checkpoints/ \\(newest step 6\\)"):
        fit(cfg, src, run_dir=run, **kw)
    with pytest.raises(RunDirError, match="no checkpoint to resume from"):
        fit(cfg, src, run_dir=tmp_path / "empty", resume=True, **kw)
    with pytest.raises(RunMismatch) as info:
        fit(TrainConfig(h=32, k=2, k_aux=8, steps=9), src, run_dir=run, resume=True,
            **{**kw, "batch_size": 16})
    assert info.value.fields == [("batch_size", 16, 32)]  # the batches first, then the config
    with pytest.raises(RunMismatch, match="steps is 9 but the run was trained with 6"):
        fit(TrainConfig(h=32, k=2, k_aux=8, steps=9), src, run_dir=run, resume=True, **kw)
    assert fit(cfg, src, run_dir=run, overwrite=True, **kw).state.t == 6
    assert not (tmp_path / "empty").exists()


def test_resuming_a_finished_run_rewrites_no_checkpoint(tmp_path, monkeypatch):
    """A finished run resumed: its last checkpoint (step 7, not a multiple of 3) is not saved
    again, so a failure there (a full disk) cannot un-commit the only newest checkpoint."""
    src = SyntheticSource(8, 32, k=2, seed=0)
    cfg = TrainConfig(h=32, k=2, k_aux=8, steps=7)
    kw = dict(batch_size=32, holdout_batches=1, progress=False, checkpoint_every=3, keep=1)
    run = tmp_path / "run"
    fit(cfg, src, run_dir=run, **kw)
    import sae_ref.fit as F

    def no_saving(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(F, "save_checkpoint", no_saving)
    assert fit(cfg, src, run_dir=run, resume=True, **kw).state.t == 7
    assert load_checkpoint(run / "checkpoints")[2] == 7
