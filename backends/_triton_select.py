"""The keyed selection's passes over the data as fused Triton kernels.

:func:`group_keys` reads the [B, h] pre-activations once and writes the [B, h/g] int64 keys
of the column groups' first maximal entries; the composed form
(:meth:`~sae_ref.backends.StandardBackend.group_keys`) is a max-with-argmax pass and about a
dozen elementwise passes over the group arrays. :func:`subgroup_keys` gathers the chosen
groups' entries, keys them and keeps each subgroup's largest key in one pass, and
:func:`subgroup_entry_keys` gathers and keys the entries of the chosen subgroups, named by
their keys (composed: index arithmetic, a gather and the same dozen passes). Each writes
exactly the composed form's keys, bit for bit (the tests check it):

- a value is widened to float32, ``-0.0`` made ``+0.0`` (the two are equal values), and its
  bits made order-preserving as a signed integer (a negative value's magnitude bits flipped);
- the key is those bits times ``2^32`` plus ``2^32 - 1 - pos``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import flat_block, interpreting

#: groups (or chosen groups) handled by one program
_BLOCK = 128


def _per_program() -> int:
    """Elements a program of :func:`row_top_block` holds: one row on a GPU (a row's search
    runs in registers); under the interpreter, whose cost is per program, many rows."""
    return 1 << 16 if interpreting() else 1


@triton.jit
def _ordered_bits(val):
    """The int32 bits of float32 values ``val``, ordered as the values are (as signed
    integers): -0.0 made +0.0, a negative value's magnitude bits flipped."""
    bits = val.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)  # -0.0 is +0.0
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _ordered_key(bits, pos):
    """The int64 key of ordered bits ``bits`` (:func:`_ordered_bits`) at int64 positions ``pos``."""
    return bits.to(tl.int64) * 4294967296 + (4294967295 - pos)


