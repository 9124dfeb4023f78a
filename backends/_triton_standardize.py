"""The forward pass's per-row standardisation and the encoder's centred input as one fused
Triton kernel.

:meth:`~sae_ref.backends.StandardBackend.standardize` asks, for the batch ``x`` ([B, d]) and
the decoder bias ``b`` ([d]), for each row's mean and scale (the sample standard deviation plus
``eps``), the standardised rows ``(x - mean) / scale`` and the encoder's input, the standardised
rows minus ``b``. Composed, that is a mean, a subtraction, a dot product, a square root, an
addition, a division and the bias's subtraction: seven launches and four passes over [B, d].
Here :func:`_standardize_kernel` holds a row in registers and writes the two [B, d] results
and the row's two statistics in one pass.

Only code that has checked that Triton imports imports this module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import interpreting
from ._triton_adam import _as, _div, _sqrt


@triton.jit
def _standardize_kernel(x_ptr, b_ptr, s_ptr, c_ptr, mean_ptr, scale_ptr, B, d, eps: tl.float64,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # [R]
    k = tl.arange(0, BLOCK_D).to(tl.int64)
    mask = (row < B)[:, None] & (k < d)[None, :]
    at = row[:, None] * d + k[None, :]
    x = tl.load(x_ptr + at, mask=mask, other=0.0)
    mean = _div(tl.sum(x, axis=1), tl.zeros_like(tl.sum(x, axis=1)) + d)
    centred = tl.where(mask, x - mean[:, None], 0.0)
    ss = tl.sum(centred * centred, axis=1)
    # correctly rounded, as the composed form's (Triton's float32 / and sqrt approximate)
    scale = _sqrt(_div(ss, tl.zeros_like(ss) + (d - 1))) + _as(eps, x.dtype)  # eps in x's dtype
    s = _div(centred, scale[:, None] + tl.zeros_like(centred))
    tl.store(s_ptr + at, s, mask=mask)
    tl.store(c_ptr + at, s - tl.load(b_ptr + k, mask=k < d, other=0.0)[None, :], mask=mask)
    tl.store(mean_ptr + row, mean, mask=row < B)
    tl.store(scale_ptr + row, scale, mask=row < B)


#: the widest rows the kernel holds in registers
MAX_D = 1 << 14


def standardize(x, b, eps: float):
    """``(x_std, mean, scale, x_std - b)`` of
    :meth:`~sae_ref.backends.StandardBackend.standardize` in one kernel (``x`` contiguous
    [B, d], ``b`` [d] of its float dtype, ``d`` at most :data:`MAX_D`)."""
    B, d = x.shape
    s, c = torch.empty_like(x), torch.empty_like(x)
    mean = torch.empty((B, 1), dtype=x.dtype, device=x.device)
    scale = torch.empty((B, 1), dtype=x.dtype, device=x.device)
    block_d = triton.next_power_of_2(max(d, 1))
    block_r = max(1, (1 << 16) // block_d) if interpreting() else 1
    warps = max(1, min(16, block_d // 256))
    _standardize_kernel[(triton.cdiv(B, block_r),)](x, b, s, c, mean, scale, B, d, eps,
                                                     BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return s, mean, scale, c
