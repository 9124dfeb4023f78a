"""Adam steps as fused Triton kernels: the decoder's constrained step, and the plain one.

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

:func:`adam` is the plain step of :meth:`StandardBackend.adam` on any parameter (the encoder
matrix, stored latent-major, and the biases included): an elementwise pass over the four
tensors' storage, ``BLOCK`` elements a program, in one launch. It moves the ``7 n`` elements
that torch's ``_fused_adam_`` moves, at the copy bandwidth (measured on an H200, torch's
kernel reached about 2.2 TB/s on the encoder where a plain elementwise kernel copies at
3.8 TB/s). Both kernels spell the moment and step arithmetic in one helper.

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
def _adam_math(p, g, m, v, lr_t, b1, one_minus_b1, b2, one_minus_b2, eps, bc2_sqrt):
    """PyTorch's Adam on a block: the new ``(p, m, v)`` from gradient ``g``, with the float64
    scalars rounded to the block's dtype (``lr_t = lr / (1 - b1^t)``,
    ``bc2_sqrt = sqrt(1 - b2^t)``)."""
    dtype = p.dtype
    m = _as(b1, dtype) * m + _as(one_minus_b1, dtype) * g
    v = _as(b2, dtype) * v + _as(one_minus_b2, dtype) * (g * g)
    denom = _div(_sqrt(v), _as(bc2_sqrt, dtype)) + _as(eps, dtype)
    p = p - _as(lr_t, dtype) * _div(m, denom)
    return p, m, v


@triton.jit
def _adam_flat(p_ptr, g_ptr, m_ptr, v_ptr, ss_ptr, n,
               lr_t: tl.float64, b1: tl.float64, one_minus_b1: tl.float64,
               b2: tl.float64, one_minus_b2: tl.float64, eps: tl.float64,
               bc2_sqrt: tl.float64, SUMS: tl.constexpr, BLOCK: tl.constexpr):
    """``BLOCK`` elements of the flat arrays ``p``, ``m`` and ``v`` (n elements) per program,
    updated in place from ``g``; with ``SUMS``, the program's sum of ``g^2`` at ``ss[program]``."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    p = tl.load(p_ptr + offs, mask=inside, other=0.0)
    g = tl.load(g_ptr + offs, mask=inside, other=0.0)
    if SUMS:
        tl.store(ss_ptr + tl.program_id(0), tl.sum(g * g, axis=0))
    m = tl.load(m_ptr + offs, mask=inside, other=0.0)
    v = tl.load(v_ptr + offs, mask=inside, other=0.0)
    p, m, v = _adam_math(p, g, m, v, lr_t, b1, one_minus_b1, b2, one_minus_b2, eps, bc2_sqrt)
    tl.store(p_ptr + offs, p, mask=inside)
    tl.store(m_ptr + offs, m, mask=inside)
    tl.store(v_ptr + offs, v, mask=inside)


