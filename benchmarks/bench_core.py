"""Speed of the core operations, as ratios to one dense encoder GEMM measured in the same run.

    python benchmarks/bench_core.py                 # d=768 h=16384 k=32 B=4096, numpy and torch
    python benchmarks/bench_core.py --B 1024 --backend numpy

For each backend it times (the minimum, or ``--stat median``, of ``--repeats`` runs after one warm-up):

- ``gemm``: the dense encoder product ``x @ W_enc`` (the only O(B h d) work in a step), into
  one preallocated output;
- ``select``: BatchTopK selection alone on the pre-activations (and TopK);
- ``forward``: encode (GEMM + selection) and sparse decode;
- ``backward``: MSE gradient and the sparse backward to every parameter;
- ``auxk``: the AuxK loss and its gradients with half the latents dead.

and prints each divided by ``gemm``. Absolute times are noisy on shared machines; the
ratios are what to compare.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

import sae_ref
from sae_ref import activations as A
from sae_ref import auxk as K
from sae_ref import losses
from sae_ref.arrays import resolve
from sae_ref.sae import SAEConfig, backward, forward, init_params


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [f"{cpu}", f"{os.cpu_count()} logical cores", f"Python {platform.python_version()}",
             f"numpy {np.__version__}", f"sae-ref {sae_ref.__version__}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
        if torch.cuda.is_available():
            parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    except ImportError:
        pass
    return ", ".join(parts)


def _sync(xp, a):
    """Wait for the device (reading one element back), so GPU timings are real. The element
    is sliced, not taken from a flattened view: flattening a column-major array (the
    encoder's layout) copies all of it, which once added a copy of W_enc to every timed step."""
    np.asarray(sae_ref.to_numpy(a[(slice(0, 1),) * a.ndim]))


def gemm_into(xp, a, b):
    """``fn()`` computing ``a @ b`` with the array library's own matmul (its BLAS, threads as
    configured) into one preallocated output: the reference GEMM of every ratio, timed
    without the page faults of a fresh [B, h] array each call (which would flatter the ratio
    by a few percent)."""
    from array_api_compat import is_cupy_namespace, is_torch_namespace

    out = xp.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    if is_torch_namespace(xp):
        import torch

        return lambda: torch.matmul(a, b, out=out)
    if is_cupy_namespace(xp):
        import cupy

        return lambda: cupy.matmul(a, b, out=out)
    return lambda: np.matmul(a, b, out=out)


#: How the timed runs of one measurement are summarised: "min" (the default: the run least
#: disturbed by the rest of the machine, the usual estimate for code whose own time does not
#: vary) or "median". On a shared machine whose speed drifts by 10% the minimum is the
#: steadier of the two for the GEMM and the step alike.
STAT = "min"


def summarize(times) -> float:
    """The timed runs' :data:`STAT`."""
    return min(times) if STAT == "min" else statistics.median(times)


def timeit(fn, xp, repeats):
    out = fn()
    _sync(xp, out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        _sync(xp, out)
        times.append(time.perf_counter() - t0)
    return summarize(times)


def bench(backend: str, d: int, h: int, k: int, B: int, repeats: int):
    xp, dev = resolve(backend)
    params = init_params(d, h, xp=xp, device=dev, seed=0, stream="device")
    rng = np.random.default_rng(1)
    x = xp.asarray(rng.standard_normal((B, d)), dtype=xp.float32, device=dev)
    cfg = SAEConfig("batchtopk", k=k)
    pre = (x - params.b_dec) @ params.W_enc + params.b_enc
    dead = xp.arange(h, device=dev) % 2 == 0
    with sae_ref.no_checks():
        fwd = forward(params, x, cfg)
        g = losses.mse(fwd.x_hat, fwd.x)[1]
        res = fwd.x - fwd.x_hat
        rows = {
            "gemm": gemm_into(xp, x, params.W_enc),
            "select (batchtopk)": lambda: A._batch_topk(pre, k).values,
            "select (topk)": lambda: A._topk(pre, k).values,
            "forward": lambda: forward(params, x, cfg).x_hat,
            "backward": lambda: backward(params, fwd, losses.mse(fwd.x_hat, fwd.x)[1]).W_enc,
            "auxk (k_aux=512)": lambda: K.auxk(pre, dead, res, params.W_dec, 512).g_W_dec,
        }
        times = {name: timeit(fn, xp, repeats) for name, fn in rows.items()}
    del g
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--h", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--B", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stat", default="min", choices=["min", "median"],
                   help="summary of the timed runs of each measurement (default min)")
    p.add_argument("--backend", action="append", help="numpy, torch, torch-cuda, cupy (repeatable)")
    a = p.parse_args(argv)
    print(f"machine: {machine()}")
    global STAT
    STAT = a.stat
    print(f"shape: d={a.d} h={a.h} k={a.k} B={a.B} float32; {a.stat} of {a.repeats} after a warm-up")
    for name in a.backend or ["numpy", "torch"]:
        try:
            times = bench(name, a.d, a.h, a.k, a.B, a.repeats)
        except (ImportError, RuntimeError) as e:
            print(f"\n[{name}] skipped: {e}")
            continue
        gemm = times["gemm"]
        print(f"\n[{name}]  {'work':<20} {'seconds':>9} {'/ gemm':>8}")
        for w, t in times.items():
            print(f"[{name}]  {w:<20} {t:9.4f} {t / gemm:8.2f}")


if __name__ == "__main__":
    main()
