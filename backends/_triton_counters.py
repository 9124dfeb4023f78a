"""The training step's dead-latent counters as two fused Triton kernels.

:meth:`~sae_ref.backends.StandardBackend.dead_counters` asks, from a batch's code (entries
``values`` at latents ``cols``) and each latent's tokens since it last fired, for the new
counters (0 where the latent fired, a nonzero entry, else the old count plus the batch size),
the dead mask (counters at the threshold or past it), the dead fraction (the dead count over
the latents) and the code's nonzero entries per row. Composed on a GPU that is about a dozen
small launches. Here :func:`_count_kernel` adds each nonzero entry into its latent's int32 count
(integer atomics: the counts do not depend on the order the adds arrive in), and
:func:`_update_kernel`, one program, walks the latents once, writes the counters and the mask,
sums the two counts and divides them (correctly rounded, as the composed form's division).

Only code that has checked that Triton imports imports this module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import flat_block, interpreting
from ._triton_adam import _div


@triton.jit
def _count_kernel(cols_ptr, values_ptr, counts_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inside = i < n
    col = tl.load(cols_ptr + i, mask=inside, other=0).to(tl.int64)
    fired = tl.load(values_ptr + i, mask=inside, other=0.0) != 0
    tl.atomic_add(counts_ptr + col, fired.to(tl.int32), mask=inside & fired)


@triton.jit
def _update_kernel(counts_ptr, since_ptr, new_ptr, dead_ptr, totals_ptr, h, B, threshold,
                   CHUNK: tl.constexpr):
    n_dead = tl.zeros([CHUNK], dtype=tl.int64)
    nnz = tl.zeros([CHUNK], dtype=tl.int64)
    for j0 in range(0, h, CHUNK):
        j = j0 + tl.arange(0, CHUNK).to(tl.int64)
        inside = j < h
        count = tl.load(counts_ptr + j, mask=inside, other=0)
        since = tl.load(since_ptr + j, mask=inside, other=0)
        new = tl.where(count > 0, tl.zeros_like(since), since + B)
        dead = new >= threshold
        tl.store(new_ptr + j, new, mask=inside)
        tl.store(dead_ptr + j, dead, mask=inside)
        n_dead += (dead & inside).to(tl.int64)
        nnz += count.to(tl.int64)
    dt = totals_ptr.dtype.element_ty
    # the counts are exact integers in dt (below 2^24); the metrics are their means
    tl.store(totals_ptr, _div(tl.sum(n_dead, axis=0).to(dt), tl.full((), h, tl.int64).to(dt)))
    tl.store(totals_ptr + 1, _div(tl.sum(nnz, axis=0).to(dt), tl.full((), B, tl.int64).to(dt)))


def dead_counters(cols, values, since, B: int, threshold: int, dtype):
    """``(new counters, dead mask, dead fraction, L0)`` of
    :meth:`~sae_ref.backends.StandardBackend.dead_counters` in two kernels (``cols`` int64,
    ``since`` an integer [h]); the two means are 0-D of ``dtype``."""
    counts = torch.zeros(since.shape, dtype=torch.int32, device=since.device)
    count(cols, values, counts)
    new, dead, totals = update(counts, since, B, threshold, dtype)
    return new, dead, totals[0], totals[1]


def count(cols, values, counts):
    """Each nonzero entry added into its latent's int32 count (in ``counts``)."""
    n = cols.shape[0]
    if n:
        block = flat_block(n)
        _count_kernel[(triton.cdiv(n, block),)](cols, values, counts, n, BLOCK=block)


def update(counts, since, B: int, threshold: int, dtype):
    """``(new counters, dead mask, [dead fraction, L0])`` from the counts: the dead count over
    the ``h`` latents and the nonzero entries over the ``B`` rows, in ``dtype``."""
    h = since.shape[0]
    new = torch.empty_like(since)
    dead = torch.empty((h,), dtype=torch.bool, device=since.device)
    totals = torch.empty((2,), dtype=dtype, device=since.device)
    chunk = 1 << 16 if interpreting() else 1024
    _update_kernel[(1,)](counts, since, new, dead, totals, h, B, threshold, CHUNK=chunk)
    return new, dead, totals
