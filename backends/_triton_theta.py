"""The BatchTopK threshold estimate's per-step work as fused Triton kernels.

- :func:`min_positive`: the batch's smallest kept (positive) value. Composed: a fill, a
  comparison, a selection and a minimum. Here positive floats order as their bit patterns do
  (as signed integers), so each program takes an integer ``atomic_min`` into one word: the
  minimum does not depend on the order the programs arrive in.
- :func:`running_mean_step`: the running mean's ring buffer with this step's value put at its
  slot, and the mean of the finite entries. Composed: about a dozen launches over a buffer of
  ``window`` entries; here one program.

Only code that has checked that Triton imports imports this module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import flat_block, interpreting
from ._triton_adam import _div

_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


@triton.jit
def _min_positive_kernel(values_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    v = tl.load(values_ptr + i, mask=i < n, other=0.0)
    INT: tl.constexpr = tl.int32 if values_ptr.dtype.element_ty == tl.float32 else tl.int64
    bits = v.to(INT, bitcast=True)
    top = tl.full(bits.shape, float("inf"), v.dtype).to(INT, bitcast=True)
    least = tl.min(tl.where(v > 0, bits, top), axis=0)
    tl.atomic_min(out_ptr, least)


def min_positive(values):
    """:meth:`~sae_ref.backends.StandardBackend.min_positive` in one fill and one kernel
    (``values`` contiguous float32 or float64)."""
    n = values.shape[0]
    out = torch.full((1,), float("inf"), dtype=values.dtype, device=values.device).view(_INT[values.dtype])
    if n:
        block = flat_block(n)
        _min_positive_kernel[(triton.cdiv(n, block),)](values, out, n, BLOCK=block)
    return out.view(values.dtype)[0]


@triton.jit
def _running_mean_kernel(buf_ptr, m_ptr, new_ptr, mean_ptr, window, slot, CHUNK: tl.constexpr):
    m = tl.load(m_ptr)
    finite = (m == m) & (tl.abs(m) != float("inf"))
    put = tl.where(finite, m, float("nan"))
    total = tl.zeros([CHUNK], dtype=m.dtype)
    count = tl.zeros([CHUNK], dtype=tl.int64)
    for j0 in range(0, window, CHUNK):
        j = j0 + tl.arange(0, CHUNK).to(tl.int64)
        inside = j < window
        b = tl.load(buf_ptr + j, mask=inside, other=float("nan"))
        b = tl.where(j == slot, put, b)
        tl.store(new_ptr + j, b, mask=inside)
        seen = inside & (b == b) & (tl.abs(b) != float("inf"))
        total += tl.where(seen, b, 0.0)
        count += seen.to(tl.int64)
    # correctly rounded, as the composed form's (Triton's float32 / approximates)
    tl.store(mean_ptr, _div(tl.sum(total, axis=0), tl.sum(count, axis=0).to(m.dtype)))


def running_mean_step(buf, m, slot: int):
    """:meth:`~sae_ref.backends.StandardBackend.running_mean_step` in one program (``buf``
    contiguous 1-D float32 or float64, ``m`` 0-D of its dtype)."""
    new = torch.empty_like(buf)
    mean = torch.empty((), dtype=buf.dtype, device=buf.device)
    chunk = 1 << 16 if interpreting() else 1024
    _running_mean_kernel[(1,)](buf, m, new, mean, buf.shape[0], slot, CHUNK=chunk)
    return new, mean
