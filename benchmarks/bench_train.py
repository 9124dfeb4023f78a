"""Speed of whole training steps, as ratios to one dense encoder GEMM measured in the same run.

    python benchmarks/bench_train.py                  # d=768 h=16384 k=32 B=4096, numpy and torch
    python benchmarks/bench_train.py --small          # d=128 h=2048 k=16 B=512: a quick run
    python benchmarks/bench_train.py --backend numpy --repeats 5

For each backend it times (the minimum, or ``--stat median``, of ``--repeats`` runs after warm-up):

- ``gemm``: the dense encoder product ``x @ W_enc`` (the only O(B h d) work in a step),
  with the array library's own matmul into one preallocated output (no page faults);
- ``train step, AuxK off``: one whole :func:`sae_ref.train.step` (``check=False``, inside
  :func:`sae_ref.no_checks`) with sae-ref's default :class:`~sae_ref.train.TrainConfig`
  (BatchTopK, per-row standardisation, decoder constraint, Adam, running-mean theta) but
  ``aux_convention=None``. Steps run in succession on two batches, each donating its state
  (``donate=True``) as the training loop does, after two warm-up steps;
- ``train step, N% dead``: the same with AuxK "authors" (k_aux 512) and ``dead_after=1``
  batch: every latent that did not fire in the current batch counts as dead. On Gaussian
  inputs every latent fires in every batch of B*k = 131072 kept entries, so to give AuxK its
  work the encoder columns of N% of the latents (``--dead-share``, repeatable; default 1%,
  10% and 50%) are scaled by 0.1: their pre-activations stay positive about half the time
  but never win the selection, so they are dead and AuxK selects min(k_aux, n_dead) per row
  among them (the measured dead fractions are printed). The step is printed by phase for
  AuxK off and for the middle share;
- ``TopK step, AuxK off``: the same step with ``arch="topk"`` (k per row);
- ``select (topk)`` / ``select (batchtopk)``: the selections alone on the pre-activations;
- ``encode (threshold)``: inference with the global threshold theta the training steps
  estimated (standardise, GEMM, ``z > theta``), and ``encode (batchtopk)`` for comparison.

Each row is printed with its seconds, its ratio to ``gemm``, and tokens (rows of x) per second.
Absolute times are noisy on shared machines; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

import numpy as np
from array_api_compat import device as device_of

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_core
from bench_core import _sync, gemm_into, machine, timeit  # the sibling script's helpers

import sae_ref
from sae_ref import activations as A
from sae_ref.arrays import resolve
from sae_ref.backends import get_backend
from sae_ref.profile import phases
from sae_ref.sae import SAEConfig, encode
from sae_ref.train import TrainConfig, inference_config, init_state, step

FULL = {"d": 768, "h": 16384, "k": 32, "B": 4096}
SMALL = {"d": 128, "h": 2048, "k": 16, "B": 512}


def time_steps(state, x0, x1, repeats, xp):
    """Seconds (:func:`bench_core.summarize`: the minimum or the median) of ``repeats`` successive training steps on ``x0``/``x1`` alternately,
    after two warm-up steps, each donating its state as the training loop does (so ``state``
    is consumed). Returns (seconds, the final state, the dead fraction of the last step)."""
    times = []
    with sae_ref.no_checks():
        for i in range(2 + repeats):
            t0 = time.perf_counter()
            state, metrics = step(state, (x0, x1)[i % 2], check=False, donate=True)
            _sync(xp, state.params.W_enc)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return bench_core.summarize(times), state, float(sae_ref.to_numpy(metrics["dead_fraction"]))


def profile_phases(state, x0, x1, repeats, xp):
    """Seconds per phase of the step (mean over ``repeats`` donated steps after two warm-up
    steps), from :func:`sae_ref.profile.phases`: each phase waits for its device before the
    clock reads. ``state`` is consumed."""
    with sae_ref.no_checks():
        for x in (x0, x1):
            state, _ = step(state, x, check=False, donate=True)
        with phases() as seconds:
            for i in range(repeats):
                state, _ = step(state, (x0, x1)[i % 2], check=False, donate=True)
    return {name: s / repeats for name, s in seconds.items()}


def suppress(state, share, xp):
    """Scale the encoder columns of the first ``share`` of the latents by 0.1 (see the module
    docstring): they stop winning the selection and go dead, and AuxK has work."""
    W = state.params.W_enc
    h = W.shape[1]
    weak = xp.astype(xp.arange(h, device=device_of(W)) < round(share * h), W.dtype)
    return replace(state, params=replace(state.params, W_enc=W * (1.0 - 0.9 * weak)))


def gemm_at(xp, a, b, precision: str):
    """The reference GEMM ``fn()`` at the steps' precision: :func:`bench_core.gemm_into` for
    "highest", the backend's ``matmul_at`` into one preallocated output otherwise."""
    if precision == "highest":
        return gemm_into(xp, a, b)
    be = get_backend(xp)
    be.check_precision(precision)
    out = xp.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    return lambda: be.matmul_at(a, b, precision, out=out)


