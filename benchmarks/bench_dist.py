"""Bytes and time of the sharded selections, against the naive gather of the pre-activations.

    python benchmarks/bench_dist.py                   # d=768 h=16384 k=32 B=4096, 2 Gloo ranks (CPU)
    python benchmarks/bench_dist.py --small           # d=128 h=2048 k=16 B=512: a quick run
    python benchmarks/bench_dist.py --backend nccl --nproc 1    # the NCCL path on one GPU

Every rank draws the same inputs and SAE (``init_params``, seed 0), computes the
pre-activations of its block (``rows``: B/R rows and every latent; ``cols``: every row and h/R
latents) and times, median of ``--repeats`` calls after a warm-up, each started after a
barrier, the slowest rank reported:

- ``batch_topk_sharded`` in both layouts, ``topk_sharded`` (``cols``), ``threshold_sharded``
  (``cols``, no communication) and ``decode_sharded`` (``cols``, one all-reduce of B x d);
- ``naive``: an all-gather of the pre-activations followed by the single-device
  ``batch_topk`` on the whole ``B x h`` array, in each layout; its own block of that result
  is checked equal to the sharded selection's (``same``).

Bytes are counted by the communicator's ledger (:mod:`sae_ref.dist.comm`: what reaches a rank
from the others; all-reduce counts its buffer), per rank per call, the largest over the ranks.
With Gloo each rank runs ``cpu_count / nproc`` torch threads. Absolute times are noisy on shared
machines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_core import machine  # the sibling script's helper

FULL = {"d": 768, "h": 16384, "k": 32, "B": 4096}
SMALL = {"d": 128, "h": 2048, "k": 16, "B": 512}


def worker(rank, size, shape, repeats, threads):
    import torch

    import sae_ref
    from sae_ref import activations as A
    from sae_ref.dist import TorchComm
    from sae_ref.sae import init_params

    torch.set_num_threads(threads)
    comm = TorchComm()
    with sae_ref.no_checks():
        d, h, k, B = shape["d"], shape["h"], shape["k"], shape["B"]
        params = init_params(d, h, xp=torch, device=comm.device, seed=0)
        x = torch.asarray(np.random.default_rng(1).standard_normal((B, d), dtype=np.float32), device=comm.device)
        rows, cols = _block(B, size, rank), _block(h, size, rank)
        pre = {"rows": ((x[rows] - params.b_dec) @ params.W_enc + params.b_enc).contiguous(),
               "cols": ((x - params.b_dec) @ params.W_enc[:, cols] + params.b_enc[cols]).contiguous()}
        local = _local_params(params, cols)
        return _measure(comm, pre, local, k, repeats, A)


def _block(n, size, rank):
    step = n // size
    return slice(rank * step, n if rank == size - 1 else (rank + 1) * step)


def _local_params(params, cols):
    from sae_ref.sae import SAEParams

    return SAEParams(params.W_enc[:, cols].contiguous(), params.b_enc[cols].contiguous(),
                     params.W_dec[cols].contiguous(), params.b_dec)


def _measure(comm, pre, local, k, repeats, A):
    from sae_ref.dist import (
        batch_topk_sharded,
        decode_sharded,
        threshold_sharded,
        topk_sharded,
    )

    code_cols = batch_topk_sharded(pre["cols"], k, comm, layout="cols")
    theta = float(batch_topk_sharded(pre["cols"], k, comm, layout="cols", return_cut=True)[1])
    ops = {
        ("batch_topk_sharded", "rows"): lambda: batch_topk_sharded(pre["rows"], k, comm, layout="rows"),
        ("batch_topk_sharded", "cols"): lambda: batch_topk_sharded(pre["cols"], k, comm, layout="cols"),
        ("topk_sharded", "cols"): lambda: topk_sharded(pre["cols"], k, comm, layout="cols"),
        ("threshold_sharded", "cols"): lambda: threshold_sharded(pre["cols"], theta, comm),
        ("decode_sharded", "cols"): lambda: decode_sharded(local, code_cols, comm),
        ("naive gather + batch_topk", "rows"): lambda: _naive(comm, pre["rows"], k, "rows", A),
        ("naive gather + batch_topk", "cols"): lambda: _naive(comm, pre["cols"], k, "cols", A),
    }
    out = {}
    for (name, layout), fn in ops.items():
        comm.reset_ledger()
        result = fn()
        ledger = comm.ledger()
        out[(name, layout)] = {"seconds": _time(comm, fn, repeats), "bytes": ledger["total_bytes"],
                               "calls": sum(ledger["calls"].values())}
        if name.startswith("naive"):
            sharded = batch_topk_sharded(pre[layout], k, comm, layout=layout)
            out[(name, layout)]["same"] = all(bool((a == b).all()) for a, b in zip(
                (sharded.rows, sharded.cols, sharded.values), (result.rows, result.cols, result.values)))
    out["naive_bytes"] = {lay: (comm.size - 1) * pre[lay].numel() * pre[lay].element_size() for lay in pre}
    return out


def _naive(comm, pre_local, k, layout, A):
    """Gather every rank's block, select on the whole array, keep this rank's block."""
    import torch

    from sae_ref.sparse import SparseCode

    blocks = comm.all_gather(pre_local)  # [R, B_r, h] or [R, B, h_r] (equal blocks)
    whole = torch.cat(list(blocks), dim=0 if layout == "rows" else 1)
    code = A._batch_topk(whole, k)
    B_r, h_r = pre_local.shape
    keep = (code.rows // B_r == comm.rank) if layout == "rows" else (code.cols // h_r == comm.rank)
    rows, cols = code.rows[keep], code.cols[keep]
    rows, cols = (rows - comm.rank * B_r, cols) if layout == "rows" else (rows, cols - comm.rank * h_r)
    return SparseCode(rows, cols, code.values[keep], tuple(pre_local.shape))


def _time(comm, fn, repeats):

    times = []
    for _ in range(repeats):
        comm.barrier()
        _sync(comm)
        t0 = time.perf_counter()
        fn()
        _sync(comm)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sync(comm):
    import torch

    if comm.device.type == "cuda":
        torch.cuda.synchronize()


def report(results, shape, backend, nproc):
    print(f"\n[{backend}, {nproc} rank(s)]  {'operation':<27} {'layout':<6} {'bytes/rank':>12} "
          f"{'/ naive':>9} {'collectives':>11} {'seconds':>9}")
    naive = results[0]["naive_bytes"]
    for key in results[0]:
        if key == "naive_bytes":
            continue
        name, layout = key
        nbytes = max(r[key]["bytes"] for r in results)
        seconds = max(r[key]["seconds"] for r in results)
        calls = results[0][key]["calls"]
        ratio = f"{nbytes / naive[layout]:9.2e}" if naive[layout] else f"{'-':>9}"
        same = ""
        if "same" in results[0][key]:
            same = "  same as sharded: " + ("yes" if all(r[key]["same"] for r in results) else "NO")
        print(f"[{backend}, {nproc} rank(s)]  {name:<27} {layout:<6} {nbytes:>12,} {ratio} {calls:>11} "
              f"{seconds:9.4f}{same}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="d=128 h=2048 k=16 B=512 (a quick run)")
    for n in ("d", "h", "k", "B"):
        p.add_argument(f"--{n}", type=int)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2, help="ranks (default 2; NCCL: at most the GPU count)")
    p.add_argument("--backend", action="append", choices=("gloo", "nccl"),
                   help="gloo and/or nccl (repeatable; default gloo, and nccl too when CUDA is available)")
    a = p.parse_args(argv)
    shape = {n: getattr(a, n) if getattr(a, n) is not None else (SMALL if a.small else FULL)[n]
             for n in ("d", "h", "k", "B")}
    import torch

    from sae_ref.dist import spawn

    backends = a.backend or (["gloo", "nccl"] if torch.cuda.is_available() else ["gloo"])
    print(f"machine: {machine()}")
    print(f"shape: d={shape['d']} h={shape['h']} k={shape['k']} B={shape['B']} float32; median of "
          f"{a.repeats} after a warm-up; bytes by the sae_ref.dist ledger, per rank per call; naive = all-gather "
          f"of the pre-activations ((R - 1) x the local B x h block)")
    for backend in backends:
        nproc = a.nproc if backend == "gloo" else min(a.nproc, torch.cuda.device_count())
        threads = max(1, (os.cpu_count() or 1) // nproc) if backend == "gloo" else 1
        t0 = time.perf_counter()
        results = spawn(worker, nproc, shape, a.repeats, threads, backend=backend, timeout_s=600)
        report(results, shape, backend, nproc)
        print(f"[{backend}, {nproc} rank(s)]  ({threads} torch thread(s) per rank; whole run "
              f"{time.perf_counter() - t0:.1f} s including start-up and the pre-activation GEMMs)")


if __name__ == "__main__":
    main()
