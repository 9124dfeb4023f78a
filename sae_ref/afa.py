r"""AFA and top-AFA (Lee et al. 2025): the norm of the features from the norm of the input.

For unit-norm atoms :math:`d_i` that are :math:`\varepsilon`-quasi-orthogonal
(:math:`|\langle d_i, d_j\rangle| \le \varepsilon` for :math:`i \ne j`) and
:math:`z = \sum_i f_i d_i`,

.. math:: (1 - \varepsilon (n-1))\,\|f\|^2 \;\le\; \|z\|^2 \;\le\; (1 + \varepsilon (n-1))\,\|f\|^2,

with :math:`n = h` in general and :math:`n = L_0` when only :math:`L_0` latents are active
(:func:`afa_bounds`). Orthonormal atoms give equality. :func:`quasi_orthogonality` measures
:math:`\varepsilon` of a decoder in blocks (never an :math:`h \times h` matrix).

**top-AFA** (:func:`top_afa`) picks, per sample and with no k, the latents whose prefix norm
in descending score order is nearest to the target :math:`\|x - b_{dec}\|`. **The AFA loss**
(:func:`afa_loss`) penalises :math:`(\|f\|_2 - t)^2` row by row.

>>> import numpy as np
>>> from sae_ref.afa import quasi_orthogonality
>>> eps = quasi_orthogonality(np.eye(4, 8))     # orthonormal rows
>>> float(eps.max_abs)
0.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from array_api_compat import device as device_of

from sae_ref import _checks as C
from sae_ref.backends import take
from sae_ref.sparse import SparseCode

RULES = ("nearest", "first_exceeding")
#: The authors' sentinel: their code writes 1e8 into the last cumulative sum of squared
#: scores, so the last prefix *norm* becomes 1e4 and (for targets below about 5e3) k <= h - 1.
SENTINEL = 1e4


@dataclass(frozen=True)
class QuasiOrthogonality:
    """Off-diagonal statistics of :math:`\\hat W \\hat W^\\top` (rows normalised): the max of
    the absolute values (the :math:`\\varepsilon` of the bound), the signed max, and the mean."""

    max_abs: Any
    max_signed: Any
    mean: Any


def quasi_orthogonality(W_dec, *, block: int = 2048) -> QuasiOrthogonality:
    r""":math:`\varepsilon = \max_{i \ne j} |\langle \hat d_i, \hat d_j\rangle|` of the
    normalised decoder rows, computed ``block`` rows at a time (memory O(block h)).

    Returns 0-D arrays (no host read). Needs h >= 2.
    """
    op = "quasi_orthogonality"
    xp = C.namespace(op, W_dec=W_dec)
    C.floating(op, xp, "W_dec", W_dec, ndim=2)
    h = W_dec.shape[0]
    if h < 2:
        raise ValueError(f"{op}: argument 'W_dec' needs at least 2 rows, got shape {tuple(W_dec.shape)}")
    block = C.integer_in(op, "block", block, 1, 2**40)
    norms = xp.linalg.vector_norm(W_dec, axis=1, keepdims=True)
    U = W_dec / xp.where(norms > 0, norms, xp.ones_like(norms))
    cols = xp.arange(h, device=device_of(W_dec))
    max_abs = max_signed = None
    total = xp.zeros((), dtype=W_dec.dtype, device=device_of(W_dec))
    for s in range(0, h, block):
        e = min(s + block, h)
        G = U[s:e, :] @ U.T
        diag = cols[None, :] == xp.arange(s, e, device=device_of(W_dec))[:, None]
        zero = xp.zeros_like(G)
        off = xp.where(diag, zero, G)
        total = total + xp.sum(off)
        a = xp.max(xp.abs(off))
        m = xp.max(xp.where(diag, xp.full_like(G, -float("inf")), G))
        max_abs = a if max_abs is None else xp.maximum(max_abs, a)
        max_signed = m if max_signed is None else xp.maximum(max_signed, m)
    return QuasiOrthogonality(max_abs, max_signed, total / (h * (h - 1)))


def afa_bounds(z_norm, eps, n):
    r"""The bounds on :math:`\|f\|` given :math:`\|z\|`:

    .. math:: \frac{\|z\|}{\sqrt{1 + \varepsilon (n-1)}} \le \|f\| \le
              \frac{\|z\|}{\sqrt{1 - \varepsilon (n-1)}},

    the upper bound infinite when :math:`\varepsilon (n-1) \ge 1`. ``n`` is h, or the number
    of active latents (the tighter bound); arrays broadcast.
    """
    xp = C.namespace("afa_bounds", z_norm=z_norm)
    c = xp.asarray(eps * (n - 1), dtype=z_norm.dtype, device=device_of(z_norm))
    lower = z_norm / xp.sqrt(1.0 + c)
    inf = xp.full_like(z_norm, float("inf"))
    upper = xp.where(c < 1, z_norm / xp.sqrt(xp.where(c < 1, 1.0 - c, xp.ones_like(c))), inf)
    return lower, upper


def f_tilde_norm(code: SparseCode, W_dec, b_dec):
    r""":math:`\|\tilde f\|` per sample: the features rescaled by their decoder row norms,
    with :math:`\|b_{dec}\|` as one more coefficient (the bias as an extra atom):

    .. math:: \|\tilde f_b\|^2 = \sum_j (f_{bj} \|W^{dec}_j\|)^2 + \|b_{dec}\|^2.

    Returns an array of shape [B].
    """
    xp = C.namespace("f_tilde_norm", values=code.values, W_dec=W_dec, b_dec=b_dec)
    from sae_ref.backends import get_backend

    norms = xp.linalg.vector_norm(W_dec, axis=1)
    scaled = code.values * take(norms, code.cols)
    sq = get_backend(xp).segment_sum(code.rows, scaled * scaled, code.shape[0])
    return xp.sqrt(sq + xp.sum(b_dec * b_dec))


def eps_lbo(z_norm, f_norm, h: int):
    r"""The smallest :math:`\varepsilon` consistent with the bound, per sample:
    :math:`|\|z\|^2 - \|\tilde f\|^2| / ((h-1)\|\tilde f\|^2)`."""
    xp = C.namespace("eps_lbo", z_norm=z_norm, f_norm=f_norm)
    f2 = f_norm * f_norm
    return xp.abs(z_norm * z_norm - f2) / ((h - 1) * f2)


def top_afa(pre, scale, target, *, rule: str = "nearest", sentinel: bool = True) -> SparseCode:
    r"""top-AFA: per sample, keep the top-:math:`k` latents by score with :math:`k` chosen so
    that the prefix norm is nearest to the target.

    1. scores :math:`s_i = (a_i\,\|d_i\|)^2` with :math:`a = \mathrm{relu}(z)` and
       ``scale`` the decoder row norms :math:`\|d_i\|` [h];
    2. prefix norms :math:`c_j = \sqrt{\sum_{r \le j} s_{(r)}}` in descending score order;
       with ``sentinel`` (the authors' code) the last prefix is replaced by a large number;
    3. ``rule="nearest"``: :math:`k = 1 + \arg\min_j |c_j - t_b|` (ties to the smaller j);
       ``"first_exceeding"``: the first j with :math:`c_j \ge t_b` (h if none);
    4. keep the k largest scores (equal scores: the lower column first); entries with
       :math:`a = 0` are never kept.

    ``target`` [B] is :math:`t_b = \|x_b - b_{dec}\|` (the activation's convention). Rows are
    independent of each other. Gradient: pass-through at the kept entries; the selection (and
    the target) get none.
    """
    op = "top_afa"
    xp = C.namespace(op, pre=pre, scale=scale, target=target)
    C.floating(op, xp, "pre", pre, ndim=2)
    B, h = pre.shape
    C.floating(op, xp, "scale", scale, shape=(h,))
    C.floating(op, xp, "target", target, shape=(B,))
    C.choice(op, "rule", rule, RULES)
    C.finite(op, xp, "pre", pre)
    return _top_afa(xp, pre, scale, target, rule, sentinel)


def _top_afa(xp, pre, scale, target, rule: str, sentinel: bool) -> SparseCode:
    """:func:`top_afa` without the argument checks (the SAE forward checks once)."""
    B, h = pre.shape
    a = xp.where(pre > 0, pre, xp.zeros_like(pre))
    s = (a * scale) ** 2
    order = xp.argsort(-s, axis=1, stable=True)  # descending; equal scores keep column order
    s_sorted = xp.take_along_axis(s, order, axis=1)
    c = xp.sqrt(xp.cumulative_sum(s_sorted, axis=1))
    j = xp.arange(h, device=device_of(pre))
    if sentinel:
        c = xp.where(j[None, :] == h - 1, xp.full_like(c, SENTINEL), c)
    if rule == "nearest":
        k = xp.argmin(xp.abs(c - target[:, None]), axis=1) + 1
    else:
        reached = c >= target[:, None]
        first = xp.argmax(xp.astype(reached, xp.int8), axis=1)
        k = xp.where(xp.any(reached, axis=1), first + 1, xp.full_like(first, h))
    keep_sorted = (j[None, :] < k[:, None]) & (s_sorted > 0)
    (flat_sorted,) = xp.nonzero(xp.reshape(keep_sorted, (-1,)))
    rows = flat_sorted // h
    cols = take(xp.reshape(order, (-1,)), flat_sorted)
    flat = xp.sort(xp.astype(rows * h + cols, xp.int64), stable=False)  # row-major order
    return SparseCode(flat // h, flat % h, take(xp.reshape(pre, (-1,)), flat), (B, h))


def afa_loss(code: SparseCode, target):
    r"""The AFA loss and its gradients: :math:`L = \frac1B \sum_b (\|f_b\|_2 - t_b)^2`.

    .. math:: \frac{\partial L}{\partial f_{bj}} = \frac{2}{B}(\|f_b\| - t_b)
              \frac{f_{bj}}{\|f_b\|}, \qquad
              \frac{\partial L}{\partial t_b} = -\frac{2}{B}(\|f_b\| - t_b),

    the first taken as 0 for a row with :math:`f_b = 0`. Returns ``(value, g_values,
    g_target)``; the coefficient :math:`\lambda_{afa}` is the caller's. The target is
    :math:`\|x\|` in the authors' code and :math:`\|x - b_{dec}\|` in the consistent
    variant (then ``g_target`` flows to ``b_dec``).
    """
    op = "afa_loss"
    xp = C.namespace(op, values=code.values, target=target)
    C.floating(op, xp, "target", target, shape=(code.shape[0],))
    return _afa_loss(xp, code, target)


def _afa_loss(xp, code: SparseCode, target):
    """:func:`afa_loss` without the argument checks."""
    B = code.shape[0]
    from sae_ref.backends import get_backend

    norm = xp.sqrt(get_backend(xp).segment_sum(code.rows, code.values * code.values, B))
    r = norm - target
    value = xp.sum(r * r) / B
    safe = xp.where(norm > 0, norm, xp.ones_like(norm))
    coef = xp.where(norm > 0, 2.0 * r / (B * safe), xp.zeros_like(norm))
    return value, take(coef, code.rows) * code.values, -2.0 * r / B
