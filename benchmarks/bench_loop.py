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
  32, 64) on the float16 store. Each round of the sweep (one batch read, 8 steps) is timed
  against the sum of its members' bare steps (every member's state kept in memory with its own
  workspace, as a fit has it; one step each, round-robin) run just before and just after it,
  so both see the same load on a shared machine (:class:`Paced`); the median ratio is printed
  with its range, beside the same ratio for 8 serial fits (each step against its own member's
  bare step) and the sweep's first round (the members' first steps on fresh memory, once per
  run). Then one stacked encoder GEMM of the 8 members against their 8 separate GEMMs.

The machine is described first. Absolute rates are noisy on shared machines; compare the rows
of one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace

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


class Paced:
    """A data source that times a training loop against bare steps under the same load.

    Its streams are the source's, except that every call after a stream's first runs
    ``pace()`` (bare steps) first and records when it started and ended. The loop's round
    ``j`` (reading batch ``j``, every member's step on it, the loop's bookkeeping) is the time
    from the end of the paced block in call ``j`` to the start of call ``j + 1``: each round
    lies between two paced blocks, and is compared with their mean (a load that drifts on a
    shared machine cancels to first order). The first round (the members' first steps, which
    touch their fresh memory: once per run) and the last (no call ends it) are not paired; a
    stream's first call (``fit`` reads batch 0 to initialise, the loop its first batch) is not
    paced."""

    def __init__(self, source, pace):
        self.source, self.pace = source, pace
        self.streams: list = []

    def __getattr__(self, name):  # n_rows, d, ...: the source's
        return getattr(self.source, name)

    def stream(self, batch_size, **kw):
        s = _PacedStream(self.source.stream(batch_size, **kw), self.pace)
        self.streams.append(s)
        return s

    def rounds(self) -> tuple[list, list, float]:
        """(bare seconds, loop seconds) of the paired rounds, and the first round's seconds."""
        s = max(self.streams, key=lambda s: len(s.t_in))  # the loop's stream
        t_in, t_paced, bare = s.t_in, s.t_paced, s.bare  # bare[i]: the block of call i + 1
        loop = [t_in[j + 1] - t_paced[j] for j in range(1, len(t_in) - 1)]
        around = [(bare[j - 1] + bare[j]) / 2 for j in range(1, len(t_in) - 1)]
        return around, loop, t_in[1] - t_in[0]


class _PacedStream:
    def __init__(self, stream, pace):
        self.stream, self.pace = stream, pace
        self.t_in, self.t_paced, self.bare = [], [], []

    def __getattr__(self, name):  # position, skipped, close, prefetch: the stream's
        return getattr(self.stream, name)

    def __iter__(self):
        return self

    def __next__(self):
        t = time.perf_counter()
        self.t_in.append(t)
        if len(self.t_in) > 1:
            self.pace()
            self.bare.append(time.perf_counter() - t)
        self.t_paced.append(time.perf_counter())
        return next(self.stream)


def warm_states(backend: str, configs, shape: dict):
    """(states, step_of): each config's state after one step (its memory touched), and
    ``step_of(i)``, one bare step of state ``i`` on one of two batches on the device."""
    xp, dev = resolve(backend)
    rng = np.random.default_rng(1)
    xs = [xp.asarray(rng.standard_normal((shape["B"], shape["d"]), dtype=np.float32), device=dev)
          for _ in range(2)]
    with sae_ref.no_checks():
        states = [step(init_state(c, xs[0]), xs[1], check=False, donate=True)[0] for c in configs]
    calls = [0]

    def step_of(i):
        with sae_ref.no_checks():
            states[i], _ = step(states[i], xs[calls[0] % 2], check=False, donate=True)
        _sync(xp, states[i].params.W_enc)
        calls[0] += 1

    return states, step_of


def _spread(ratios) -> str:
    return (f"median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}, "
            f"{len(ratios)} rounds)")


