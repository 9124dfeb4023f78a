"""The fused Triton kernels one by one: measured beside their composed forms and the ledger's model.

    python benchmarks/bench_kernels.py            # on a GPU: d=768 h=16384 k=32 B=4096
    python benchmarks/bench_kernels.py --small    # d=64 h=1024 k=8 B=256 (on the CPU: Triton's interpreter)

For each fused kernel of a CUDA step (:mod:`sae_ref.backends._triton`) it times, on inputs of
a step's shape, the backend primitive with the kernels on and with them off (the composed
form), and records the same call with the ledger's stand-ins (``bench_gpu_ledger.py``: the
bytes the kernel moves, and its modeled H200 time at the measured copy bandwidth). It prints
the three times, the composed form ÷ the kernel, and the bytes ÷ the kernel's time: the
bandwidth the kernel reaches, which checks the model's assumption on a GPU.

Times are the minimum of ``--repeats`` runs after a warm-up, each between two CUDA events. On
the CPU the kernels run in Triton's interpreter: the times say nothing of a GPU (the script
then runs as a smoke test of the set-up).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

if not torch.cuda.is_available():  # before the kernels' modules load
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_core import machine  # noqa: E402
from bench_gpu_ledger import Ledger, fused_kernels  # noqa: E402

from sae_ref.backends import get_backend, sync_free, triton_kernels  # noqa: E402

HYPER = dict(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, t=10)


def _timed(fn, device, repeats: int) -> float:
    """The minimum seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


def cases(d: int, h: int, k: int, B: int, device):
    """``(name, call)``: each fused primitive's call on a step's inputs (fresh state arrays per
    call where the primitive writes in place)."""
    r = np.random.default_rng(0)
    t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)
    be = get_backend(torch)
    pre = t(r.standard_normal((B, h)))
    cols = np.sort(np.stack([r.choice(h, k, replace=False) for _ in range(B)]), axis=1)
    rows = torch.as_tensor(np.repeat(np.arange(B), k), device=device)
    cols = torch.as_tensor(cols.reshape(-1), device=device)
    values = t(np.abs(r.standard_normal(B * k)))
    G, X = t(r.standard_normal((B, d))), t(r.standard_normal((B, d)))
    W = t(r.standard_normal((h, d)) / np.sqrt(d))
    g, m, v = t(r.standard_normal((h, d))), t(np.zeros((h, d))), t(np.zeros((h, d)))
    W_enc = t(r.standard_normal((h, d))).T  # latent-major, as training stores it
    g_enc, m_enc, v_enc = (t(np.zeros((h, d))).T for _ in range(3))
    g_groups = 16
    q = torch.as_tensor(r.choice(B * h // g_groups, B * k, replace=False), device=device)
    with sync_free(True), triton_kernels(False):  # the chosen groups' keys; n of their subgroups' keys
        q_keys = be.group_keys(pre, g_groups, per_row=False).reshape(-1)[q]
        top = be.subgroup_keys(pre, q_keys, g_groups, 4, per_row=False)[:B * k]
    dead = torch.as_tensor(np.sort(r.choice(h, h // 10, replace=False)), device=device)
    real = torch.ones_like(dead, dtype=torch.bool)
    return [
        ("group_keys", lambda: be.group_keys(pre, g_groups, per_row=False)),
        ("subgroup_keys", lambda: be.subgroup_keys(pre, q_keys, g_groups, 4, per_row=False)),
        ("subgroup_entry_keys", lambda: be.subgroup_entry_keys(pre, top, g_groups, 4, per_row=False)),
        ("code_at", lambda: be.code_at(pre, torch.sort(q).values)),
        ("row_top_block", lambda: be.row_top_block(pre, dead, real, min(512, dead.shape[0]))),
        ("backward_products", lambda: be.backward_products(rows, cols, values, G, W, X, padded=True,
                                                           with_sums=True)),
        ("dead_counters", lambda: be.dead_counters(cols, values, torch.zeros(h, dtype=torch.int64, device=device),
                                                   B, 5 * B, torch.float32)),
        ("aux_residual", lambda: be.aux_residual(G.clone(), X, 2.0 / (B * d), torch.ones((), dtype=torch.bool,
                                                                                           device=device))),
        ("gate", lambda: be.gate(pre[:, :h // 8].contiguous(), pre[:, h // 8:h // 4].contiguous())),
        ("min_positive", lambda: be.min_positive(values)),
        ("running_mean_step", lambda: be.running_mean_step(values[:1000], values[0], 7)),
        ("standardize", lambda: be.standardize(X, W[0], 1e-5)),
        ("decode_residual", lambda: be.decode_residual(rows, cols, values, W, W[0], X, 2.0 / (B * d))),
        ("decoder_adam", lambda: be.decoder_adam(W.clone(), g, m.clone(), v.clone(), order="before",
                                                 inplace=True, **HYPER)),
        ("adam", lambda: be.adam(W_enc.clone(memory_format=torch.preserve_format), g_enc,
                                 m_enc.clone(memory_format=torch.preserve_format),
                                 v_enc.clone(memory_format=torch.preserve_format), inplace=True, **HYPER)),
    ]


def modeled(call):
    """``(bytes, seconds)`` the ledger charges the call's fused launches."""
    ledger = Ledger()
    with sync_free(True), fused_kernels(ledger, get_backend(torch)), ledger:
        call()
    ledger.mark("call")
    fused = [row for row in ledger.rows if row[1].startswith("triton:")]
    return sum(row[2] + row[3] for row in fused), sum(row[5] for row in fused)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="d=64 h=1024 k=8 B=256")
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args(argv)
    d, h, k, B = (64, 1024, 8, 256) if a.small else (768, 16384, 32, 4096)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"machine: {machine()}")
    print(f"shape: d={d} h={h} k={k} B={B} float32 on {device}"
          + ("" if device.type == "cuda" else " (Triton's interpreter: a smoke test, not GPU times)"))
    print(f"{'kernel':20s} {'model ms':>9s} {'fused ms':>9s} {'composed ms':>12s} {'composed/fused':>15s} {'GB/s fused':>11s}")
    for name, call in cases(d, h, k, B, device):
        moved, model = modeled(call)
        with sync_free(True):
            with triton_kernels(True):
                fused = _timed(call, device, a.repeats)
            with triton_kernels(False):
                composed = _timed(call, device, a.repeats)
        print(f"{name:20s} {model * 1e3:9.3f} {fused * 1e3:9.3f} {composed * 1e3:12.3f} "
              f"{composed / fused:15.2f} {moved / fused / 1e9:11.1f}")


if __name__ == "__main__":
    main()
