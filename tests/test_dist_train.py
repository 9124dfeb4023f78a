"""Data-parallel training with real processes: 2 Gloo ranks on the CPU.

- N data-parallel steps give the parameters (and Adam moments, dead counters, theta) of N
  single-process steps on the concatenated batches, on NumPy and torch, for BatchTopK (whose
  cut is global over the concatenated batch) with AuxK working, and for TopK; the two ranks
  hold bit-identical states;
- ``fit`` with a rank killed by SIGKILL mid-run raises an error naming the rank and the
  signal, leaves the last checkpoint intact, and the run resumes from it with another number
  of ranks (1) to the same end as an uninterrupted single-process run.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sae_ref.arrays import resolve, to_numpy  # noqa: E402
from sae_ref.data.synthetic import SyntheticSource  # noqa: E402
from sae_ref.dist.comm import TorchComm  # noqa: E402
from sae_ref.dist.launch import RankError, spawn  # noqa: E402
from sae_ref.fit import fit  # noqa: E402
from sae_ref.io.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from sae_ref.train import TrainConfig, init_state, state_arrays, step  # noqa: E402

R = 2


# --- workers (module level: each rank imports this module) ------------------------------------
def steps_worker(rank, size, backend, config, batches):
    torch.set_num_threads(1)
    xp, _ = resolve(backend)
    comm = TorchComm()
    b = batches[0].shape[0] // size
    state = init_state(config, xp.asarray(batches[0]))
    for x in batches:
        state, metrics = step(state, xp.asarray(x[rank * b : (rank + 1) * b]), comm=comm, donate=True)
    return state_arrays(state)[0], float(to_numpy(metrics["loss"])), float(to_numpy(metrics["l0"]))


class _KillAfter:
    """A batch stream whose process kills itself with SIGKILL before its n-th batch."""

    def __init__(self, inner, n):
        self.inner, self.n, self.seen = inner, n, 0

    def __getattr__(self, name):  # only called for names not set here (and not while unpickling)
        if name.startswith("__") or "inner" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["inner"], name)

    def __iter__(self):
        return self

    def __next__(self):
        self.seen += 1
        if self.seen >= self.n:
            os.kill(os.getpid(), signal.SIGKILL)
        return next(self.inner)


class KillingSource:
    """The synthetic source, except that on rank ``victim`` the training stream dies."""

    def __init__(self, inner, victim, after):
        self.inner, self.victim, self.after = inner, victim, after

    def __getattr__(self, name):  # only called for names not set here (and not while unpickling)
        if name.startswith("__") or "inner" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["inner"], name)

    def stream(self, batch_size, **kw):
        s = self.inner.stream(batch_size, **kw)
        if int(os.environ.get("RANK", "0")) == self.victim:
            return _KillAfter(s, self.after)
        return s


def fit_worker(rank, size, config, source, run_dir, resume):
    torch.set_num_threads(1)
    fit(config, source, backend="numpy", dtype="float64", batch_size=32, run_dir=run_dir,
        checkpoint_every=3, resume=resume, log_every=1, holdout_batches=0, progress=False,
        comm=TorchComm())
    return rank


# --- helpers -----------------------------------------------------------------------------------
def single_process(backend, config, batches):
    xp, _ = resolve(backend)
    state = init_state(config, xp.asarray(batches[0]))
    for x in batches:
        state, metrics = step(state, xp.asarray(x))
    return state_arrays(state)[0], float(to_numpy(metrics["loss"])), float(to_numpy(metrics["l0"]))


def assert_states_close(got, ref, rtol=1e-9, atol=1e-12):
    assert got.keys() == ref.keys()
    for name in ref:
        np.testing.assert_allclose(np.asarray(got[name], dtype=np.float64),
                                   np.asarray(ref[name], dtype=np.float64), rtol=rtol, atol=atol,
                                   equal_nan=True, err_msg=name)


def batches(seed=0, n=6, B=32, d=16):
    rng = np.random.default_rng(seed)
    out = [rng.standard_normal((B, d)) for _ in range(n)]
    out[2][:, :3] *= 20.0  # a batch whose rows differ a lot: the global cut is far from either rank's
    return out


CONFIGS = {
    # AuxK on every step: a latent that missed one batch is dead
    "batchtopk": TrainConfig(arch="batchtopk", h=64, k=3, k_aux=8, dead_after=1, steps=100),
    "topk": TrainConfig(arch="topk", h=64, k=3, k_aux=8, dead_after=1, steps=100, max_grad_norm=0.5),
}


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_data_parallel_steps_equal_single_process_on_concatenated_batches(backend, arch):
    """Invariant: 2 ranks x 6 data-parallel steps = 6 single-process steps on the ranks'
    batches concatenated (parameters, Adam moments, dead counters, theta, loss, L0), and both
    ranks end bit-identical."""
    config, xs = CONFIGS[arch], batches()
    results = spawn(steps_worker, R, backend, config, xs, timeout_s=60, deadline_s=240)
    ref, ref_loss, ref_l0 = single_process(backend, config, xs)
    (s0, loss0, l0_0), (s1, loss1, l0_1) = results
    for name in s0:
        np.testing.assert_array_equal(s0[name], s1[name], err_msg=f"ranks differ in {name}")
    assert_states_close(s0, ref)
    assert loss0 == pytest.approx(ref_loss, rel=1e-9) and loss1 == loss0
    assert l0_0 == pytest.approx(ref_l0, rel=1e-12)
    if arch == "batchtopk":  # the global cut keeps exactly k per row on average
        assert ref_l0 == pytest.approx(config.k)


def test_killed_rank_raises_naming_it_and_the_run_resumes_with_another_rank_count(tmp_path):
    """Invariant: a rank killed by SIGKILL mid-run surfaces as RankError naming rank 1 and
    SIGKILL; the last checkpoint is intact and resuming it on 1 process reaches the state of an
    uninterrupted single-process run."""
    config = TrainConfig(arch="batchtopk", h=64, k=3, k_aux=8, dead_after=2, steps=10)
    source = SyntheticSource(16, 48, k=3, seed=1)
    run = tmp_path / "run"
    # 2 ranks, checkpoints every 3 steps; rank 1 dies before its 5th training batch
    with pytest.raises(RankError) as err:
        spawn(fit_worker, R, config, KillingSource(source, victim=1, after=5), str(run), False,
              timeout_s=30, deadline_s=240)
    assert "rank 1" in str(err.value) and "SIGKILL" in str(err.value)
    assert latest_checkpoint(run / "checkpoints") is not None
    _, meta, _ = load_checkpoint(run / "checkpoints")
    assert meta["t"] == 3
    # resume on 1 process to the end
    fit(config, source, backend="numpy", dtype="float64", batch_size=32, run_dir=run, checkpoint_every=3,
        resume=True, log_every=1, holdout_batches=0, progress=False)
    got, _, _ = load_checkpoint(run / "checkpoints")
    # the uninterrupted single-process run of the same 10 global batches
    ref = fit(config, source, backend="numpy", dtype="float64", batch_size=32, run_dir=tmp_path / "ref",
              checkpoint_every=3, log_every=1, holdout_batches=0, progress=False)
    ref_arrays, _ = state_arrays(ref.state)
    assert_states_close(got, ref_arrays, rtol=1e-8, atol=1e-11)
