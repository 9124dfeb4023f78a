"""AuxK's loss against the residual as one fused Triton kernel.

:meth:`~sae_ref.backends.StandardBackend.aux_residual` asks, for AuxK's reconstruction ``e``
of the residual and the residual held negated (``x_hat - x``, the step's own array), for
``r = e + residual`` (the auxiliary error), the sum of its squares (the loss's numerator)
and its gradient ``scale * r``, zeroed when ``on`` is false (no dead latent). Composed, that
is an addition, a dot product, a scaling and a selection: four passes over [B, d]. Here
:func:`_aux_residual_kernel` makes one, writes the gradient into ``e``'s memory and each
program's sum of squares; one reduction adds those.

Only code that has checked that Triton imports imports this module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import flat_block
from ._triton_adam import _as


@triton.jit
def _aux_residual_kernel(e_ptr, res_ptr, on_ptr, ss_ptr, n, scale: tl.float64, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inside = i < n
    r = tl.load(e_ptr + i, mask=inside, other=0.0) + tl.load(res_ptr + i, mask=inside, other=0.0)
    tl.store(ss_ptr + tl.program_id(0), tl.sum(r * r, axis=0))
    on = tl.load(on_ptr) != 0
    g = tl.where(on, r * _as(scale, r.dtype), 0.0)  # the scale in r's dtype, as torch's product
    tl.store(e_ptr + i, g, mask=inside)


def aux_residual(e_hat, residual, scale: float, on):
    """``(sum of r^2, g)`` of :meth:`~sae_ref.backends.StandardBackend.aux_residual` in one
    kernel and one sum (``e_hat`` and ``residual`` contiguous, one float dtype; ``on`` a 0-D
    boolean); ``g`` is ``e_hat``, overwritten."""
    n = e_hat.numel()
    block = flat_block(n, gpu=4096, most=1 << 18)
    programs = max(1, triton.cdiv(n, block))
    ss = torch.empty((programs,), dtype=e_hat.dtype, device=e_hat.device)
    _aux_residual_kernel[(programs,)](e_hat, residual, on, ss, n, float(scale), BLOCK=block, num_warps=8)
    return torch.sum(ss), e_hat