def sweep_rows(backend: str, store, shape: dict, steps: int) -> None:
    """A sweep of 8 SAEs against the sum of its members' bare steps, and 8 serial fits against
    each member's bare step, every round paired with bare steps run just before it
    (:class:`Paced`); then one stacked encoder GEMM against the members' separate GEMMs."""
    from sae_ref.sweep import fit_sweep

    configs = [replace(c, steps=steps + 2) for c in sweep_configs(shape, steps)]
    n = len(configs)
    states, step_of = warm_states(backend, configs, shape)
    kw = dict(backend=backend, batch_size=shape["B"], holdout_batches=0, progress=False,
              log_every=steps + 2, prefetch=0)  # no files written: the loops alone

    paced = Paced(store, lambda: [step_of(i) for i in range(n)])
    fit_sweep(configs, paced, out=None, **kw)
    bare, loop, first = paced.rounds()
    print(f"  sweep of {n} SAEs (TopK, BatchTopK x k = 8, 16, 32, 64) on the {store.dtype} store.\n"
          f"    ratio = a round of the sweep (one batch read, checked, converted; {n} steps) over "
          f"the\n    sum of its members' bare steps (one each, round-robin, each state with its "
          f"own\n    workspace as fit() has it) run around it:\n"
          f"    sweep: {_spread([b2 / b1 for b1, b2 in zip(bare, loop)])}; "
          f"{sum(loop):.1f} s / {sum(bare):.1f} s = {sum(loop) / sum(bare):.3f}\n"
          f"    the sweep's first round (first steps on fresh memory; once per run): {first:.1f} s "
          f"= {first / statistics.median(loop):.2f} x a later round")
    ratios, tot_loop, tot_bare = [], 0.0, 0.0
    for i, c in enumerate(configs):
        paced = Paced(store, lambda i=i: step_of(i))
        fit(c, paced, **kw)
        bare, loop, _ = paced.rounds()
        ratios += [b2 / b1 for b1, b2 in zip(bare, loop)]
        tot_loop, tot_bare = tot_loop + sum(loop), tot_bare + sum(bare)
    print(f"    {n} serial fits (ratio = a step with its own batch read over its member's bare "
          f"step):\n    serial: {_spread(ratios)}; {tot_loop:.1f} s / {tot_bare:.1f} s = "
          f"{tot_loop / tot_bare:.3f}")
    states.clear()
    stacked_gemm_row(backend, shape, n)


def stacked_gemm_row(backend: str, shape: dict, n: int, repeats: int = 2) -> None:
    """The encoder products of ``n`` same-shape members: ``n`` GEMMs ``x @ W_enc_i`` into
    their [B, h] buffers against one ``x @ [W_enc_1 | ... | W_enc_n]`` into one [B, n h]
    buffer, the backend's product in the encoder's layout (min of ``repeats`` after one
    warm-up each)."""
    from sae_ref.backends import get_backend

    xp, dev = resolve(backend)
    be = get_backend(xp)
    rng = np.random.default_rng(2)
    B, d, h = shape["B"], shape["d"], shape["h"]
    x = xp.asarray(rng.standard_normal((B, d), dtype=np.float32), device=dev)
    Ws = [be.latent_major(xp.asarray(rng.standard_normal((d, h), dtype=np.float32), device=dev))
          for _ in range(n)]
    outs = [xp.empty((B, h), dtype=xp.float32, device=dev) for _ in range(n)]
    stacked = be.latent_major(xp.concat(Ws, axis=1))
    big = xp.empty((B, n * h), dtype=xp.float32, device=dev)

    def separate():
        for W, o in zip(Ws, outs):
            be.matmul(x, W, out=o)
        _sync(xp, outs[-1])

    def one():
        be.matmul(x, stacked, out=big)
        _sync(xp, big)

    times = {separate: [], one: []}
    for _ in range(repeats):
        for fn in (separate, one):
            fn()
            t0 = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - t0)
    a, b = min(times[separate]), min(times[one])
    print(f"  encoder GEMMs of the {n} members: {n} separate {a:.2f} s, one stacked {b:.2f} s "
          f"= {b / a:.3f} x\n    (each member multiplies its own x - b_dec_i: one shared product "
          f"would also change the bits)")


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