def inputs(B: int, d: int):
    """The two float32 NumPy batches ``(x0, x1)`` of shape (B, d), standard normal, that every
    harness times on."""
    rng = np.random.default_rng(1)
    return tuple(rng.standard_normal((B, d)).astype(np.float32) for _ in range(2))


def setup(backend: str, d: int, h: int, k: int, B: int, dead_after: int, dead_share: float,
          aux: bool = True, arch: str = "batchtopk", precision: str = "highest"):
    """``(xp, x0, x1, state)``: the batches on ``backend`` and the starting state of the timed
    steps (default TrainConfig, BatchTopK unless ``arch``, ``dead_share`` of the latents
    suppressed; AuxK off with ``aux=False``)."""
    xp, dev = resolve(backend)
    x0, x1 = (xp.asarray(x, device=dev) for x in inputs(B, d))
    config = TrainConfig(arch=arch, h=h, k=k, dead_after=dead_after,
                         aux_convention="authors" if aux else None, matmul_precision=precision)
    with sae_ref.no_checks():
        state = suppress(init_state(config, x0, stream="device"), dead_share, xp)
    return xp, x0, x1, state


def bench(backend: str, d: int, h: int, k: int, B: int, repeats: int, dead_after: int,
          dead_shares: list[float], precision: str = "highest"):
    times, info = {}, {"dead": {}, "phases": {}}

    def fresh(share, aux=True):
        return setup(backend, d, h, k, B, dead_after, share, aux, precision=precision)

    xp, x0, x1, state = fresh(0.0, aux=False)
    gemm = gemm_at(xp, x0, state.params.W_enc, precision)
    ref = info["gemm"] = {}

    def paired(name, measure):
        """Time the reference GEMM, then the row right after it: each row's ratio is to the
        GEMM of the same minute (this shared machine's speed drifts over a run)."""
        ref[name] = timeit(gemm, xp, repeats)
        out = measure()
        times[name] = out[0] if isinstance(out, tuple) else out
        return out

    with sae_ref.no_checks():
        times["gemm (x @ W_enc)"] = ref["gemm (x @ W_enc)"] = timeit(gemm, xp, repeats)
        paired("train step, AuxK off", lambda: time_steps(state, x0, x1, repeats, xp))
        topk = setup(backend, d, h, k, B, dead_after, 0.0, aux=False, arch="topk", precision=precision)[3]
        paired("TopK step, AuxK off", lambda: time_steps(topk, x0, x1, repeats, xp))
        del topk
        info["phases"]["AuxK off"] = profile_phases(fresh(0.0, aux=False)[3], x0, x1, repeats, xp)
        for share in dead_shares:
            name = f"train step, {share:.0%} dead"
            _, trained, info["dead"][name] = paired(name, lambda: time_steps(fresh(share)[3], x0, x1, repeats, xp))
        share = dead_shares[len(dead_shares) // 2]
        info["phases"][f"{share:.0%} dead"] = profile_phases(fresh(share)[3], x0, x1, repeats, xp)
        pre = x0 @ trained.params.W_enc
        times["select (topk)"] = timeit(lambda: A._topk(pre, k).values, xp, repeats)
        times["select (batchtopk)"] = timeit(lambda: A._batch_topk(pre, k).values, xp, repeats)
        del pre
        params = trained.params
        thr = inference_config(trained)
        info["theta"] = thr.theta
        info["l0"] = encode(params, x1, thr).nnz / B
        paired("encode (threshold)", lambda: timeit(lambda: encode(params, x1, thr).values, xp, repeats))
        btk = SAEConfig("batchtopk", k=k, standardize=True)
        paired("encode (batchtopk)", lambda: timeit(lambda: encode(params, x1, btk).values, xp, repeats))
    return times, info


def add_shape_args(p) -> None:
    """The shape flags every step harness takes: --small, or any of --d --h --k --B."""
    p.add_argument("--small", action="store_true", help="d=128 h=2048 k=16 B=512 (a quick run)")
    for n in ("d", "h", "k", "B"):
        p.add_argument(f"--{n}", type=int)


def shape_of(a) -> dict:
    """``{"d", "h", "k", "B"}`` from the flags of :func:`add_shape_args` (default FULL)."""
    return {n: getattr(a, n) if getattr(a, n) is not None else (SMALL if a.small else FULL)[n]
            for n in ("d", "h", "k", "B")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(p)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stat", default="min", choices=["min", "median"],
                   help="summary of the timed runs of each measurement (default min)")
    p.add_argument("--dead-after", type=int, default=1,
                   help="batches without firing before a latent counts as dead (default 1)")
    p.add_argument("--dead-share", type=float, action="append",
                   help="share of latents whose encoder columns are scaled by 0.1 so they go dead "
                        "(repeatable; default 0.01, 0.1 and 0.5)")
    p.add_argument("--backend", action="append", help="numpy, torch, torch-cuda, cupy (repeatable)")
    p.add_argument("--matmul-precision", default="highest", choices=["highest", "tf32", "bf16"],
                   help="the encoder product's precision in the steps and in the reference GEMM")
    a = p.parse_args(argv)
    bench_core.STAT = a.stat
    shape = shape_of(a)
    print(f"machine: {machine()}")
    print(f"shape: d={shape['d']} h={shape['h']} k={shape['k']} B={shape['B']} float32; "
          f"{a.stat} of {a.repeats} after a warm-up")
    shares = a.dead_share or [0.01, 0.1, 0.5]
    print(f"train step: sae-ref default TrainConfig (batchtopk, standardize, AuxK 'authors' k_aux=512, "
          f"Adam), successive steps donating their state as the training loop does; dead_after="
          f"{a.dead_after} batch(es); 'N% dead': the encoder columns of N% of the latents scaled by 0.1 "
          f"so they go dead; encoder product precision: {a.matmul_precision}")
    for name in a.backend or ["numpy", "torch"]:
        try:
            times, info = bench(name, shape["d"], shape["h"], shape["k"], shape["B"],
                                a.repeats, a.dead_after, shares, a.matmul_precision)
        except (ImportError, RuntimeError, ValueError) as e:
            print(f"\n[{name}] skipped: {e}")
            continue
        gemm = times["gemm (x @ W_enc)"]
        ref = info["gemm"]
        print(f"\n[{name}]  {'work':<22} {'seconds':>9} {'/ gemm':>8} {'tokens/s':>10}  (the GEMM timed "
              f"just before the row, where one was)")
        for w, t in times.items():
            print(f"[{name}]  {w:<22} {t:9.4f} {t / ref.get(w, gemm):8.2f} {shape['B'] / t:10.0f}"
                  + (f"  gemm {ref[w]:.4f}" if w in ref and w != "gemm (x @ W_enc)" else ""))
        for which, ph in info["phases"].items():
            total = sum(ph.values())
            print(f"[{name}]  train step ({which}) by phase (sae_ref.profile; the sum, {total:.4f} s, "
                  f"includes the waits at each mark):")
            for w, t in ph.items():
                print(f"[{name}]    {w:<26} {t:9.4f} {t / gemm:8.2f}")
        dead = ", ".join(f"{w.split(', ')[1]}: {f:.1%}" for w, f in info["dead"].items())
        print(f"[{name}]  measured dead fraction ({dead}); "
              f"threshold inference: theta={info['theta']:.4g}, L0={info['l0']:.1f} (k={shape['k']})")


if __name__ == "__main__":
    main()
