"""The training step's decoding and its squared error as one fused Triton kernel.

:meth:`~sae_ref.backends.StandardBackend.decode_residual` asks, for a code ``f`` (entries
``values`` at ``(rows, cols)``, shape (B, h)), the decoder ``W`` ([h, d]) and bias ``b``, and
the input ``x`` ([B, d]), for

- the residual ``r = f W + b - x`` ([B, d]);
- its gradient-scaled copy ``scale * r`` (the loss's gradient on the reconstruction);
- the sum of squares of ``r`` (the loss's value, times its normaliser).

Composed on a GPU, that is a sort of the entries by row and a CSR build for cuSPARSE's product,
the product, the bias added, the input subtracted, a dot product and a scaling: about a dozen
launches, each [B, d] pass through memory again. Here the code's entries come sorted by row
(every code the selection makes lists them row-major; the row bounds are one
``searchsorted``), and :func:`_decode_residual_kernel` takes a row at a time: it sums the
row's decoder rows times their values in registers, adds the bias, subtracts the input and
writes ``r``, ``scale * r`` and the row's sum of squares. The rows' sums are added by one
reduction afterwards. No atomics: the same bits every run.

Only code that has checked that Triton imports imports this module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import interpreting
from ._triton_sparse import _blocks


@triton.jit
def _decode_residual_kernel(crow_ptr, cols_ptr, values_ptr, W_ptr, b_ptr, x_ptr, scale_ptr, r_ptr,
                            g_ptr, ss_ptr, B, d,
                            BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # [R]
    here = row < B
    lo = tl.load(crow_ptr + row, mask=here, other=0).to(tl.int64)
    hi = tl.load(crow_ptr + row + 1, mask=here, other=0).to(tl.int64)
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
    r = acc + tl.load(b_ptr + k, mask=k < d, other=0.0)[None, :] - tl.load(x_ptr + at, mask=mask, other=0.0)
    r = tl.where(mask, r, 0.0)
    tl.store(r_ptr + at, r, mask=mask)
    tl.store(g_ptr + at, r * tl.load(scale_ptr), mask=mask)
    tl.store(ss_ptr + row, tl.sum(r * r, axis=1), mask=here)


def _into(out, like):
    """``out`` when it can take a result shaped, typed and placed as ``like`` (contiguous),
    else a new array."""
    if (out is not None and out.shape == like.shape and out.dtype == like.dtype
            and out.device == like.device and out.is_contiguous()):
        return out
    return torch.empty_like(like, memory_format=torch.contiguous_format)


def decode_residual(rows, cols, values, W, b, x, scale: float, *, out=None):
    """``(r, scale * r, sum of r^2)`` of
    :meth:`~sae_ref.backends.StandardBackend.decode_residual` in one kernel and one sum
    (module docstring). ``rows`` ascending; ``W`` and ``x`` contiguous, one float dtype with
    ``values`` and ``b``; ``d`` at most the backward kernel's ``MAX_D``. ``out``: a buffer ``r``
    may be written into."""
    B, d = x.shape
    crow = torch.searchsorted(rows, torch.arange(B + 1, dtype=rows.dtype, device=rows.device))
    r = _into(out, x)
    g = torch.empty_like(r)
    ss = torch.empty((B,), dtype=x.dtype, device=x.device)
    s = torch.full((1,), scale, dtype=x.dtype, device=x.device)
    rows_residual(crow, cols, values, W, b, x, s, r, g, ss)
    return r, g, torch.sum(ss)


def rows_residual(crow, cols, values, W, b, x, scale, r, g, ss):
    """The kernel's launch: ``r``, ``g`` and the rows' sums of squares ``ss`` written from the
    row bounds ``crow`` ([B + 1]) and the 1-element ``scale``."""
    B, d = x.shape
    _, block_e, block_d, warps = _blocks(d)
    block_r = max(1, (1 << 18) // (block_e * block_d)) if interpreting() else 1
    _decode_residual_kernel[(triton.cdiv(B, block_r),)](
        crow, cols, values, W, b, x, scale, r, g, ss, B, d,
        BLOCK_R=block_r, BLOCK_E=block_e, BLOCK_D=block_d, num_warps=warps)

