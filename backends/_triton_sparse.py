"""The backward pass's three sparse products as fused Triton kernels.

For a code ``f`` with entries ``values`` at ``(rows, cols)`` (shape (B, h)), decoded by ``W``
([h, d]) from inputs ``X`` ([B, d]), and the gradient ``G`` ([B, d]) on the decoding,
:meth:`~sae_ref.backends.StandardBackend.backward_products` asks for

- ``g_f[i] = G[rows[i]] . W[cols[i]]`` (plus ``g_code[i]``), the sampled product;
- ``g_W = f^T G`` and ``g_X = g_f^T X``, both [h, d];
- each latent's sum of ``g_f`` ([h], the encoder bias's gradient).

The composed form on a GPU is cuSPARSE's sampled product and three CSR products (the sums
are one too), each with its own sort of the entries, CSR build and scatter back: about 35
launches, and every entry reads a decoder row, a row of ``G`` and a row of ``X`` from memory.
Here the entries are sorted by latent once, and :func:`_latent_products_kernel` computes
everything latent by latent: a program holds its latent's decoder row ``W[j]`` in registers
(the decoder is read once, not once per entry), and for each of the latent's entries loads
the row of ``G``, takes the dot product (``g_f``), adds the row times ``f`` into ``g_W[j]``,
then loads the row of ``X`` and adds it times ``g_f`` into ``g_X[j]`` (and ``g_f`` into the
latent's sum). No atomics: the same bits every run.

A latent that fires often would make one program long (a latent fires at most once per row,
so up to B entries). Its entries are cut into parts of at most ``part`` entries, one program
(a slot) each; a latent of one part writes its rows of ``g_W`` and ``g_X`` directly, the parts
of a longer one write partial rows that :func:`_sum_parts_kernel` adds in order. The slots'
count is bounded by ``h + nnz / part``, so the launch sizes depend on the shapes alone, and
:func:`_slots_kernel`, one program, lays them out.

A padded code (entries of value 0 listed but not kept) gets ``g_f = 0`` at those entries, as
:meth:`~sae_ref.backends.StandardBackend.backward_products` defines.

Only code that has checked that Triton imports imports this module.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._triton import interpreting

#: the most entries one program takes on a GPU (a latent's part): a program's loop is at most
#: PART / 4 tiles long at d = 768, so a latent firing in every row of the batch is spread over
#: B / PART programs instead of holding one for the whole kernel
PART = 128
#: the widest rows the kernels hold in registers
MAX_D = 1 << 15


@triton.jit
def _latent_products_kernel(G_ptr, W_ptr, X_ptr, rows_ptr, values_ptr, code_ptr, pos_ptr, crow_ptr,
                            first_ptr, multi_first_ptr, slot_latent_ptr, g_f_ptr, out_W_ptr,
                            out_X_ptr, out_s_ptr, part_W_ptr, part_X_ptr, part_s_ptr, h, d, n_slots,
                            part,
                            HAS_CODE: tl.constexpr, PADDED: tl.constexpr, BLOCK_L: tl.constexpr,
                            BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    slot = tl.program_id(0).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)  # [L]
    j = tl.load(slot_latent_ptr + slot, mask=slot < n_slots, other=h).to(tl.int64)
    busy = j < h
    j = tl.where(busy, j, 0)
    lo = tl.load(crow_ptr + j, mask=busy, other=0).to(tl.int64)
    hi = tl.load(crow_ptr + j + 1, mask=busy, other=0).to(tl.int64)
    which = slot - tl.load(first_ptr + j, mask=busy, other=0)  # this slot's part of latent j
    start = lo + which * part
    end = tl.minimum(start + part, hi)
    k = tl.arange(0, BLOCK_D).to(tl.int64)
    row_mask = busy[:, None] & (k < d)[None, :]
    w = tl.load(W_ptr + j[:, None] * d + k[None, :], mask=row_mask, other=0.0)  # [L, D]
    acc_W = tl.zeros([BLOCK_L, BLOCK_D], dtype=w.dtype)
    acc_X = tl.zeros([BLOCK_L, BLOCK_D], dtype=w.dtype)
    acc_s = tl.zeros([BLOCK_L], dtype=w.dtype)
    tiles = tl.max((end - start + BLOCK_E - 1) // BLOCK_E)
    for t in range(0, tiles):  # the part's entries, BLOCK_E at a time, in the sorted order
        e = start[:, None] + t * BLOCK_E + tl.arange(0, BLOCK_E).to(tl.int64)[None, :]  # [L, E]
        live = e < end[:, None]
        r = tl.load(rows_ptr + e, mask=live, other=0).to(tl.int64)
        f = tl.load(values_ptr + e, mask=live, other=0.0)
        at = r[:, :, None] * d + k[None, None, :]  # [L, E, D]
        m = live[:, :, None] & row_mask[:, None, :]
        g = tl.load(G_ptr + at, mask=m, other=0.0)
        g_f = tl.sum(g * w[:, None, :], axis=2)  # [L, E]
        if HAS_CODE:
            g_f += tl.load(code_ptr + e, mask=live, other=0.0)
        if PADDED:  # listed but not kept: no gradient there
            g_f = tl.where(f != 0, g_f, 0.0)
        tl.store(g_f_ptr + tl.load(pos_ptr + e, mask=live, other=0), g_f, mask=live)
        acc_s += tl.sum(g_f, axis=1)
        acc_W += tl.sum(f[:, :, None] * g, axis=1)
        acc_X += tl.sum(g_f[:, :, None] * tl.load(X_ptr + at, mask=m, other=0.0), axis=1)
    # a latent of one part: its rows; a part of a longer one: its partial rows
    single = hi - lo <= part
    out = j[:, None] * d + k[None, :]
    tl.store(out_W_ptr + out, acc_W, mask=row_mask & single[:, None])
    tl.store(out_X_ptr + out, acc_X, mask=row_mask & single[:, None])
    tl.store(out_s_ptr + j, acc_s, mask=busy & single)
    at = tl.load(multi_first_ptr + j, mask=busy, other=0) + which
    partial = at[:, None] * d + k[None, :]
    tl.store(part_W_ptr + partial, acc_W, mask=row_mask & ~single[:, None])
    tl.store(part_X_ptr + partial, acc_X, mask=row_mask & ~single[:, None])
    tl.store(part_s_ptr + at, acc_s, mask=busy & ~single)


@triton.jit
def _sum_parts_kernel(crow_ptr, multi_first_ptr, part_W_ptr, part_X_ptr, part_s_ptr, out_W_ptr,
                      out_X_ptr, out_s_ptr, h, d, part, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
    here = j < h
    count = tl.load(crow_ptr + j + 1, mask=here, other=0) - tl.load(crow_ptr + j, mask=here, other=0)
    parts = tl.where(here & (count > part), (count + part - 1) // part, 0).to(tl.int64)
    first = tl.load(multi_first_ptr + j, mask=here, other=0).to(tl.int64)
    k = tl.arange(0, BLOCK_D).to(tl.int64)
    in_d = (k < d)[None, :]
    acc_W = tl.zeros([BLOCK_L, BLOCK_D], dtype=out_W_ptr.dtype.element_ty)
    acc_X = tl.zeros([BLOCK_L, BLOCK_D], dtype=out_W_ptr.dtype.element_ty)
    acc_s = tl.zeros([BLOCK_L], dtype=out_W_ptr.dtype.element_ty)
    for t in range(0, tl.max(parts)):  # in order: the same bits every run
        live = t < parts
        at = (first + t)[:, None] * d + k[None, :]
        acc_W += tl.load(part_W_ptr + at, mask=live[:, None] & in_d, other=0.0)
        acc_X += tl.load(part_X_ptr + at, mask=live[:, None] & in_d, other=0.0)
        acc_s += tl.load(part_s_ptr + first + t, mask=live, other=0.0)
    out = j[:, None] * d + k[None, :]
    tl.store(out_W_ptr + out, acc_W, mask=(parts > 0)[:, None] & in_d)
    tl.store(out_X_ptr + out, acc_X, mask=(parts > 0)[:, None] & in_d)
    tl.store(out_s_ptr + j, acc_s, mask=parts > 0)


def _blocks(d: int) -> tuple[int, int, int, int]:
    """(latent slots, entries, columns, warps) of a program: on a GPU one slot, whole rows
    and a few entries at a time (a tile of 4096 elements, 16 a thread); under the
    interpreter, whose cost is per program and per operation, many slots at once."""
    block_d = triton.next_power_of_2(max(d, 1))
    block_e = max(1, min(16, 4096 // block_d))
    warps = max(4, min(16, block_e * block_d // 512))
    if interpreting():
        return max(1, (1 << 18) // (block_e * block_d)), block_e, block_d, 1
    return 1, block_e, block_d, warps


def _into(out, h: int, d: int, like):
    """``out`` when it can take an [h, d] result of ``like``'s dtype and device (contiguous),
    else a new array."""
    if (out is not None and tuple(out.shape) == (h, d) and out.dtype == like.dtype
            and out.device == like.device and out.is_contiguous()):
        return out
    return torch.empty((h, d), dtype=like.dtype, device=like.device)


def default_part(B: int) -> int:
    """The most entries a program takes: :data:`PART` on a GPU; under the interpreter the batch
    size (a latent fires at most once a row, so none has two parts and the second kernel is
    not launched)."""
    return max(B, 1) if interpreting() else PART


class Plan(NamedTuple):
    """The entries sorted by latent and the programs' slots (:func:`plan`)."""

    order: object          # [nnz] the sorted entries' places in the code
    rows: object           # [nnz] their rows
    values: object         # [nnz] their values
    code: object           # [nnz] their g_code, or None
    crow: object           # [h + 1] each latent's first sorted entry
    first: object          # [h] each latent's first slot
    multi_first: object    # [h] each latent's first partial row (latents of two parts or more)
    slot_latent: object    # [n_slots] each slot's latent (h: no latent)
    n_multi: int           # partial rows
    part: int              # the most entries a slot takes


