"""The decoder's constrained Adam step as one fused Triton kernel.

:func:`decoder_adam` computes what :meth:`StandardBackend.decoder_adam` composes (and what the
NumPy backend's compiled kernel does row by row): with ``s = 1/|w|`` (1 when ``|w| <= tiny``)
and ``dot = g . w`` for each decoder row ``w``,

- ``order="before"``: the row becomes ``u = s w``, the gradient ``g - (dot s) u``, then Adam
  on ``u``;
- ``order="after"``: the gradient ``g - (dot s^2) w``, Adam on ``w`` as it was, then the row
  divided by its new norm (same ``tiny`` rule);

with PyTorch's Adam arithmetic (:mod:`sae_ref.optim`). A program holds whole rows (one or a few)
in one block, so the row's dot product and norms are in-register reductions: the step reads ``W``,
``g``, ``m`` and ``v`` once and writes ``W``, ``m`` and ``v`` once, ``7 h d`` elements of
traffic. The composed chain it replaces (row norms, division, row dots, projection, torch's
fused Adam, renormalisation) makes about 10 such passes.

The scalars reach the kernel as float64 arguments and are rounded to the tensors' dtype
there, so float64 inputs see them unrounded (Triton types a Python float argument as float32).
Square roots and divisions are the correctly rounded ones, as torch's (Triton's float32
defaults are approximations). A row is one block of ``next_power_of_2(d)`` elements: fine for
the usual widths (up to a few thousand), spilling registers far beyond.

Only code that has checked that Triton imports imports this module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import interpreting

ORDERS = ("before", "after")


@triton.jit
def _as(x, dtype: tl.constexpr):
    """The float64 scalar ``x`` in ``dtype`` (a Python float under the interpreter: adding it to
    a float64 zero keeps every bit)."""
    return (tl.zeros((1,), tl.float64) + x).to(dtype)


@triton.jit
def _sqrt(x):
    """The correctly rounded square root (Triton's float32 ``sqrt`` approximates)."""
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def _div(x, y):
    """The correctly rounded quotient (Triton's float32 ``/`` approximates)."""
    if x.dtype == tl.float32:
        return tl.div_rn(x, y)
    else:
        return x / y


@triton.jit
def _inverse_norm(w, tiny):
    """1 / |w| for each row of ``w`` [rows, d] as [rows, 1], or 1 where ``|w| <= tiny`` (such
    rows are left as they are)."""
    norm = _sqrt(tl.sum(w * w, axis=1))[:, None]
    return _div(tl.full(norm.shape, 1.0, norm.dtype), tl.where(norm > tiny, norm, 1.0))


@triton.jit
def _decoder_adam_rows(W_ptr, g_ptr, m_ptr, v_ptr, h, d,
                       lr_t: tl.float64, b1: tl.float64, one_minus_b1: tl.float64,
                       b2: tl.float64, one_minus_b2: tl.float64, eps: tl.float64,
                       bc2_sqrt: tl.float64, tiny: tl.float64,
                       AFTER: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """``BLOCK_H`` whole rows of ``W``, ``m`` and ``v`` [h, d] (row-major) per program,
    updated in place."""
    dtype = W_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    inside = (rows[:, None] < h) & (cols[None, :] < d)
    offs = rows[:, None] * d + cols[None, :]
    w = tl.load(W_ptr + offs, mask=inside, other=0.0)
    g = tl.load(g_ptr + offs, mask=inside, other=0.0)
    m = tl.load(m_ptr + offs, mask=inside, other=0.0)
    v = tl.load(v_ptr + offs, mask=inside, other=0.0)
    tiny = _as(tiny, dtype)
    s = _inverse_norm(w, tiny)
    dot = tl.sum(g * w, axis=1)[:, None]
    if AFTER:
        c = dot * s * s  # (g . u) u = c w with u = s w
    else:
        w = w * s  # the row is now u itself
        c = dot * s
    gt = g - c * w
    m = _as(b1, dtype) * m + _as(one_minus_b1, dtype) * gt
    v = _as(b2, dtype) * v + _as(one_minus_b2, dtype) * (gt * gt)
    denom = _div(_sqrt(v), _as(bc2_sqrt, dtype)) + _as(eps, dtype)
    step = _as(lr_t, dtype) * _div(m, denom)
    w = tl.where(inside, w - step, 0.0)  # lanes past d stay 0 for the norm below
    if AFTER:
        w = w * _inverse_norm(w, tiny)
    tl.store(W_ptr + offs, w, mask=inside)
    tl.store(m_ptr + offs, m, mask=inside)
    tl.store(v_ptr + offs, v, mask=inside)


def _check(W, g, m, v, order: str) -> None:
    """ValueError naming the argument unless ``W``, ``g``, ``m``, ``v`` are contiguous 2-D
    float32/float64 torch tensors of one shape, dtype and device, and ``order`` is known."""
    op = "decoder_adam"
    named = {"W": W, "g": g, "m": m, "v": v}
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: argument '{name}' must be a torch tensor, got {type(x).__name__}")
    if W.ndim != 2:
        raise ValueError(f"{op}: argument 'W' must be 2-D [h, d], got shape {tuple(W.shape)}")
    if W.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: argument 'W' must be float32 or float64, got {W.dtype}")
    for name, x in named.items():
        if x.shape != W.shape:
            raise ValueError(f"{op}: argument '{name}' has shape {tuple(x.shape)}, "
                             f"expected W's {tuple(W.shape)}")
        if x.dtype != W.dtype:
            raise ValueError(f"{op}: argument '{name}' has dtype {x.dtype}, expected W's {W.dtype}")
        if x.device != W.device:
            raise ValueError(f"{op}: argument '{name}' is on {x.device}, expected W's {W.device}")
        if not x.is_contiguous():
            raise ValueError(f"{op}: argument '{name}' must be contiguous (row-major)")
    if order not in ORDERS:
        raise ValueError(f"{op}: argument 'order' must be one of {ORDERS}, got {order!r}")


def decoder_adam(W, g, m, v, *, lr: float, b1: float, b2: float, eps: float, t: int, order: str,
                 tiny: float) -> None:
    """The decoder's constrained Adam step at step ``t``, in place on ``W``, ``m`` and ``v``
    (``g`` is read only): one kernel launch for the whole [h, d] matrix (module docstring)."""
    _check(W, g, m, v, order)
    h, d = W.shape
    if h == 0 or d == 0:
        return
    lr, b1, b2, eps, tiny = float(lr), float(b1), float(b2), float(eps), float(tiny)
    block_d = triton.next_power_of_2(d)
    # narrow rows share a program (a block of about 4096 elements); under the interpreter,
    # whose cost is per program, a program takes up to 2^16 elements
    per_program = 1 << 16 if interpreting() else 4096
    block_h = max(1, min(triton.next_power_of_2(h), per_program // block_d))
    _decoder_adam_rows[(triton.cdiv(h, block_h),)](
        W, g, m, v, h, d,
        lr / (1.0 - b1**t), b1, 1.0 - b1, b2, 1.0 - b2, eps, (1.0 - b2**t) ** 0.5, tiny,
        AFTER=order == "after", BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=min(16, max(1, block_h * block_d // 256)),  # a few elements per thread
        enable_fp_fusion=True,  # fused multiply-adds, as the NumPy backend's kernel allows
    )
