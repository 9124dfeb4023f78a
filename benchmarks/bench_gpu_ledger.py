"""The GPU path's ledger: what one training step asks of a GPU, phase by phase, with a model.

    python benchmarks/bench_gpu_ledger.py                    # d=768 h=16384 k=32 B=4096
    python benchmarks/bench_gpu_ledger.py --small            # d=128 h=2048 k=16 B=512
    python benchmarks/bench_gpu_ledger.py --matmul-precision tf32 --dead-share 0.1
    python benchmarks/bench_gpu_ledger.py --launches         # also every launch by name

Runs one torch training step on the CPU on the GPU's code path (the sync-free mode forced,
as the ``torch-gpu-path`` test backend does: the same torch calls a CUDA step makes) and
records every torch call with a ``TorchFunctionMode``. Each call that runs a kernel (it
writes a new or an in-place tensor; views, metadata and bare allocations do not) is one
launch. Per launch it counts bytes read and written and floating-point operations, and
models its H200 time from the costs measured on an H200 (torch 2.11; the table in
:data:`MEASURED`): matrix products at the measured GEMM rate of their precision, the
selections and scans (``topk``, ``sort``, ``cumsum``, ``nonzero_static``) and the gathers
(CSR products, ``embedding_bag``, the sampled product) scaled from their measured times, and everything
else at the measured copy bandwidth, with a floor of a few microseconds a kernel.

It prints the ledger per phase (the phases of :mod:`sae_ref.profile`), the modeled device
time, the host's launch time (an assumed cost per eager launch, which a captured CUDA graph
removes), and the roofline floor: the encoder GEMM, one write and one read of the
pre-activations and Adam's traffic. The model is a guide to where the time goes and
whether the step's structure can reach its target; the measured GPU table is the result.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_core import machine  # noqa: E402
from bench_train import add_shape_args, setup, shape_of  # noqa: E402

import sae_ref  # noqa: E402
from sae_ref import profile  # noqa: E402
from sae_ref.backends import get_backend, sync_free, triton_kernels  # noqa: E402
from sae_ref.train import step  # noqa: E402

#: H200 costs measured with torch 2.11 (minimum of 10 runs): seconds, and the work they did
MEASURED = {
    "bandwidth": 536e6 / 0.14e-3,             # copy of the [4096, 16384] float32 pre-activations
    "gemm": {"highest": 2 * 4096 * 768 * 16384 / 2.18e-3,  # FLOP/s of x @ W_enc
             "tf32": 2 * 4096 * 768 * 16384 / 0.34e-3,
             "bf16": 2 * 4096 * 768 * 16384 / 0.16e-3},
    "topk_flat": 1.33e-3 / 67108864,          # torch.topk(flat, 131072) over 67M, per element
    "topk_rows": 0.87e-3 / 67108864,          # per-row torch.topk(pre, 32), per element
    "sort": 3.0e-3 / 67108864,                # torch.sort over 67M, per element
    "cumsum": 0.89e-3 / 67108864,             # cumsum over 67M int32, per element
    "nonzero_static": 0.21e-3 / 67108864,     # per mask element
    "embedding_bag": 0.27e-3 / (131072 * 768),  # per gathered element (B k rows x d)
    "csr_mm": 0.10e-3 / (131072 * 768),       # CSR torch.sparse.mm (the decode), per gathered element
    "sampled": 0.33e-3 / (131072 * 768),      # sampled dot products, per gathered element
    "adam": 0.32e-3 / 25.2e6,                 # fused Adam, per parameter
}
#: the phases of the step's pass over the batch, which :mod:`sae_ref.graphs` captures
GRAPHED_PHASES = ("standardize", "encoder gemm", "select", "decode", "loss", "auxk", "backward")
KERNEL_FLOOR = 2e-6   # the shortest kernel's device time
HOST_PER_LAUNCH = 5e-6  # assumed: the host's cost of one eager torch launch (a graph replays without it)
#: the sampled product's names as a torch function (``torch.sparse.sampled_addmm`` reaches a
#: TorchFunctionMode as ``sparse_sampled_addmm``)
SAMPLED = {"sampled_addmm", "sparse_sampled_addmm"}
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "set_", "requires_grad_", "__get__",
             "__set__", "resize_", "sparse_csr_tensor", "values", "crow_indices", "col_indices"}


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _storage(t):
    return t.untyped_storage().data_ptr()


class Ledger(TorchFunctionMode):
    """Records each kernel-launching torch call as (phase, name, read, written, flops, seconds)."""

    def __init__(self):
        super().__init__()
        self.precision = "highest"  # the precision of the products being recorded
        self.pending, self.rows = [], []
        self.paused = False

    def fused(self, name, composed, read, written):
        """A fused Triton kernel as one launch moving ``read`` and ``written`` bytes at the
        measured copy bandwidth; its result comes from ``composed()`` (the composed form, the
        same values), whose calls are not recorded."""
        if self.paused:  # within another stand-in's composed form: part of that launch
            return composed()
        self.paused = True
        try:
            out = composed()
        finally:
            self.paused = False
        seconds = max((read + written) / MEASURED["bandwidth"], KERNEL_FLOOR)
        self.pending.append((f"triton:{name}", read, written, 0, seconds))
        return out

    @contextlib.contextmanager
    def quiet(self):
        """Torch calls the model makes for itself (not the step's): not recorded."""
        before, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = before

    def mark(self, phase: str):
        self.rows += [(phase, *call) for call in self.pending]
        self.pending = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:  # a fused kernel's stand-in: recorded as one launch by ``fused``
            return out
        name = getattr(func, "__name__", str(func))
        if name in NO_KERNEL:
            return out
        ins = list(_tensors(args)) + list(_tensors(kwargs))
        outs = [t for t in _tensors(out) if t.layout == torch.strided]
        if name in SAMPLED:  # a sparse result: its values are what the kernel writes
            outs = [out.values()]
        in_place = name.endswith("_") and not name.startswith("__") or name == "__setitem__" or "out" in kwargs
        in_storages = {_storage(t) for t in ins if t.numel() and t.layout == torch.strided}
        new = [t for t in outs if t.numel() and _storage(t) not in in_storages]
        if not new and not in_place:
            return out  # a view or metadata: no kernel
        written = sum(t.numel() * t.element_size() for t in (new or ins[:1]))
        if name == "index_add_":  # the indexed rows only
            written = ins[2].numel() * ins[2].element_size()
        read, flops, seconds = self._cost(name, ins, new or ins[:1], list(_tensors(args)))
        self.pending.append((name, read, written, flops, max(seconds, (read + written) / MEASURED["bandwidth"], KERNEL_FLOOR)))
        return out

    def _cost(self, name, ins, outs, operands):
        """(bytes read, flops, seconds by the measured primitive costs or 0); ``operands``:
        the tensors among the positional arguments (a product's two factors)."""
        first = ins[0] if ins else None
        n = first.numel() if first is not None else 0
        read = sum(t.numel() * t.element_size() for t in {id(t): t for t in ins}.values()
                   if t.layout == torch.strided)
        if name in ("mm", "matmul", "_sparse_mm") and len(operands) >= 2 and operands[-2].layout == torch.sparse_csr:
            a, b = operands[-2], operands[-1]  # a CSR product: its entries gather rows of b
            work = a.values().numel() * b.shape[1]
            return work * b.element_size() + a.values().numel() * 16, 2 * work, work * MEASURED["csr_mm"]
        if name in ("mm", "matmul", "addmm", "__matmul__", "bmm") and len(operands) >= 2:
            a, b = operands[-2], operands[-1]
            flops = 2 * a.numel() * (b.shape[-1] if b.dim() > 1 else 1)
            # the products the step asks for at its matmul precision (``matmul_at``: the
            # encoder's and AuxK's block GEMMs) at that precision's rate; the others in float32
            rate = MEASURED["gemm"][self.precision]
            return read, flops, flops / rate
        if name in ("index_add_", "index_add"):  # only the indexed rows of the target are read
            index, source = ins[1], ins[2]
            return index.numel() * 8 + 2 * source.numel() * source.element_size(), 0, 0.0
        if name == "embedding_bag":
            idx, weight = ins[0], ins[1]
            work = idx.numel() * weight.shape[1]
            return work * weight.element_size() + idx.numel() * 16, 2 * work, work * MEASURED["embedding_bag"]
        if name in SAMPLED:
            nnz, d = ins[0].values().numel(), ins[1].shape[1]
            return 2 * nnz * d * ins[1].element_size(), 2 * nnz * d, nnz * d * MEASURED["sampled"]
        if name in ("index_select", "take", "gather", "__getitem__", "take_along_dim"):
            out_bytes = sum(t.numel() * t.element_size() for t in outs)
            return out_bytes + sum(t.numel() * t.element_size() for t in ins[1:]), 0, 0.0
        if name == "topk":  # measured on float32: a radix select's passes grow with the key's bytes
            rate = MEASURED["topk_flat" if first.dim() == 1 else "topk_rows"]
            return read, 0, n * rate * first.element_size() / 4
        if name in ("sort", "argsort"):
            return read, 0, n * MEASURED["sort"]
        if name in ("cumsum", "cumulative_sum"):
            return read, 0, n * MEASURED["cumsum"]
        if name == "nonzero_static":
            return read, 0, n * MEASURED["nonzero_static"]
        if name == "_fused_adam_":
            params = sum(t.numel() for t in _tensors(ins[:1]))
            return read, 0, params * MEASURED["adam"]
        return read, 0, 0.0



def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


#: bytes a gathered entry costs: its 32-byte memory sector
SECTOR = 32


@contextlib.contextmanager
def fused_kernels(ledger, be):
    """The fused Triton kernels that a CUDA step runs (:mod:`sae_ref.backends._triton`), each
    recorded by :meth:`Ledger.fused` with the bytes it moves; their values from the composed
    forms (which the tests check the kernels against)."""
    from sae_ref.backends import (StandardBackend, _triton, _triton_adam, _triton_counters, _triton_decode,
                                  _triton_gate, _triton_residual, _triton_select, _triton_sparse,
                                  _triton_standardize, _triton_theta)

    def group_keys(x, g, *, per_row, runs=None):
        B, h = x.shape
        keys = B * (h // g) * 8
        return ledger.fused("group_keys", lambda: StandardBackend.group_keys(be, x, g, per_row=per_row, runs=runs),
                            x.numel() * x.element_size(), keys + (keys // runs if runs else 0))

    def subgroup_keys(x, top, g, s, *, per_row):
        m = top.numel() * g  # entries gathered, each from its own sector
        return ledger.fused("subgroup_keys",
                            lambda: StandardBackend.subgroup_keys(be, x, top, g, s, per_row=per_row),
                            top.numel() * 8 + m * SECTOR, m // s * 8)

    def subgroup_entry_keys(x, top, g, s, *, per_row):
        m = top.numel() * s
        return ledger.fused("subgroup_entry_keys",
                            lambda: StandardBackend.subgroup_entry_keys(be, x, top, g, s, per_row=per_row),
                            top.numel() * 8 + m * SECTOR, m * 8)

    def count(cols, values, counts):
        n = cols.shape[0]  # each entry's latent and value read, an int32 atomic add into its count
        ledger.fused("count", lambda: counts.add_(StandardBackend.segment_count(
            be, cols, values != 0, counts.shape[0], torch.float64).to(counts.dtype)),
            n * (8 + values.element_size()), n * 4)

    def update(counts, since, B, threshold, dtype):
        h = since.shape[0]  # one program over the latents: counts and counters in, counters, mask out

        def composed():
            new = torch.where(counts > 0, torch.zeros_like(since), since + B)
            dead = new >= threshold
            return new, dead, torch.stack([dead.sum(), counts.sum().to(torch.int64)]).to(dtype)

        return ledger.fused("update", composed, h * (4 + since.element_size()), h * (since.element_size() + 1) + 16)

    def code_at(x, idx):
        n = idx.shape[0]  # each index's value from its own sector; rows, columns and values written
        return ledger.fused("code_at", lambda: StandardBackend.code_at(be, x, idx), n * (8 + SECTOR),
                            n * (16 + x.element_size()))

    def row_top_block(pre, cols, real, k):
        (B, h), cap = pre.shape, cols.shape[0]
        with ledger.quiet():  # the sectors the block's columns lie in (a row's program reads each once)
            sectors = torch.unique(cols[real] // (SECTOR // pre.element_size())).numel()
        gathered = B * sectors * SECTOR
        return ledger.fused("row_top_block", lambda: StandardBackend.row_top_block(be, pre, cols, real, k),
                            cap * 8 + gathered, B * cap * pre.element_size())

    def sum_of_partials(g, sums):
        """With ``sums``, the kernel's per-program sums of g^2 (taken from the registers it
        holds: no bytes more; one part stands for them)."""
        if not sums:
            return None
        with ledger.quiet():
            return torch.sum(g * g).reshape(1)

    def decoder_adam(W, g, m, v, *, lr, b1, b2, eps, t, order, tiny, sums=False):
        def composed():  # into the caller's W, m and v, as the kernel writes
            outs = StandardBackend.decoder_adam(be, W, g, m, v, lr=lr, b1=b1, b2=b2, eps=eps, t=t,
                                                order=order)
            for a, b in zip((W, m, v), outs):
                a.copy_(b)

        size = W.numel() * W.element_size()
        ledger.fused("decoder_adam", composed, 4 * size, 3 * size)
        return sum_of_partials(g, sums)

    def adam(p, g, m, v, *, lr, b1, b2, eps, t, sums=False):
        def composed():
            for a, b in zip((p, m, v), StandardBackend.adam(be, p, g, m, v, lr=lr, b1=b1, b2=b2,
                                                            eps=eps, t=t)):
                a.copy_(b)

        size = p.numel() * p.element_size()
        ledger.fused("adam", composed, 4 * size, 3 * size)
        return sum_of_partials(g, sums)

    def products(plan, G, W, X, *, padded, out_W=None, out_X=None):
        # the sorting and slotting (:func:`_triton_sparse.plan`) ran as recorded torch calls;
        # the kernels read each decoder row once and, per entry, its rows of G and X and its
        # indices and values, and write both [h, d] results, g_f and the latents' sums
        n, (h, d) = plan.values.shape[0], W.shape
        size = W.element_size()

        def composed():  # the code's entries back in its order
            unsorted = lambda a: None if a is None else torch.empty_like(a).index_copy_(0, plan.order, a)
            latent = torch.repeat_interleave(torch.arange(h, device=W.device), plan.crow.diff())
            return StandardBackend.backward_products(
                be, unsorted(plan.rows), unsorted(latent), unsorted(plan.values), G, W, X,
                unsorted(plan.code), padded=padded, with_sums=True)

        read = h * d * size + 2 * n * d * size + n * 32 + plan.slot_latent.numel() * 8
        out = ledger.fused("backward_products", composed, read, 2 * h * d * size + (n + h) * size)
        if min(n, G.shape[0]) > plan.part:  # the partial rows of long latents summed in order
            with ledger.quiet():  # this step's latents of two parts or more, and their parts
                counts = plan.crow.diff()
                long = counts > plan.part
                parts = int(torch.where(long, (counts + plan.part - 1) // plan.part, 0).sum())
                n_long = int(long.sum())
            row = (2 * d + 1) * size  # a partial row of both products and of the sums
            ledger.fused("sum_parts", lambda: None, parts * row + h * 16, n_long * row)
        return out

    def rows_residual(rows, cols, values, W, b, x, scale, r, g, sums):
        # the kernel reads each entry's row, latent, value and decoder row, the input and the
        # bias, and writes the residual, its scaled copy and the rows' two sums of squares
        (B, d), n, size = x.shape, values.shape[0], x.element_size()

        def composed():
            outs = StandardBackend.decode_residual(be, rows, cols, values, W, b, x, scale)
            r.copy_(outs[0])
            g.copy_(outs[1])
            sums.copy_(torch.stack([(outs[0] * outs[0]).sum(1), (x * x).sum(1)]))

        read = n * (d * size + 16 + size) + (B * d + d) * size
        return ledger.fused("decode_residual", composed, read, 2 * B * d * size + 2 * B * size)

    def aux_residual(e_hat, residual, scale, on):
        size = e_hat.numel() * e_hat.element_size()  # both read, the gradient written
        return ledger.fused("aux_residual", lambda: StandardBackend.aux_residual(be, e_hat, residual, scale, on),
                            2 * size, size)

    def gate(P, a):
        B, n = P.shape  # both read, the result and the row tiles' column sums written
        size = P.numel() * P.element_size()
        out = ledger.fused("gate", lambda: StandardBackend.gate(be, P, a), 2 * size,
                           size + triton_cdiv(B, 64) * n * P.element_size())
        return out

    def min_positive(values):
        torch.full((1,), float("inf"), dtype=values.dtype, device=values.device)  # the word the minima go into
        return ledger.fused("min_positive", lambda: StandardBackend.min_positive(be, values),
                            values.numel() * values.element_size(), values.element_size())

    def running_mean_step(buf, m, slot):
        size = buf.numel() * buf.element_size()
        return ledger.fused("running_mean_step", lambda: StandardBackend.running_mean_step(be, buf, m, slot),
                            size, size + buf.element_size())

    def standardize(x, b, eps):
        # one read of the batch and the bias; the two [B, d] results and the rows' statistics
        (B, d), size = x.shape, x.element_size()
        return ledger.fused("standardize", lambda: StandardBackend.standardize(be, x, b, eps),
                            (B * d + d) * size, (2 * B * d + 2 * B) * size)

    def slots(crow, n_slots, part):
        h = crow.shape[0] - 1
        return ledger.fused("slots", lambda: _triton_sparse.slots_composed(crow, n_slots, part),
                            (h + 1) * 8, (2 * h + n_slots) * 8)

    stand_ins = {_triton_select: {"group_keys": group_keys, "subgroup_keys": subgroup_keys,
                                  "subgroup_entry_keys": subgroup_entry_keys, "code_at": code_at,
                                  "row_top_block": row_top_block},
                 _triton_adam: {"decoder_adam": decoder_adam, "adam": adam},
                 _triton_decode: {"rows_residual": rows_residual},
                 _triton_standardize: {"standardize": standardize},
                 _triton_counters: {"count": count, "update": update},
                 _triton_residual: {"aux_residual": aux_residual},
                 _triton_gate: {"gate": gate},
                 _triton_theta: {"min_positive": min_positive, "running_mean_step": running_mean_step},
                 _triton_sparse: {"products": products, "slots": slots,
                                  "default_part": lambda B: _triton_sparse.PART}}
    saved = _triton.usable, [(mod, name, getattr(mod, name)) for mod, fs in stand_ins.items() for name in fs]
    _triton.usable = lambda *tensors: True
    for mod, fs in stand_ins.items():
        for name, f in fs.items():
            setattr(mod, name, f)
    try:
        yield
    finally:
        _triton.usable = saved[0]
        for mod, name, f in saved[1]:
            setattr(mod, name, f)


def record(state, x, *, fused=True):
    """The ledger of one step on ``x`` from ``state`` (the GPU path, forced; the products'
    precisions are those the step asks ``matmul_at`` for; ``fused``: with the fused Triton
    kernels a CUDA step runs, else their composed forms)."""
    ledger = Ledger()
    be = get_backend(torch)
    plain = be.matmul_at

    def matmul_at(a, b, prec, *, out=None):  # the products run at the step's precision
        ledger.precision = prec
        try:
            return plain(a, b, prec, out=out)
        finally:
            ledger.precision = "highest"

    add = be.matmul_add

    def matmul_add(a, b, v, prec, *, out=None):
        ledger.precision = prec
        try:
            return add(a, b, v, prec, out=out)
        finally:
            ledger.precision = "highest"

    be.matmul_at, be.matmul_add = matmul_at, matmul_add
    try:
        kernels = fused_kernels(ledger, be) if fused else triton_kernels(False)
        with sync_free(True), sae_ref.no_checks(), profile.listen(ledger.mark), kernels, ledger:
            step(state, x, check=False, donate=True)  # as the training loop steps
    finally:
        del be.matmul_at, be.matmul_add
    ledger.mark("(after the last phase)")
    return ledger.rows


def floor_seconds(B, d, h, precision):
    """The roofline floor: the encoder GEMM, one write and one read of the [B, h]
    pre-activations, and Adam's traffic over the 2 d h + h + d parameters."""
    gemm = 2 * B * d * h / MEASURED["gemm"][precision]
    pre = 2 * B * h * 4 / MEASURED["bandwidth"]
    adam = (2 * d * h + h + d) * MEASURED["adam"]
    return gemm + pre + adam


def launches(rows):
    """Each phase's launches by name: count and modeled time (``--launches``)."""
    by = collections.OrderedDict()
    for phase, name, *_, seconds in rows:
        c = by.setdefault((phase, name), [0, 0.0])
        c[0] += 1
        c[1] += seconds
    print(f"{'phase':28s} {'launch':28s} {'count':>5s} {'model us':>9s}")
    for (phase, name), (n, sec) in by.items():
        print(f"{phase:28s} {name:28s} {n:5d} {sec * 1e6:9.1f}")


def report(rows, B, d, h, precision, label):
    by_phase = collections.OrderedDict()
    for phase, name, read, written, flops, seconds in rows:
        p = by_phase.setdefault(phase, [0, 0, 0, 0.0, 0.0, collections.Counter()])
        p[0] += 1
        p[1] += read
        p[2] += written
        p[3] += flops
        p[4] += seconds
        p[5][name] += seconds
    print(f"\n{label}")
    print(f"{'phase':28s} {'launches':>8s} {'read MB':>9s} {'written MB':>10s} {'GFLOP':>8s} {'model ms':>9s}  largest")
    tot = [0, 0, 0, 0.0, 0.0]
    for phase, (n, r, w, f, s, names) in by_phase.items():
        top = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in names.most_common(2))
        print(f"{phase:28s} {n:8d} {r / 1e6:9.1f} {w / 1e6:10.1f} {f / 1e9:8.1f} {s * 1e3:9.3f}  {top}")
        tot = [a + b for a, b in zip(tot, (n, r, w, f, s))]
    n, r, w, f, s = tot
    host = n * HOST_PER_LAUNCH
    # with the pass captured (sae_ref.graphs): one replay, the batch and counters copied in,
    # the counters and metrics copied out, and the update's launches
    eager_after = sum(v[0] for k, v in by_phase.items() if k not in GRAPHED_PHASES)
    host_graphed = (eager_after + 1 + 2 + 9) * HOST_PER_LAUNCH
    floor = floor_seconds(B, d, h, precision)
    print(f"{'total':28s} {n:8d} {r / 1e6:9.1f} {w / 1e6:10.1f} {f / 1e9:8.1f} {s * 1e3:9.3f}")
    print(f"modeled H200 step: {s * 1e3:.2f} ms on the device; roofline floor {floor * 1e3:.2f} ms; "
          f"device model / floor {s / floor:.2f}")
    print(f"  host launches at {HOST_PER_LAUNCH * 1e6:.0f} us each: eager {host * 1e3:.2f} ms "
          f"(step {max(s, host) * 1e3:.2f} ms), with the pass as a CUDA graph {host_graphed * 1e3:.2f} ms "
          f"(step {max(s, host_graphed) * 1e3:.2f} ms)")
    small = [row[5] for row in rows if row[5] <= 2 * KERNEL_FLOOR]
    print(f"  small kernels (at most {2 * KERNEL_FLOOR * 1e6:.0f} us each): {len(small)} launches, "
          f"{sum(small) * 1e3:.2f} ms")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(p)
    p.add_argument("--matmul-precision", default="highest", choices=["highest", "tf32", "bf16"])
    p.add_argument("--dead-share", type=float, action="append",
                   help="share of latents suppressed so they go dead (repeatable; default 0 = AuxK off, and 0.1)")
    p.add_argument("--arch", action="append", choices=["batchtopk", "topk"], help="repeatable (default batchtopk)")
    p.add_argument("--composed", action="store_true",
                   help="model the step without the fused Triton kernels (their composed forms)")
    p.add_argument("--launches", action="store_true",
                   help="also list each phase's launches by name, with their count and modeled time")
    p.add_argument("--dead-after", type=int, default=5,
                   help="batches without firing before a latent is dead (default 5, TrainConfig's)")
    a = p.parse_args(argv)
    shape = shape_of(a)
    d, h, k, B = (shape[n] for n in ("d", "h", "k", "B"))
    print(f"machine: {machine()} (recording on the CPU; times modeled for an H200)")
    print(f"shape: d={d} h={h} k={k} B={B} float32, encoder product {a.matmul_precision}; "
          + ("composed kernels only" if a.composed else "fused Triton kernels at the copy bandwidth"))
    for arch in a.arch or ["batchtopk"]:
        for share in a.dead_share or [0.0, 0.1]:
            aux = share > 0
            with sync_free(True):
                xp, x0, x1, state = setup("torch", d, h, k, B, a.dead_after, share, aux, arch,
                                          a.matmul_precision)
                with sae_ref.no_checks():
                    for i in range(a.dead_after + 2):  # warm-up: the dead latents appear
                        state, m = step(state, (x0, x1)[i % 2], check=False, donate=True)
            dead = float(m["dead_fraction"])
            rows = record(state, x0, fused=not a.composed)
            label = f"{arch}, " + (f"AuxK 'authors' k_aux=512, {dead:.1%} dead" if aux else "AuxK off")
            report(rows, B, d, h, a.matmul_precision, label)
            if a.launches:
                launches(rows)


if __name__ == "__main__":
    main()