@triton.jit
def _slots_kernel(crow_ptr, first_ptr, multi_first_ptr, slot_latent_ptr, h, n_slots, part,
                  CHUNK: tl.constexpr):
    """One program: the latents CHUNK at a time, each chunk's running sums carried over."""
    carry = tl.zeros([1], dtype=tl.int64)
    carry_multi = tl.zeros([1], dtype=tl.int64)
    for j0 in range(0, h, CHUNK):
        j = j0 + tl.arange(0, CHUNK).to(tl.int64)
        inside = j < h
        count = tl.load(crow_ptr + j + 1, mask=inside, other=0) - tl.load(crow_ptr + j, mask=inside, other=0)
        parts = tl.where(inside, tl.maximum((count + part - 1) // part, 1), 0).to(tl.int64)
        multi = tl.where(parts > 1, parts, 0)
        first = carry + tl.cumsum(parts, 0) - parts
        tl.store(first_ptr + j, first, mask=inside)
        tl.store(multi_first_ptr + j, carry_multi + tl.cumsum(multi, 0) - multi, mask=inside)
        for t in range(0, tl.max(parts)):  # each latent's slots name it
            tl.store(slot_latent_ptr + first + t, j, mask=t < parts)
        carry += tl.sum(parts)
        carry_multi += tl.sum(multi)
    total = tl.sum(carry)
    for s0 in range(0, n_slots, CHUNK):  # the slots past the last latent's: none (h)
        slot = s0 + tl.arange(0, CHUNK).to(tl.int64)
        tl.store(slot_latent_ptr + slot, tl.zeros([CHUNK], dtype=tl.int64) + h,
                 mask=(slot >= total) & (slot < n_slots))


def slots(crow, n_slots: int, part: int, *, chunk: int | None = None):
    """``(first, multi_first, slot_latent)`` of :class:`Plan` from the segments' bounds, in
    one launch (one program: about ten small kernels composed, :func:`slots_composed`);
    ``chunk``: the latents the program takes at a time (a power of two)."""
    h = crow.shape[0] - 1
    first = torch.empty((h,), dtype=torch.int64, device=crow.device)
    multi_first = torch.empty((h,), dtype=torch.int64, device=crow.device)
    slot_latent = torch.empty((n_slots,), dtype=torch.int64, device=crow.device)
    chunk = chunk or (1 << 16 if interpreting() else 1024)
    _slots_kernel[(1,)](crow, first, multi_first, slot_latent, h, n_slots, part, CHUNK=chunk, num_warps=4)
    return first, multi_first, slot_latent


def slots_composed(crow, n_slots: int, part: int):
    """:func:`slots` in torch's composed kernels: each latent's parts (an empty latent has one:
    its rows of zeros), its first slot and first partial row (latents of two parts or more),
    and each slot's latent (``h`` past the last)."""
    counts = crow[1:] - crow[:-1]
    parts = torch.clamp_min((counts + part - 1) // part, 1)
    last = torch.cumsum(parts, 0)
    multi = torch.where(parts > 1, parts, 0)
    at = torch.arange(n_slots, dtype=last.dtype, device=last.device)
    return last - parts, torch.cumsum(multi, 0) - multi, torch.searchsorted(last, at, right=True)


def plan(rows, cols, values, g_code, h: int, B: int, part: int | None = None) -> Plan:
    """The entries sorted by latent (stably: each latent sums its entries in the code's order)
    and cut into slots of at most ``part`` entries; every size depends on the shapes alone."""
    n = values.shape[0]
    part = default_part(B) if part is None else part
    order = torch.argsort(cols, stable=True)
    bounds = torch.arange(h + 1, dtype=cols.dtype, device=cols.device)
    crow = torch.searchsorted(cols.index_select(0, order), bounds)
    n_slots = h + n // part + 1  # > the sum of ceil(count / part) over the latents
    sort = lambda a: None if a is None else a.index_select(0, order)
    return Plan(order, sort(rows), sort(values), sort(g_code), crow, *slots(crow, n_slots, part),
                min(n_slots, 2 * n // part + 1), part)  # > the slots of latents of two parts or more


def products(p: Plan, G, W, X, *, padded: bool, out_W=None, out_X=None):
    """``(g_f, g_W, g_X, g_sums)`` from a :class:`Plan`: the two kernels' launches."""
    n, (h, d), B = p.values.shape[0], W.shape, G.shape[0]
    block_l, block_e, block_d, warps = _blocks(d)
    part_W = torch.empty((p.n_multi, d), dtype=W.dtype, device=W.device)
    part_X = torch.empty((p.n_multi, d), dtype=W.dtype, device=W.device)
    part_s = torch.empty((p.n_multi,), dtype=W.dtype, device=W.device)
    g_f = torch.empty((n,), dtype=W.dtype, device=W.device)
    g_s = torch.empty((h,), dtype=W.dtype, device=W.device)
    out_W, out_X = _into(out_W, h, d, W), _into(out_X, h, d, W)
    n_slots = p.slot_latent.shape[0]
    _latent_products_kernel[(triton.cdiv(n_slots, block_l),)](
        G, W, X, p.rows, p.values, g_f if p.code is None else p.code, p.order, p.crow, p.first,
        p.multi_first, p.slot_latent, g_f, out_W, out_X, g_s, part_W, part_X, part_s, h, d, n_slots,
        p.part,
        HAS_CODE=p.code is not None, PADDED=padded, BLOCK_L=block_l, BLOCK_E=block_e,
        BLOCK_D=block_d, num_warps=warps)
    if min(n, B) > p.part:  # some latent may have two parts or more
        sum_l = max(1, (1 << 18) // block_d) if interpreting() else 1
        _sum_parts_kernel[(triton.cdiv(h, sum_l),)](
            p.crow, p.multi_first, part_W, part_X, part_s, out_W, out_X, g_s, h, d, p.part, BLOCK_L=sum_l,
            BLOCK_D=block_d, num_warps=warps)
    return g_f, out_W, out_X, g_s


def backward_products(rows, cols, values, G, W, X, g_code=None, *, padded: bool = False,
                      out_W=None, out_X=None, part: int | None = None):
    """``(g_f, g_W, g_X, g_sums)`` of
    :meth:`~sae_ref.backends.StandardBackend.backward_products` with ``with_sums=True`` (module
    docstring). ``G``, ``W``, ``X`` contiguous, one float dtype with ``values`` (and ``g_code``),
    ``d`` at most :data:`MAX_D`; ``rows`` and ``cols`` integer; places unique. ``part``: the
    most entries a program takes (default :data:`PART` on a GPU; under the interpreter the
    batch size, so no latent has two parts)."""
    p = plan(rows, cols, values, g_code, W.shape[0], G.shape[0], part)
    return products(p, G, W, X, padded=padded, out_W=out_W, out_X=out_X)
