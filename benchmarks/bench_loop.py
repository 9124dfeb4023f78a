"""The whole training loop against its bare step: does the data keep up?

    python benchmarks/bench_loop.py                     # d=768 h=16384 k=32 B=4096, numpy and torch
    python benchmarks/bench_loop.py --small             # d=128 h=2048 k=16 B=512
    python benchmarks/bench_loop.py --backend torch-cuda --steps 200

Writes two activation stores of ``--rows`` random rows (float16 and float32, shards of 65,536
rows) into a temporary directory, then prints, measured in one run:

- ``reader``: rows per second of a store's shuffled stream alone, on the host (reading the
  shards, shuffling, checking for NaN/inf), delivering the store's dtype (what a GPU backend
  copies and converts on the device) and float32 (what a CPU backend trains on): the rate the
  data path can feed;
- ``bare step``: tokens per second of :func:`sae_ref.train.step` on two batches already on the
  device (default ``TrainConfig``, AuxK off), the rate the loop could reach;
- ``fit``: tokens per second of :func:`sae_ref.fit.fit` on each store, with batches made ahead
  on a background thread (``prefetch=2``, the default on a GPU) and without (``prefetch=0``,
  the default on the CPU), its share
  of the bare step's rate, and the share of the loop's time spent waiting for data
  (``summary["data_wait"]``);
- ``--sweep``: :func:`sae_ref.sweep.fit_sweep` of 8 SAEs (TopK and BatchTopK at k = 8, 16,
  32, 64) on the float16 store, its loop's seconds over the sum of its members' bare steps,
  beside 8 serial fits over the same sum.

The machine is described first. Absolute rates are noisy on shared machines; compare the rows
of one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_core import _sync, machine  # noqa: E402
from bench_train import add_shape_args, shape_of  # noqa: E402

import sae_ref  # noqa: E402
from sae_ref.arrays import resolve  # noqa: E402
from sae_ref.data import ActivationStore, write_store  # noqa: E402
from sae_ref.fit import fit  # noqa: E402
from sae_ref.train import TrainConfig, init_state, step  # noqa: E402


def make_stores(directory: str, rows: int, d: int) -> dict:
    """Two stores of the same random rows, float16 and float32."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, d), dtype=np.float32)
    return {dt: write_store(os.path.join(directory, dt), x, shard_rows=65536, dtype=dt)
            for dt in ("float16", "float32")}