@triton.jit
def _decoder_adam_rows(W_ptr, g_ptr, m_ptr, v_ptr, ss_ptr, h, d,
                       lr_t: tl.float64, b1: tl.float64, one_minus_b1: tl.float64,
                       b2: tl.float64, one_minus_b2: tl.float64, eps: tl.float64,
                       bc2_sqrt: tl.float64, tiny: tl.float64,
                       AFTER: tl.constexpr, SUMS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """``BLOCK_H`` whole rows of ``W``, ``m`` and ``v`` [h, d] (row-major) per program,
    updated in place; with ``SUMS``, the program's sum of ``g^2`` (the gradient as given) at
    ``ss[program]``."""
    dtype = W_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    inside = (rows[:, None] < h) & (cols[None, :] < d)
    offs = rows[:, None] * d + cols[None, :]
    w = tl.load(W_ptr + offs, mask=inside, other=0.0)
    g = tl.load(g_ptr + offs, mask=inside, other=0.0)
    m = tl.load(m_ptr + offs, mask=inside, other=0.0)
    v = tl.load(v_ptr + offs, mask=inside, other=0.0)
    if SUMS:
        tl.store(ss_ptr + tl.program_id(0), tl.sum(tl.sum(g * g, axis=1), axis=0))
    tiny = _as(tiny, dtype)
    s = _inverse_norm(w, tiny)
    dot = tl.sum(g * w, axis=1)[:, None]
    if AFTER:
        c = dot * s * s  # (g . u) u = c w with u = s w
    else:
        w = w * s  # the row is now u itself
        c = dot * s
    w, m, v = _adam_math(w, g - c * w, m, v, lr_t, b1, one_minus_b1, b2, one_minus_b2, eps, bc2_sqrt)
    w = tl.where(inside, w, 0.0)  # lanes past d stay 0 for the norm below
    if AFTER:
        w = w * _inverse_norm(w, tiny)
    tl.store(W_ptr + offs, w, mask=inside)
    tl.store(m_ptr + offs, m, mask=inside)
    tl.store(v_ptr + offs, v, mask=inside)


def _check_alike(op: str, named: dict) -> None:
    """TypeError or ValueError naming the argument unless the tensors ``named`` (the first is
    the parameter) are float32/float64 torch tensors of one shape, dtype and device."""
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: argument '{name}' must be a torch tensor, got {type(x).__name__}")
    first, p = next(iter(named.items()))
    if p.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: argument '{first}' must be float32 or float64, got {p.dtype}")
    for name, x in named.items():
        if x.shape != p.shape:
            raise ValueError(f"{op}: argument '{name}' has shape {tuple(x.shape)}, "
                             f"expected {first}'s {tuple(p.shape)}")
        if x.dtype != p.dtype:
            raise ValueError(f"{op}: argument '{name}' has dtype {x.dtype}, expected {first}'s {p.dtype}")
        if x.device != p.device:
            raise ValueError(f"{op}: argument '{name}' is on {x.device}, expected {first}'s {p.device}")


def _check(W, g, m, v, order: str) -> None:
    """ValueError naming the argument unless ``W``, ``g``, ``m``, ``v`` are contiguous 2-D
    float32/float64 torch tensors of one shape, dtype and device, and ``order`` is known."""
    named = {"W": W, "g": g, "m": m, "v": v}
    if isinstance(W, torch.Tensor) and W.ndim != 2:
        raise ValueError(f"decoder_adam: argument 'W' must be 2-D [h, d], got shape {tuple(W.shape)}")
    _check_alike("decoder_adam", named)
    for name, x in named.items():
        if not x.is_contiguous():
            raise ValueError(f"decoder_adam: argument '{name}' must be contiguous (row-major)")
    if order not in ORDERS:
        raise ValueError(f"decoder_adam: argument 'order' must be one of {ORDERS}, got {order!r}")


def _partials(sums: bool, programs: int, g):
    """The buffer of the programs' sums of squares of ``g`` (each program writes its own), or
    with ``sums`` off ``g`` itself, which the kernel then never writes."""
    return torch.empty((programs,), dtype=g.dtype, device=g.device) if sums else g


def decoder_adam(W, g, m, v, *, lr: float, b1: float, b2: float, eps: float, t: int, order: str,
                 tiny: float, sums: bool = False):
    """The decoder's constrained Adam step at step ``t``, in place on ``W``, ``m`` and ``v``
    (``g`` is read only): one kernel launch for the whole [h, d] matrix (module docstring).
    Returns None, or with ``sums`` the programs' sums of ``g^2`` (1-D; their sum is the
    gradient's), from the same pass."""
    _check(W, g, m, v, order)
    h, d = W.shape
    if h == 0 or d == 0:
        return torch.zeros((1,), dtype=W.dtype, device=W.device) if sums else None
    lr, b1, b2, eps, tiny = float(lr), float(b1), float(b2), float(eps), float(tiny)
    block_d = triton.next_power_of_2(d)
    # narrow rows share a program (a block of about 4096 elements); under the interpreter,
    # whose cost is per program, a program takes up to 2^16 elements
    per_program = 1 << 16 if interpreting() else 4096
    block_h = max(1, min(triton.next_power_of_2(h), per_program // block_d))
    programs = triton.cdiv(h, block_h)
    ss = _partials(sums, programs, g)
    _decoder_adam_rows[(programs,)](
        W, g, m, v, ss, h, d,
        lr / (1.0 - b1**t), b1, 1.0 - b1, b2, 1.0 - b2, eps, (1.0 - b2**t) ** 0.5, tiny,
        AFTER=order == "after", SUMS=sums, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=min(16, max(1, block_h * block_d // 256)),  # a few elements per thread
        enable_fp_fusion=True,  # fused multiply-adds, as the NumPy backend's kernel allows
    )
    return ss if sums else None


def _flat(x):
    """``x`` as a flat view of its storage: ``x`` contiguous, or the reverse of its dimensions
    contiguous (a latent-major ``W_enc`` [d, h], whose ``W_enc.T`` is contiguous); None if
    neither."""
    if x.is_contiguous():
        return x.view(-1)
    reverse = x.permute(*range(x.ndim - 1, -1, -1))
    return reverse.view(-1) if reverse.is_contiguous() else None


def _check_flat(p, g, m, v) -> None:
    """TypeError or ValueError naming the argument unless ``p``, ``g``, ``m``, ``v`` are
    float32/float64 torch tensors of one shape, dtype, device and strides, in a layout that
    :func:`_flat` views flat."""
    named = {"p": p, "g": g, "m": m, "v": v}
    _check_alike("adam", named)
    for name, x in named.items():
        if _flat(x) is None:
            raise ValueError(f"adam: argument '{name}' must be contiguous or the transpose of a "
                             f"contiguous tensor, got strides {x.stride()} for shape {tuple(x.shape)}")
        if x.stride() != p.stride():
            raise ValueError(f"adam: argument '{name}' has strides {x.stride()}, expected p's {p.stride()}")


def adam(p, g, m, v, *, lr: float, b1: float, b2: float, eps: float, t: int, sums: bool = False):
    """One Adam step at step ``t`` (:meth:`StandardBackend.adam`'s arithmetic), in place on
    ``p``, ``m`` and ``v`` (``g`` is read only): one kernel launch over their storage, of any
    shape (0-D and 1-D included) in row-major or transposed layout (module docstring).
    Returns None, or with ``sums`` the programs' sums of ``g^2`` (1-D; their sum is the
    gradient's), from the same pass."""
    _check_flat(p, g, m, v)
    n = p.numel()
    if n == 0:
        return torch.zeros((1,), dtype=p.dtype, device=p.device) if sums else None
    lr, b1, b2, eps = float(lr), float(b1), float(b2), float(eps)
    # a few elements per thread on a GPU; under the interpreter, whose cost is per program,
    # up to 2^16 elements a program
    block = min(1 << 16, triton.next_power_of_2(n)) if interpreting() else 4096
    programs = triton.cdiv(n, block)
    ss = _partials(sums, programs, g)
    _adam_flat[(programs,)](
        *(_flat(x) for x in (p, g, m, v)), ss, n,
        lr / (1.0 - b1**t), b1, 1.0 - b1, b2, 1.0 - b2, eps, (1.0 - b2**t) ** 0.5,
        SUMS=sums, BLOCK=block, num_warps=8,
        enable_fp_fusion=True,  # as decoder_adam's kernel
    )
    return ss if sums else None
