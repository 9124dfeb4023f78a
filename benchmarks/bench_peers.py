"""sae-ref's BatchTopK training step beside SAELens', as ratios to one encoder GEMM, in one run.

    ./run bench peers                   # d=768 h=16384 k=32 B=4096 float32
    ./run bench peers --small           # d=128 h=2048 k=16 B=512: a quick run
    ./run bench peers --repeats 2 --backend torch

``./run bench peers`` runs this file in its own environment (``.venv-bench``), which holds
sae-lens; sae-lens is not a dependency of sae-ref.

Rows, per backend (numpy, torch on the CPU, and torch-cuda and cupy when a GPU is there):

- ``gemm``: the dense encoder product ``x @ W_enc`` (into one preallocated output), the unit
  every ratio on that backend divides by;
- ``sae-ref``: one whole :func:`sae_ref.train.step`, exactly as ``benchmarks/bench_train.py``
  times it (its ``setup`` and ``time_steps``: default TrainConfig, BatchTopK, AuxK "authors"
  k_aux=512 coefficient 1/32, Adam, decoder constraint, ``dead_after=1`` batch, the encoder
  columns of half the latents scaled by 0.1 so that they are dead);
- ``SAELens`` (torch backends only): one step of SAELens' own trainer, ``SAETrainer``, on
  their ``BatchTopKTrainingSAE`` built from ``BatchTopKTrainingSAEConfig`` with the same
  shapes, inputs and dead latents (see :data:`SAELENS_STEP` for what the step holds).

Each row runs in a fresh subprocess and reports the minimum seconds of ``--repeats`` timed runs
after one warm-up, the ratio to its backend's GEMM, tokens (rows of x) per second, and peak
memory above a baseline process that only imports the same libraries and builds the same
inputs: on the CPU peak RSS (``resource.getrusage``'s ``ru_maxrss``), on CUDA
``torch.cuda.max_memory_allocated``, on CuPy the bytes its default memory pool holds (the pool
keeps freed blocks, so this is close to its peak). Parameters and optimiser state count.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import textwrap
import time
from importlib.metadata import PackageNotFoundError, version

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_core
from bench_core import machine  # the sibling scripts' helpers
from bench_train import FULL, SMALL

SAELENS_STEP = (
    "SAELens step = the body of SAETrainer.fit()'s loop: maybe_reset_sparsity(); "
    "step(batch) [batch to device, activation scaler (identity), training_forward_pass "
    "(encode with rescale_acts_by_decoder_norm, BatchTopK by flat torch.topk, dense decode, "
    "MSE, TopK AuxK on the dead latents, topk_threshold update), firing statistics and dead "
    "counters, loss.backward(), clip_grad_norm_(1.0), Adam step, zero_grad, lr scheduler "
    "(constant)]; _checkpoint_if_needed() (none); n_training_steps += 1. Left out: wandb "
    "logging (off) and the progress bar. No decoder renormalisation: SAELens' TopK-family "
    "trainer applies none, it divides by the decoder row norms inside the forward pass instead. "
    "AuxK: coefficient 1/32 (set), k_aux = d // 2 (fixed in SAELens, not settable; sae-ref uses "
    "512); dead = not fired in the previous step (dead_feature_window=0), the same latents "
    "suppressed as for sae-ref; the dead counters are restored before each timed step."
)
SAEREF_STEP = (
    "sae-ref step: bench_train's train step (default TrainConfig: batchtopk, standardize, AuxK "
    "'authors' k_aux=512 coefficient 1/32, decoder constraint, Adam, running-mean theta; "
    "dead_after=1 batch; encoder columns of the first half of the latents scaled by 0.1)"
)
MEMORY = (
    "memory: the row's process minus a baseline process that only imports the same libraries "
    "and builds the same inputs; CPU rows: peak RSS (ru_maxrss); torch-cuda: "
    "torch.cuda.max_memory_allocated; cupy: bytes in the default memory pool. Parameters and "
    "optimiser state count in every training row."
)
RESULT = "RESULT "
BACKENDS = ("numpy", "torch", "torch-cuda", "cupy")


# ---------------------------------------------------------------- worker side (a subprocess)


def _import_all(backend):
    """Import every library any row uses, so each process starts from the same footprint."""
    import bench_train  # noqa: F401  (sae_ref and sae_ref.train)
    import torch  # noqa: F401
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE  # noqa: F401
    from sae_lens.training.sae_trainer import SAETrainer  # noqa: F401

    if backend == "cupy":
        import cupy  # noqa: F401


def _device_peak(backend):
    """Peak bytes of the GPU allocator in this process (0 on the CPU). CuPy's default pool keeps
    the blocks it frees, so the bytes it holds are close to its peak."""
    if backend == "torch-cuda":
        import torch

        return torch.cuda.max_memory_allocated()
    if backend == "cupy":
        import cupy

        return cupy.get_default_memory_pool().total_bytes()
    return 0


def _peak_rss():
    """Peak resident set size of this process in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _inputs(backend, B, d):
    """``(xp, x0, x1)``: the batches of ``bench_train.inputs`` on ``backend``."""
    from bench_train import inputs

    from sae_ref.arrays import resolve

    xp, dev = resolve(backend)
    x0, x1 = (xp.asarray(x, device=dev) for x in inputs(B, d))
    return xp, x0, x1


