"""AuxK's gradient on its dense block as one fused Triton kernel.

:meth:`~sae_ref.backends.StandardBackend.gate` asks for a product ``P`` ([B, n]) kept where
the block's activations ``a`` are positive (AuxK's kept entries) and zeroed elsewhere, and for
the result's column sums (the encoder bias's gradient at those columns). Composed, that is a
comparison, a selection and a column sum: three passes. Here :func:`_gate_kernel` makes one:
a program takes a tile of rows and columns, writes its part of the result and its rows' partial
column sums; one reduction over the row tiles adds those, in order (the same bits every run).

Only code that has checked that Triton imports imports this module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import interpreting


@triton.jit
def _gate_kernel(p_ptr, a_ptr, out_ptr, parts_ptr, B, n, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    # columns on the grid's first axis (up to 2^31 - 1 programs; the others stop at 65535)
    cb, rb = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    rows = rb * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask = (rows < B)[:, None] & (cols < n)[None, :]
    at = rows[:, None] * n + cols[None, :]
    p = tl.load(p_ptr + at, mask=mask, other=0.0)
    a = tl.load(a_ptr + at, mask=mask, other=0.0)
    g = tl.where(a > 0, p, 0.0)
    tl.store(out_ptr + at, g, mask=mask)
    tl.store(parts_ptr + rb * n + cols, tl.sum(g, axis=0), mask=cols < n)


def gate(P, a):
    """``(g, column sums of g)`` of :meth:`~sae_ref.backends.StandardBackend.gate` in one
    kernel and one reduction (``P`` and ``a`` contiguous [B, n] of one float dtype)."""
    B, n = P.shape
    out = torch.empty_like(P)
    block_b, block_c = (1024, 64) if interpreting() else (64, 64)
    row_tiles = max(1, triton.cdiv(B, block_b))
    parts = torch.empty((row_tiles, n), dtype=P.dtype, device=P.device)
    _gate_kernel[(max(1, triton.cdiv(n, block_c)), row_tiles)](P, a, out, parts, B, n,
                                                               BLOCK_B=block_b, BLOCK_C=block_c)
    return out, torch.sum(parts, dim=0)
