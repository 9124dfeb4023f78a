"""The keyed selection's two passes over the data as fused Triton kernels.

:func:`group_keys` reads the [B, h] pre-activations once and writes the [B, h/g] int64 keys
of the column groups' first maximal entries; the composed form
(:meth:`~sae_ref.backends.StandardBackend.group_keys`) is a max-with-argmax pass and about a
dozen elementwise passes over the group arrays. :func:`candidate_keys` gathers the chosen
groups' entries and keys them in one pass (composed: index arithmetic, a gather and the same
dozen passes). Both write exactly the composed form's keys, bit for bit (the tests check it):

- a value is widened to float32, ``-0.0`` made ``+0.0`` (the two are equal values), and its
  bits made order-preserving as a signed integer (a negative value's magnitude bits flipped);
- the key is those bits times ``2^32`` plus ``2^32 - 1 - pos``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: groups (or chosen groups) handled by one program
_BLOCK = 128


@triton.jit
def _ordered_key(val, pos):
    """The int64 key of float32 values ``val`` at int64 positions ``pos``."""
    bits = val.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)  # -0.0 is +0.0
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return bits.to(tl.int64) * 4294967296 + (4294967295 - pos)


@triton.jit
def _group_keys_kernel(x_ptr, out_ptr, h, w, per_row: tl.constexpr, G: tl.constexpr,
                       BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # the groups
    s = tl.arange(0, G).to(tl.int64)  # the slabs
    col = s[:, None] * w + j[None, :]  # [G, BLOCK]
    inside = j[None, :] < w
    val = tl.load(x_ptr + b * h + col, mask=inside, other=float("-inf")).to(tl.float32)
    bits = val.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    top = tl.max(bits, axis=0)  # [BLOCK]
    first = tl.min(tl.where(bits == top[None, :], s[:, None], G), axis=0)  # the lowest slab
    pos = first * w + j
    if not per_row:
        pos = b * h + pos
    key = top.to(tl.int64) * 4294967296 + (4294967295 - pos)
    tl.store(out_ptr + b * w + j, key, mask=j < w)


@triton.jit
def _candidate_keys_kernel(x_ptr, q_ptr, out_ptr, n, h, w, per_row: tl.constexpr,
                           G: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)  # the row (per row; 0 otherwise)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # the chosen groups
    s = tl.arange(0, G).to(tl.int64)
    inside = i < n
    q = tl.load(q_ptr + r * n + i, mask=inside, other=0)
    if per_row:
        col = q[:, None] + s[None, :] * w  # [BLOCK, G]
        at = r * h + col
        pos = col
    else:
        at = (q // w * h + q % w)[:, None] + s[None, :] * w
        pos = at
    val = tl.load(x_ptr + at, mask=inside[:, None], other=0.0).to(tl.float32)
    key = _ordered_key(val, pos)
    tl.store(out_ptr + (r * n + i)[:, None] * G + s[None, :], key, mask=inside[:, None])


def group_keys(x, g: int, *, per_row: bool):
    """:meth:`~sae_ref.backends.StandardBackend.group_keys` in one kernel (``x`` contiguous
    [B, h], float32, float16 or bfloat16; ``g`` a power of two dividing h)."""
    B, h = x.shape
    w = h // g
    out = torch.empty((B, w), dtype=torch.int64, device=x.device)
    grid = (B, triton.cdiv(w, _BLOCK))
    _group_keys_kernel[grid](x, out, h, w, per_row=per_row, G=g, BLOCK=_BLOCK)
    return out


def candidate_keys(x, q, g: int, *, per_row: bool):
    """:meth:`~sae_ref.backends.StandardBackend.candidate_keys` in one kernel."""
    B, h = x.shape
    w = h // g
    q = q.contiguous()
    n = q.shape[-1]
    rows = B if per_row else 1
    out = torch.empty((rows, n * g), dtype=torch.int64, device=x.device)
    grid = (rows, triton.cdiv(n, _BLOCK))
    _candidate_keys_kernel[grid](x, q, out, n, h, w, per_row=per_row, G=g, BLOCK=_BLOCK)
    return out if per_row else out.reshape(-1)


#: the widest block :func:`row_top_block` keeps a row of in registers
MAX_ROW_BLOCK = 8192


@triton.jit
def _row_top_block_kernel(pre_ptr, cols_ptr, out_ptr, h, cap, n, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    inside = c < cap
    col = tl.load(cols_ptr + c, mask=inside, other=h)
    real = inside & (col < h)
    val = tl.load(pre_ptr + b * h + col, mask=real, other=float("-inf")).to(tl.float32)
    bits = val.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # ordered as signed integers
    key = (bits ^ -2147483648).to(tl.uint32, bitcast=True)  # ordered as unsigned integers
    key = tl.where(inside, key, 0)
    # the n-th largest key, bit by bit from the top: the largest t with n keys >= t
    t = tl.zeros([], dtype=tl.uint32)
    for i in range(32):
        trial = t | (tl.full([], 1, tl.uint32) << (31 - i))
        enough = tl.sum((key >= trial).to(tl.int32), axis=0) >= n
        t = tl.where(enough, trial, t)
    above = key > t
    tie = inside & (key == t)
    need = n - tl.sum(above.to(tl.int32), axis=0)
    rank = tl.cumsum(tie.to(tl.int32), axis=0)  # the ties in column order
    kept = (above | (tie & (rank <= need))) & (val > 0)
    tl.store(out_ptr + b * cap + c, tl.where(kept, val, 0.0).to(out_ptr.dtype.element_ty), mask=inside)


def row_top_block(pre, cols, real, k: int):
    """:meth:`~sae_ref.backends.StandardBackend.row_top_block` in one kernel: each row's
    gather, its k-th largest key found bit by bit in registers, the tie rule's running
    count and the positive entries written (``pre`` contiguous, the block at most
    :data:`MAX_ROW_BLOCK` wide). ``real`` is implied by ``cols`` (``h`` marks padding)."""
    B, h = pre.shape
    cap = cols.shape[0]
    out = torch.empty((B, cap), dtype=pre.dtype, device=pre.device)
    cols = torch.where(real, cols, h).contiguous()
    _row_top_block_kernel[(B,)](pre, cols, out, h, cap, k, BLOCK=triton.next_power_of_2(cap))
    return out