def reader_rate(store: ActivationStore, B: int, batches: int, dtype: str) -> float:
    """Rows per second of the store's stream delivering checked NumPy batches of ``dtype``
    (the store's own: what a GPU backend copies in and converts on the device; float32 from
    a float16 store: what a CPU backend trains on). Every shard is verified and cached first
    (a one-off per run), so the rate is the steady state."""
    s = store.stream(B, seed=1, dtype=dtype)
    for _ in range(-(-store.n_rows // B)):  # one epoch: every shard read (and hashed) once
        next(s)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(s)
    return batches * B / (time.perf_counter() - t0)


def bare_rate(backend: str, shape: dict, steps: int) -> float:
    """Tokens per second of successive default steps (AuxK off) on two batches on the device."""
    config = TrainConfig(h=shape["h"], k=shape["k"], aux_convention=None, steps=steps)
    return steps * shape["B"] / bare_seconds(backend, config, shape, steps)


def fit_rate(backend: str, store, shape: dict, steps: int, prefetch: int) -> tuple[float, float]:
    """(tokens per second, data-wait share) of fit() on the store, from its own summary."""
    config = TrainConfig(h=shape["h"], k=shape["k"], aux_convention=None, steps=steps)
    res = fit(config, store, backend=backend, batch_size=shape["B"], holdout_batches=0,
              progress=False, log_every=steps, prefetch=prefetch)
    return res.summary["tokens_per_s"], res.summary["data_wait"]


def sweep_configs(shape: dict, steps: int) -> list:
    """The sweep of the targets: TopK and BatchTopK at k = 8, 16, 32, 64 (AuxK off)."""
    return [TrainConfig(arch=a, h=shape["h"], k=k, aux_convention=None, steps=steps)
            for a in ("topk", "batchtopk") for k in (8, 16, 32, 64)]


def bare_seconds(backend: str, config, shape: dict, steps: int) -> float:
    """Seconds of ``steps`` successive bare steps of ``config`` on two batches on the device."""
    xp, dev = resolve(backend)
    rng = np.random.default_rng(1)
    xs = [xp.asarray(rng.standard_normal((shape["B"], shape["d"]), dtype=np.float32), device=dev)
          for _ in range(2)]
    with sae_ref.no_checks():
        state = init_state(config, xs[0])
        state, _ = step(state, xs[1], check=False, donate=True)
        _sync(xp, state.params.W_enc)
        t0 = time.perf_counter()
        for i in range(steps):
            state, _ = step(state, xs[i % 2], check=False, donate=True)
        _sync(xp, state.params.W_enc)
    return time.perf_counter() - t0


def loop_seconds(summary: dict) -> float:
    """The training loop's seconds, from a run's summary (tokens over tokens/s)."""
    return summary["tokens"] / summary["tokens_per_s"]


def sweep_rows(backend: str, store, shape: dict, steps: int) -> None:
    """A sweep of 8 SAEs against the sum of its members' bare steps and against 8 serial fits."""
    from sae_ref.sweep import fit_sweep

    configs = sweep_configs(shape, steps)
    bare = sum(bare_seconds(backend, c, shape, steps) for c in configs)
    kw = dict(backend=backend, batch_size=shape["B"], holdout_batches=0, progress=False,
              log_every=steps, prefetch=0)  # no files written: the loops alone
    res = fit_sweep(configs, store, out=None, **kw)
    sweep = loop_seconds(res[0].summary)
    serial = sum(loop_seconds(fit(c, store, **kw).summary) for c in configs)
    print(f"  sweep of {len(configs)} SAEs (TopK, BatchTopK x k = 8, 16, 32, 64), {store.dtype} store: "
          f"{sweep:.1f} s = {sweep / bare:.3f} x the members' bare steps ({bare:.1f} s); "
          f"{len(configs)} serial fits {serial:.1f} s = {serial / bare:.3f} x")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(p)
    p.add_argument("--rows", type=int, default=262144, help="rows of each store (default 262144)")
    p.add_argument("--steps", type=int, default=8, help="timed steps of each fit and bare row")
    p.add_argument("--backend", action="append", help="numpy, torch, torch-cuda, cupy (repeatable)")
    p.add_argument("--sweep", action="store_true",
                   help="also time a sweep of 8 SAEs against its members' bare steps and serial fits")
    a = p.parse_args(argv)
    shape = shape_of(a)
    print(f"machine: {machine()}")
    print(f"shape: d={shape['d']} h={shape['h']} k={shape['k']} B={shape['B']}; stores of "
          f"{a.rows} rows; {a.steps} timed steps per row; default TrainConfig, AuxK off")
    with tempfile.TemporaryDirectory() as tmp:
        stores = make_stores(tmp, a.rows, shape["d"])
        n = max(8, a.rows // shape["B"])
        for dt, store in stores.items():
            for out in sorted({dt, "float32"}):
                rate = reader_rate(store, shape["B"], n, out)
                print(f"reader, {dt} store, {out} batches: {rate:,.0f} rows/s")
        for backend in a.backend or ["numpy", "torch"]:
            bare = bare_rate(backend, shape, a.steps)
            print(f"\n{backend}: bare step {bare:,.0f} tokens/s")
            for dt, store in stores.items():
                for prefetch in (2, 0):
                    tok, wait = fit_rate(backend, store, shape, a.steps, prefetch)
                    print(f"  fit, {dt} store, prefetch={prefetch}: {tok:,.0f} tokens/s "
                          f"({tok / bare:.2f} of the bare step), data wait {wait:.1%}")
            if a.sweep:
                sweep_rows(backend, stores["float16"], shape, a.steps)


if __name__ == "__main__":
    main()
