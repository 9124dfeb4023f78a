"""Sweeps: several SAEs trained in lockstep on one pass over the data.

A sweep is a speed-up and never a different experiment: each member ends bit for bit as its
own fit() (on NumPy), a sweep killed with SIGKILL resumes to the uninterrupted sweep's bits,
and a member that diverges is stopped without stopping the others.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sae_ref.arrays import to_numpy
from sae_ref.data import write_store
from sae_ref.fit import RunDirError, fit
from sae_ref.io.checkpoint import load_checkpoint
from sae_ref.sweep import MANIFEST, fit_sweep, load_sweep
from sae_ref.train import TrainConfig

TIMING = {"tokens_per_s", "data_wait"}


def _store(tmp_path):
    x = np.random.default_rng(0).standard_normal((1200, 8)).astype(np.float32) * np.linspace(0.5, 2, 8)
    return write_store(tmp_path / "store", x.astype(np.float32), shard_rows=300)


def _configs():
    return [TrainConfig(arch="topk", h=48, k=2, steps=14, lr=3e-3, dead_after=2),
            TrainConfig(arch="batchtopk", h=48, k=4, steps=20, lr=3e-3, dead_after=2, k_aux=16),
            TrainConfig(arch="relu-l1", h=32, k=None, steps=17, lr=1e-3, sparsity_coeff=1e-3)]


def _log(run):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_each_member_ends_bit_for_bit_as_its_own_fit(tmp_path):
    """Invariant: every member of a sweep (TopK, BatchTopK with AuxK, ReLU-L1; different step
    counts) ends with its own fit()'s parameters, Adam moments and log, bit for bit on NumPy,
    from one pass over the batches; the two members of one shape share the step's workspace
    and the third has its own."""
    store = _store(tmp_path)
    kw = dict(batch_size=32, holdout_batches=2, log_every=5, checkpoint_every=6, progress=False)
    got = fit_sweep(_configs(), store, out=tmp_path / "sweep", **kw)
    assert got[0].state.scratch is got[1].state.scratch is not got[2].state.scratch
    for config, res in zip(_configs(), got):
        name = res.summary["config"]["arch"]
        alone = fit(config, store, run_dir=tmp_path / "alone" / name, **kw)
        assert res.state.t == alone.state.t == config.steps
        for field in ("params", "opt"):
            mine, theirs = getattr(res.state, field), getattr(alone.state, field)
            for part in ("m", "v") if field == "opt" else (None,):
                a = getattr(mine, part) if part else mine
                b = getattr(theirs, part) if part else theirs
                for k, v in b.arrays().items():
                    np.testing.assert_array_equal(to_numpy(getattr(a, k)), to_numpy(v), err_msg=f"{name} {k}")
        sweep_dir = tmp_path / "sweep" / load_sweep(tmp_path / "sweep")["members"][got.index(res)]["dir"]
        assert _log(sweep_dir) == _log(tmp_path / "alone" / name)
        for key in ("heldout", "theta_calibration"):
            assert res.summary.get(key) == alone.summary.get(key)
    manifest = load_sweep(tmp_path / "sweep")
    assert manifest["finished"] and [m["state"] for m in manifest["members"]] == ["finished"] * 3


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_a_diverging_member_is_stopped_and_the_others_finish_as_alone(tmp_path):
    """Invariant: a member whose loss stops being finite is stopped at its next log line,
    reported in its summary and the manifest, and the other members end as their own fit()."""
    store = _store(tmp_path)
    bad = TrainConfig(arch="relu-l1", h=32, k=None, steps=20, lr=1e30, sparsity_coeff=1e-3)
    good = _configs()[0]
    kw = dict(batch_size=32, holdout_batches=2, log_every=2, progress=False)
    res = fit_sweep([bad, good], store, out=tmp_path / "sweep", names=["bad", "good"], **kw)
    assert "stopped" in res[0].summary and res[0].state.t < bad.steps
    manifest = load_sweep(tmp_path / "sweep")
    assert [m["state"] for m in manifest["members"]] == ["stopped", "finished"]
    alone = fit(good, store, **kw)
    np.testing.assert_array_equal(to_numpy(res[1].state.params.W_dec), to_numpy(alone.state.params.W_dec))


def test_a_sweep_is_refused_when_its_members_cannot_share_a_stream_or_a_directory(tmp_path):
    """Invariant: members that disagree on what decides the batches (nonfinite), clash on a
    directory name, or a sweep directory that holds a sweep (without resume or overwrite) are
    refused with an error naming the field, the names or the manifest."""
    store = _store(tmp_path)
    a, b = _configs()[:2]
    from dataclasses import replace

    with pytest.raises(ValueError, match="'nonfinite'"):
        fit_sweep([a, replace(b, nonfinite="skip")], store, out=tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="share the directory"):
        fit_sweep([a, a], store, out=tmp_path / "x", progress=False)
    fit_sweep([a], store, out=tmp_path / "s", batch_size=32, progress=False, holdout_batches=1)
    with pytest.raises(RunDirError, match=MANIFEST):
        fit_sweep([a], store, out=tmp_path / "s", batch_size=32, progress=False, holdout_batches=1)
    with pytest.raises(RunDirError, match="no sweep to resume"):
        fit_sweep([a], store, out=tmp_path / "none", resume=True, progress=False)


SWEEP_ARGS = ["--data", "synthetic", "--synthetic", "32,256,4", "--h", "256", "--arch", "topk,batchtopk",
              "--k", "4,8", "--steps", "300", "--batch-size", "256", "--checkpoint-every", "20",
              "--set", "k_aux=32", "--set", "dead_after=10", "--set", "lr=0.003",
              "--log-every", "20", "--no-progress", "--holdout-batches", "2"]


def _cli(args):
    env = dict(os.environ, PYTHONHASHSEED="0")
    return subprocess.Popen([sys.executable, "-m", "sae_ref.cli", "sweep", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_sweep_then_resume_equals_the_uninterrupted_sweep_bit_for_bit(tmp_path):
    """Invariant: a sweep process killed with SIGKILL and resumed (``sae-ref sweep --resume``)
    ends every member with the parameters, moments and counters of a sweep never interrupted,
    and each member's log holds every logged step once."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    p = _cli(["--out", str(whole), *SWEEP_ARGS])
    assert p.wait(timeout=600) == 0, p.stderr.read()
    p = _cli(["--out", str(cut), *SWEEP_ARGS])
    deadline = time.time() + 400
    while time.time() < deadline and p.poll() is None:
        try:
            step = json.loads((cut / MANIFEST).read_text()).get("committed_step") or 0
        except (OSError, ValueError):
            step = 0
        if step >= 60:
            break
        time.sleep(0.01)
    assert p.poll() is None, "the sweep finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=60) == -signal.SIGKILL
    p = _cli(["--out", str(cut), "--resume", *SWEEP_ARGS])
    assert p.wait(timeout=600) == 0, p.stderr.read()
    names = [m["dir"] for m in load_sweep(whole)["members"]]
    assert names == ["topk-k4", "topk-k8", "batchtopk-k4", "batchtopk-k8"]
    for n in names:
        a, _, step_a = load_checkpoint(whole / n / "checkpoints")
        b, _, step_b = load_checkpoint(cut / n / "checkpoints")
        assert step_a == step_b == 300
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{n} {k}")
        steps = [json.loads(line)["step"] for line in (cut / n / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(20, 301, 20))


def test_report_on_a_sweep_directory_evaluates_its_members(tmp_path):
    """Invariant: build_report given a sweep directory evaluates each member that finished
    (the run directories sweep.json lists), as if they had been listed one by one."""
    from sae_ref.report import ReportConfig, build_report

    store = _store(tmp_path)
    cfgs = [TrainConfig(arch=a, h=32, k=k, steps=6, lr=3e-3) for a in ("topk", "batchtopk") for k in (2, 3)]
    fit_sweep(cfgs, store, out=tmp_path / "sweep", batch_size=32, holdout_batches=4, progress=False)
    rep = ReportConfig(eval_rows=64, batch_size=32, downstream="none")
    res = build_report([tmp_path / "sweep"], store, tmp_path / "rep", config=rep, echo=lambda *_: None)
    labels = sorted(r["label"] for r in res["runs"])
    assert labels == ["batchtopk-k2", "batchtopk-k3", "topk-k2", "topk-k3"]


def test_a_sweep_that_cannot_fit_the_device_is_refused_naming_the_sizes(tmp_path, monkeypatch):
    """Invariant: before anything is written, a sweep whose members' estimated memory
    (parameters, gradients, Adam, the step's [B, h] arrays) exceeds the device's free memory
    is refused with the total, each member's share and the free size; the estimate grows
    with h and B."""
    from sae_ref import sweep as S

    store = _store(tmp_path)
    a = TrainConfig(arch="topk", h=64, k=2, steps=2)
    small, wide = S.member_bytes(a, 8, 32, 4), S.member_bytes(TrainConfig(arch="topk", h=128, k=2), 8, 32, 4)
    assert wide > small and S.member_bytes(a, 8, 64, 4) > small
    monkeypatch.setattr(S, "available_bytes", lambda xp, dev: small)
    with pytest.raises(MemoryError, match=r"GiB together \(topk-k2 .*topk-k3"):
        fit_sweep([a, TrainConfig(arch="topk", h=64, k=3, steps=2)], store, out=tmp_path / "s",
                  batch_size=32, progress=False)
    assert not (tmp_path / "s").exists()


def test_members_paired_with_their_own_sources_equal_their_own_fits(tmp_path):
    """Invariant: a sweep whose members each train on their own source (two stores, e.g. two
    layers of one harvest; two members share one) reads the sources in lockstep and ends every
    member bit for bit as its own fit() on its source; the manifest names each member's data."""
    rng = np.random.default_rng(3)
    a = write_store(tmp_path / "a", rng.standard_normal((900, 8)).astype(np.float32), shard_rows=300)
    b = write_store(tmp_path / "b", rng.standard_normal((900, 6)).astype(np.float32) * 2, shard_rows=300)
    cfgs = [TrainConfig(arch="topk", h=32, k=2, steps=9, lr=3e-3),
            TrainConfig(arch="batchtopk", h=24, k=3, steps=12, lr=3e-3),
            TrainConfig(arch="topk", h=24, k=4, steps=10, lr=3e-3)]
    kw = dict(batch_size=32, holdout_batches=2, log_every=3, progress=False)
    got = fit_sweep(cfgs, [a, b, b], out=tmp_path / "sweep", **kw)
    for cfg, src, res in zip(cfgs, [a, b, b], got):
        alone = fit(cfg, src, **kw)
        for k, v in alone.state.params.arrays().items():
            np.testing.assert_array_equal(to_numpy(getattr(res.state.params, k)), to_numpy(v), err_msg=k)
    data = [m["data"] for m in load_sweep(tmp_path / "sweep")["members"]]
    assert data[1] == data[2] != data[0]