@triton.jit
def _group_keys_kernel(x_ptr, out_ptr, runs_ptr, total, h, w, per_row: tl.constexpr, G: tl.constexpr,
                       R: tl.constexpr, BLOCK: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # b w + j
    b, j = p // w, p % w
    s = tl.arange(0, G).to(tl.int64)  # the slabs
    col = s[:, None] * w + j[None, :]  # [G, BLOCK]
    inside = p < total
    val = tl.load(x_ptr + b[None, :] * h + col, mask=inside[None, :], other=float("-inf")).to(tl.float32)
    bits = _ordered_bits(val)
    top = tl.max(bits, axis=0)  # [BLOCK]
    first = tl.min(tl.where(bits == top[None, :], s[:, None], G), axis=0)  # the lowest slab
    pos = first * w + j
    if not per_row:
        pos = b * h + pos
    key = _ordered_key(top, pos)
    tl.store(out_ptr + p, key, mask=inside)
    if R > 1:  # each run of R consecutive keys (the block holds whole runs) and its maximum
        u = tl.program_id(0).to(tl.int64) * (BLOCK // R) + tl.arange(0, BLOCK // R).to(tl.int64)
        run = tl.max(tl.reshape(tl.where(inside, key, -9223372036854775807 - 1), [BLOCK // R, R]), axis=1)
        tl.store(runs_ptr + u, run, mask=u * R < total)


@triton.jit
def _subgroup_keys_kernel(x_ptr, top_ptr, out_ptr, total, n, h, w, per_row: tl.constexpr,
                          G: tl.constexpr, S: tl.constexpr, BLOCK: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # r n + i
    s = tl.arange(0, G).to(tl.int64)
    inside = p < total
    pos = 4294967295 - (tl.load(top_ptr + p, mask=inside, other=0) & 4294967295)  # the group's largest entry
    if per_row:
        q = pos % w
    else:
        q = pos // h * w + pos % h % w
    if per_row:
        col = q[:, None] + s[None, :] * w  # [BLOCK, G]
        at = (p // n * h)[:, None] + col
        pos = col
    else:
        at = (q // w * h + q % w)[:, None] + s[None, :] * w
        pos = at
    val = tl.load(x_ptr + at, mask=inside[:, None], other=0.0).to(tl.float32)
    key = tl.max(tl.reshape(_ordered_key(_ordered_bits(val), pos), [BLOCK, G // S, S]), axis=2)
    u = tl.arange(0, G // S).to(tl.int64)
    tl.store(out_ptr + p[:, None] * (G // S) + u[None, :], key, mask=inside[:, None])


@triton.jit
def _subgroup_entry_keys_kernel(x_ptr, top_ptr, out_ptr, total, n, h, w, per_row: tl.constexpr,
                                S: tl.constexpr, BLOCK: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # r n + i
    inside = p < total
    top = tl.load(top_ptr + p, mask=inside, other=0)
    pos = 4294967295 - (top & 4294967295)  # the subgroup's largest entry
    if per_row:
        row = p // n
        col = pos
    else:
        row = pos // h
        col = pos % h
    first = (col // w) // S * S  # the subgroup's first slab
    c = (col % w)[:, None] + (first[:, None] + tl.arange(0, S).to(tl.int64)[None, :]) * w  # [BLOCK, S]
    at = (row * h)[:, None] + c
    val = tl.load(x_ptr + at, mask=inside[:, None], other=0.0).to(tl.float32)
    key = _ordered_key(_ordered_bits(val), c if per_row else at)
    tl.store(out_ptr + p[:, None] * S + tl.arange(0, S).to(tl.int64)[None, :], key, mask=inside[:, None])


def _block(g: int) -> int:
    """Groups a program of the two kernels handles: 128 on a GPU; under the interpreter,
    whose cost is per program, up to 2^16 entries."""
    return max(_BLOCK, (1 << 16) // g) if interpreting() else _BLOCK


def group_keys(x, g: int, *, per_row: bool, runs: int | None = None):
    """:meth:`~sae_ref.backends.StandardBackend.group_keys` in one kernel (``x`` contiguous
    [B, h], float32, float16 or bfloat16; ``g`` a power of two dividing h; ``runs`` a power
    of two up to 128 dividing a row's keys ``per_row``, else all of them)."""
    B, h = x.shape
    w = h // g
    r = runs or 1
    if (w if per_row else B * w) % r:
        raise ValueError(f"group_keys: argument 'runs' ({r}) must divide the keys of "
                         f"{'a row' if per_row else 'the batch'} ({w if per_row else B * w})")
    out = torch.empty((B, w), dtype=torch.int64, device=x.device)
    runs_shape = (B, w // r) if per_row else (B * w // r,)  # a row's runs, or the flat array's
    run_max = torch.empty(runs_shape, dtype=torch.int64, device=x.device) if r > 1 else out
    block = _block(g)
    _group_keys_kernel[(triton.cdiv(B * w, block),)](x, out, run_max, B * w, h, w, per_row=per_row, G=g, R=r,
                                                     BLOCK=block, enable_fp_fusion=False)
    return (out, run_max) if runs is not None else out


def subgroup_keys(x, top, g: int, s: int, *, per_row: bool):
    """:meth:`~sae_ref.backends.StandardBackend.subgroup_keys` in one kernel."""
    B, h = x.shape
    q = top.contiguous()
    n = q.shape[-1]
    out = torch.empty(q.shape + (g // s,), dtype=torch.int64, device=x.device)
    block = _block(g)
    _subgroup_keys_kernel[(triton.cdiv(q.numel(), block),)](x, q, out, q.numel(), n, h, h // g,
                                                            per_row=per_row, G=g, S=s, BLOCK=block,
                                                            enable_fp_fusion=False)
    return out.reshape(B, n * (g // s)) if per_row else out.reshape(-1)


def subgroup_entry_keys(x, top, g: int, s: int, *, per_row: bool):
    """:meth:`~sae_ref.backends.StandardBackend.subgroup_entry_keys` in one kernel."""
    B, h = x.shape
    top = top.contiguous()
    n = top.shape[-1]
    out = torch.empty(top.shape + (s,), dtype=torch.int64, device=x.device)
    block = _block(s)
    _subgroup_entry_keys_kernel[(triton.cdiv(top.numel(), block),)](x, top, out, top.numel(), n, h, h // g,
                                                                    per_row=per_row, S=s, BLOCK=block,
                                                                    enable_fp_fusion=False)
    return out.reshape(B, n * s) if per_row else out.reshape(-1)


@triton.jit
def _code_at_kernel(x_ptr, idx_ptr, rows_ptr, cols_ptr, values_ptr, n, h, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inside = i < n
    at = tl.load(idx_ptr + i, mask=inside, other=0).to(tl.int64)
    val = tl.load(x_ptr + at, mask=inside, other=0.0)
    tl.store(rows_ptr + i, at // h, mask=inside)
    tl.store(cols_ptr + i, at % h, mask=inside)
    keep = val.to(tl.float32) > 0  # compared widened (half precision included)
    tl.store(values_ptr + i, tl.where(keep, val, tl.zeros_like(val)), mask=inside)


def code_at(x, idx):
    """:meth:`~sae_ref.backends.StandardBackend.code_at` in one kernel (``x`` contiguous,
    ``idx`` int64)."""
    n, h = idx.shape[0], x.shape[1]
    rows, cols = torch.empty_like(idx), torch.empty_like(idx)
    values = torch.empty((n,), dtype=x.dtype, device=x.device)
    block = flat_block(n)
    _code_at_kernel[(triton.cdiv(n, block),)](x, idx, rows, cols, values, n, h, BLOCK=block)
    return rows, cols, values


#: the widest block :func:`row_top_block` keeps a row of in registers
MAX_ROW_BLOCK = 8192


@triton.jit
def _row_top_block_kernel(pre_ptr, cols_ptr, out_ptr, B, h, cap, n, ROWS: tl.constexpr,
                          BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)  # the rows
    c = tl.arange(0, BLOCK)
    inside = (c < cap)[None, :] & (b < B)[:, None]  # [ROWS, BLOCK]
    col = tl.load(cols_ptr + c, mask=c < cap, other=h)
    real = inside & (col < h)[None, :]
    val = tl.load(pre_ptr + b[:, None] * h + col[None, :], mask=real, other=float("-inf")).to(tl.float32)
    key = (_ordered_bits(val) ^ -2147483648).to(tl.uint32, bitcast=True)  # ordered as unsigned integers
    key = tl.where(inside, key, 0)
    # each row's n-th largest key, bit by bit from the top: the largest t with n keys >= t
    t = tl.zeros([ROWS], dtype=tl.uint32)
    for i in range(32):
        trial = t | (tl.full([ROWS], 1, tl.uint32) << (31 - i))
        enough = tl.sum((key >= trial[:, None]).to(tl.int32), axis=1) >= n
        t = tl.where(enough, trial, t)
    above = key > t[:, None]
    tie = inside & (key == t[:, None])
    need = n - tl.sum(above.to(tl.int32), axis=1)
    rank = tl.cumsum(tie.to(tl.int32), axis=1)  # the ties in column order
    kept = (above | (tie & (rank <= need[:, None]))) & (val > 0)
    out = tl.where(kept, val, 0.0).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + b[:, None] * cap + c[None, :], out, mask=inside)


def row_top_block(pre, cols, real, k: int):
    """:meth:`~sae_ref.backends.StandardBackend.row_top_block` in one kernel: each row's
    gather, its k-th largest key found bit by bit in registers, the tie rule's running
    count and the positive entries written (``pre`` contiguous, the block at most
    :data:`MAX_ROW_BLOCK` wide). ``real`` is implied by ``cols`` (``h`` marks padding)."""
    B, h = pre.shape
    cap = cols.shape[0]
    out = torch.empty((B, cap), dtype=pre.dtype, device=pre.device)
    cols = torch.where(real, cols, h).contiguous()
    block = triton.next_power_of_2(cap)
    rows = max(1, min(triton.next_power_of_2(B), _per_program() // block))
    _row_top_block_kernel[(triton.cdiv(B, rows),)](pre, cols, out, B, h, cap, k, ROWS=rows, BLOCK=block,
                                                   num_warps=min(16, max(4, rows * block // 512)),
                                                   enable_fp_fusion=False)
    return out
