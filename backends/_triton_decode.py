"""The training step's decoding and its squared error as one fused Triton kernel.

:meth:`~sae_ref.backends.StandardBackend.decode_residual` asks, for a code ``f`` (entries
``values`` at ``(rows, cols)``, shape (B, h)), the decoder ``W`` ([h, d]) and bias ``b``, and
the input ``x`` ([B, d]), for

- the residual ``r = f W + b - x`` ([B, d]);
- its gradient-scaled copy ``scale * r`` (the loss's gradient on the reconstruction);
- the sum of squares of ``r`` (the loss's value, times its normaliser), and that of ``x``.

Composed on a GPU, that is a sort of the entries by row and a CSR build for cuSPARSE's product,
the product, the bias added, the input subtracted, a dot product and a scaling: about a dozen
launches, each [B, d] pass through memory again. Here the code's entries come sorted by row
(every code the selection makes lists them row-major), and :func:`_decode_residual_kernel`
takes a row at a time: it finds the row's entries by bisection, sums their decoder rows times
their values in registers, adds the bias, subtracts the input and writes ``r``, ``scale * r``
and the row's sums of squares of ``r`` and of the input (the NMSE's denominator). The rows'
sums are added by one reduction afterwards. No atomics: the same bits every run.

Only code that has checked that Triton imports imports this module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import interpreting
from ._triton_adam import _as
from ._triton_sparse import _blocks


@triton.jit
def _first_at_least(rows_ptr, n, target, STEPS: tl.constexpr):
    """The first place in the ascending ``rows`` ([n]) whose row is at least ``target`` (a
    vector of targets), by bisection in ``STEPS`` rounds (``2^STEPS > n``)."""
    lo = tl.zeros(target.shape, dtype=tl.int64)
    hi = tl.zeros(target.shape, dtype=tl.int64) + n
    for _ in range(STEPS):
        mid = (lo + hi) // 2
        below = tl.load(rows_ptr + mid, mask=mid < n, other=0) < target
        open_ = lo < hi
        lo = tl.where(open_ & below, mid + 1, lo)
        hi = tl.where(open_ & ~below, mid, hi)
    return lo


@triton.jit
def _decode_residual_kernel(rows_ptr, cols_ptr, values_ptr, W_ptr, b_ptr, x_ptr, r_ptr, g_ptr, sums_ptr,
                            n, B, d, scale: tl.float64, STEPS: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # [R]
    here = row < B
    lo = _first_at_least(rows_ptr, n, row, STEPS)  # the row's entries: [lo, hi)
    hi = _first_at_least(rows_ptr, n, row + 1, STEPS)
    k = tl.arange(0, BLOCK_D).to(tl.int64)
    in_d = (k < d)[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=W_ptr.dtype.element_ty)
    tiles = tl.max((hi - lo + BLOCK_E - 1) // BLOCK_E)
    for t in range(0, tiles):  # the row's entries, BLOCK_E at a time, in the code's order
        e = lo[:, None] + t * BLOCK_E + tl.arange(0, BLOCK_E).to(tl.int64)[None, :]  # [R, E]
        live = e < hi[:, None]
        c = tl.load(cols_ptr + e, mask=live, other=0).to(tl.int64)
        v = tl.load(values_ptr + e, mask=live, other=0.0)
        w = tl.load(W_ptr + c[:, :, None] * d + k[None, None, :], mask=live[:, :, None] & in_d[:, None, :],
                    other=0.0)  # [R, E, D]
        acc += tl.sum(v[:, :, None] * w, axis=1)
    mask = here[:, None] & in_d
    at = row[:, None] * d + k[None, :]
    x = tl.load(x_ptr + at, mask=mask, other=0.0)
    r = acc + tl.load(b_ptr + k, mask=k < d, other=0.0)[None, :] - x
    r = tl.where(mask, r, 0.0)
    tl.store(r_ptr + at, r, mask=mask)
    tl.store(g_ptr + at, r * _as(scale, x.dtype), mask=mask)  # the scale in x's dtype, as torch's product
    tl.store(sums_ptr + row, tl.sum(r * r, axis=1), mask=here)
    tl.store(sums_ptr + B + row, tl.sum(x * x, axis=1), mask=here)


def _into(out, like):
    """``out`` when it can take a result shaped, typed and placed as ``like`` (contiguous),
    else a new array."""
    if (out is not None and out.shape == like.shape and out.dtype == like.dtype
            and out.device == like.device and out.is_contiguous()):
        return out
    return torch.empty_like(like, memory_format=torch.contiguous_format)


def decode_residual(rows, cols, values, W, b, x, scale: float, *, out=None):
    """``(r, scale * r, sum of r^2, sum of x^2)`` of
    :meth:`~sae_ref.backends.StandardBackend.decode_residual` in one kernel and one sum
    (module docstring). ``rows`` ascending; ``W`` and ``x`` contiguous, one float dtype with
    ``values`` and ``b``; ``d`` at most the backward kernel's ``MAX_D``. ``out``: a buffer ``r``
    may be written into."""
    r = _into(out, x)
    g = torch.empty_like(r)
    sums = torch.empty((2, x.shape[0]), dtype=x.dtype, device=x.device)  # the rows' sums of r^2, x^2
    rows_residual(rows, cols, values, W, b, x, float(scale), r, g, sums)
    ss, xx = torch.sum(sums, dim=1)
    return r, g, ss, xx


def rows_residual(rows, cols, values, W, b, x, scale: float, r, g, sums):
    """The kernel's launch: ``r``, ``g`` and the rows' sums of squares of ``r`` and ``x``
    (``sums`` [2, B]) written; each row finds its entries in the ascending ``rows`` by
    bisection."""
    (B, d), n = x.shape, rows.shape[0]
    _, block_e, block_d, warps = _blocks(d)
    block_r = max(1, (1 << 18) // (block_e * block_d)) if interpreting() else 1
    _decode_residual_kernel[(triton.cdiv(B, block_r),)](
        rows, cols, values, W, b, x, r, g, sums, n, B, d, scale, STEPS=max(1, n.bit_length()),
        BLOCK_R=block_r, BLOCK_E=block_e, BLOCK_D=block_d, num_warps=warps)