def run_gemm(backend, d, h, k, B, repeats, dead_share):
    """Median seconds of ``x @ W_enc`` with a (d, h) float32 encoder, into one output buffer."""
    import numpy as np
    from array_api_compat import device as device_of
    from bench_core import gemm_into, timeit

    xp, x0, _ = _inputs(backend, B, d)
    W_enc = xp.asarray(np.random.default_rng(0).standard_normal((d, h), dtype=np.float32),
                       device=device_of(x0))
    return {"seconds": timeit(gemm_into(xp, x0, W_enc), xp, repeats)}


def run_saeref(backend, d, h, k, B, repeats, dead_share):
    """Median seconds of one sae-ref training step, as ``bench_train`` times it."""
    from bench_train import setup, time_steps

    import sae_ref

    xp, x0, x1, state = setup(backend, d, h, k, B, dead_after=1, dead_share=dead_share)
    seconds, _, dead = time_steps(state, x0, x1, repeats, xp)
    return {"seconds": seconds, "dead": dead}


def saelens_trainer(d, h, k, B, dead_share, device):
    """SAELens' trainer around their BatchTopK training SAE, with the first ``dead_share`` of
    the latents' encoder columns scaled by 0.1 and marked dead."""
    import torch
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
    )
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    cfg = BatchTopKTrainingSAEConfig(d_in=d, d_sae=h, k=k, aux_loss_coefficient=1 / 32,
                                     dtype="float32", device=device)
    sae = BatchTopKTrainingSAE(cfg)
    n_weak = round(dead_share * h)
    with torch.no_grad():
        sae.W_enc[:, :n_weak] *= 0.1
    trainer_cfg = SAETrainerConfig(total_training_samples=B * 10**6, train_batch_size_samples=B,
                                   lr=3e-4, lr_end=3e-5, device=device, dead_feature_window=0)
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(()))
    trainer.n_forward_passes_since_fired[:n_weak] = 1
    return trainer


def saelens_step(trainer, batch):
    """One iteration of ``SAETrainer.fit()``'s loop without wandb and the progress bar."""
    trainer.maybe_reset_sparsity()
    trainer.step(batch)
    trainer._checkpoint_if_needed()
    trainer.n_training_steps += 1


def run_saelens(backend, d, h, k, B, repeats, dead_share):
    """Median seconds of one SAELens training step (see :data:`SAELENS_STEP`)."""
    import torch

    if backend not in ("torch", "torch-cuda"):
        raise ValueError(f"run_saelens: argument 'backend' must be 'torch' or 'torch-cuda', got {backend!r}")
    _, x0, x1 = _inputs(backend, B, d)
    trainer = saelens_trainer(d, h, k, B, dead_share, str(x0.device))
    sync = torch.cuda.synchronize if x0.is_cuda else (lambda: None)
    saelens_step(trainer, x0)
    sync()
    since_fired = trainer.n_forward_passes_since_fired.clone()
    times, n_dead = [], []
    for _ in range(repeats):
        trainer.n_forward_passes_since_fired.copy_(since_fired)
        n_dead.append(int(trainer.dead_neurons.sum()))  # the mask the step below reads
        t0 = time.perf_counter()
        saelens_step(trainer, x1)
        sync()
        times.append(time.perf_counter() - t0)
    return {"seconds": bench_core.summarize(times), "dead": statistics.mean(n_dead) / h,
            "k_aux": min(d // 2, min(n_dead))}


def run_baseline(backend, d, h, k, B, repeats, dead_share):
    """Nothing beyond the imports and the inputs: the floor every row's memory is read from."""
    _inputs(backend, B, d)
    return {}


JOBS = {"baseline": run_baseline, "gemm": run_gemm, "sae-ref": run_saeref, "SAELens": run_saelens}


def worker(job, backend, shape, repeats, dead_share):
    """Run one job in this process and print its result as one JSON line."""
    _import_all(backend)
    out = JOBS[job](backend, shape["d"], shape["h"], shape["k"], shape["B"], repeats, dead_share)
    out.update(rss=_peak_rss(), device_peak=_device_peak(backend))
    print(RESULT + json.dumps(out), flush=True)


# ---------------------------------------------------------------- parent side


def spawn(job, backend, shape, repeats, dead_share):
    """Run ``job`` on ``backend`` in a fresh Python process; its result dict, or an error."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", job, "--backend", backend,
           "--repeats", str(repeats), "--dead-share", str(dead_share)]
    cmd += [f"--{n}={v}" for n, v in shape.items()]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {tail}"}


def backends_here():
    """numpy and torch, then torch-cuda and cupy where a GPU answers."""
    names = ["numpy", "torch"]
    try:
        import torch

        if torch.cuda.is_available():
            names.append("torch-cuda")
    except ImportError:
        pass
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            names.append("cupy")
    except (ImportError, RuntimeError):  # no cupy, or no driver: no cupy row
        pass
    return names


def memory(res, base, backend):
    """``(MiB, kind)`` of one row above its baseline: peak RSS on the CPU, the allocator's peak
    on a GPU."""
    if backend in ("numpy", "torch"):
        return (res["rss"] - base["rss"]) / 2**20, "peak RSS - baseline"
    kind = "cuda max_memory_allocated - baseline" if backend == "torch-cuda" else "cupy pool - baseline"
    return (res["device_peak"] - base["device_peak"]) / 2**20, kind


def measure(backend, shape, repeats, dead_share):
    """The rows of one backend: ``[(implementation, result), ...]`` and the baseline."""
    base = spawn("baseline", backend, shape, repeats, dead_share)
    if "error" in base:  # the backend is not there: one line, no rows
        return [], base
    jobs = ["gemm", "sae-ref"] + (["SAELens"] if backend in ("torch", "torch-cuda") else [])
    return [(job, spawn(job, backend, shape, repeats, dead_share)) for job in jobs], base


def print_rows(backend, rows, base, B):
    """One line per row: seconds, ratio to the GEMM, tokens/s, peak memory."""
    if "error" in base:
        print(f"{backend:<11} skipped: {base['error']}")
        return
    gemm = rows[0][1].get("seconds")
    for job, res in rows:
        work = "gemm (x @ W_enc)" if job == "gemm" else f"{job} BatchTopK train step"
        if "error" in res:
            print(f"{backend:<11} {work:<32} failed: {res['error']}")
            continue
        t = res["seconds"]
        ratio = f"{t / gemm:8.2f}" if gemm else f"{'-':>8}"
        mib, kind = memory(res, base, backend)
        extra = f"  dead {res['dead']:.1%}" if "dead" in res else ""
        extra += f", k_aux {res['k_aux']}" if "k_aux" in res else ""
        print(f"{backend:<11} {work:<32} {t:9.4f} {ratio} {B / t:10.0f} {mib:9.1f}  {kind}{extra}")


def compare(results):
    """sae-ref's tokens/s over SAELens' on each backend that has both."""
    for backend, rows in results.items():
        got = {job: res.get("seconds") for job, res in rows}
        if got.get("sae-ref") and got.get("SAELens"):
            print(f"{backend}: sae-ref runs {got['SAELens'] / got['sae-ref']:.2f}x the tokens/s of SAELens")


def header(shape, repeats):
    """What was run, on what."""
    try:
        lens = version("sae-lens")
    except PackageNotFoundError:
        lens = "not installed"
    notes = [
        f"machine: {machine()}, sae-lens {lens}",
        (f"shape: d={shape['d']} h={shape['h']} k={shape['k']} B={shape['B']} float32; minimum of "
         f"{repeats} timed runs after a warm-up; every row in its own fresh process"),
        SAEREF_STEP,
        SAELENS_STEP,
        MEMORY,
    ]
    for note in notes:
        print(textwrap.fill(note, width=100, subsequent_indent="  "))
    print()


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="d=128 h=2048 k=16 B=512 (a quick run)")
    for n in ("d", "h", "k", "B"):
        p.add_argument(f"--{n}", type=int)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dead-share", type=float, default=0.5,
                   help="share of latents whose encoder columns are scaled by 0.1 so they go dead (default 0.5)")
    p.add_argument("--backend", action="append", choices=BACKENDS,
                   help="numpy, torch, torch-cuda, cupy (repeatable; default: those this machine has)")
    p.add_argument("--worker", choices=sorted(JOBS), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error(f"argument --repeats must be at least 1, got {a.repeats}")
    shape = {n: getattr(a, n) if getattr(a, n) is not None else (SMALL if a.small else FULL)[n]
             for n in ("d", "h", "k", "B")}
    return a, shape


def main(argv=None):
    a, shape = parse(argv)
    if a.worker:
        return worker(a.worker, a.backend[0], shape, a.repeats, a.dead_share)
    header(shape, a.repeats)
    print(f"{'backend':<11} {'work':<32} {'seconds':>9} {'/ gemm':>8} {'tokens/s':>10} {'peak MiB':>9}  memory")
    results = {}
    for backend in a.backend or backends_here():
        results[backend], base = measure(backend, shape, a.repeats, a.dead_share)
        print_rows(backend, results[backend], base, shape["B"])
    print()
    compare(results)


if __name__ == "__main__":
    main()
