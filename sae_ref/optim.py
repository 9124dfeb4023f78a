r"""Adam, learning-rate and coefficient schedules, and gradient clipping, on the Array API.

Adam (Kingma & Ba 2015) with PyTorch's arithmetic, so a step here and ``torch.optim.Adam``
agree to rounding:

.. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,

.. math::
    p_t = p_{t-1} - \frac{\eta}{1-\beta_1^t}\,
          \frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon}.

The step count ``t`` and the learning rate are Python numbers known on the host (schedules
depend on ``t`` only), so an update reads nothing back from the device.

>>> import numpy as np
>>> from sae_ref.sae import init_params
>>> from sae_ref.optim import adam_init, adam_update
>>> p = init_params(4, 8, xp=np, seed=0)
>>> new, state = adam_update(p, p, adam_init(p), lr=1e-3, t=1)
>>> bool(np.all(np.abs(new.W_enc - p.W_enc) <= 1e-3 + 1e-7))   # |first step| <= lr
True
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from array_api_compat import array_namespace

from sae_ref.backends import get_backend
from sae_ref.sae import SAEParams


@dataclass(frozen=True)
class AdamState:
    """Adam's first and second moments, one array per parameter (same shapes)."""

    m: SAEParams
    v: SAEParams


def adam_init(params: SAEParams) -> AdamState:
    """Zero moments shaped like ``params``."""
    xp = array_namespace(params.W_enc)
    return AdamState(params.map(xp.zeros_like), params.map(xp.zeros_like))  # never shared: steps may write in place


def adam_update(params: SAEParams, grads: SAEParams, state: AdamState, *, lr: float, t: int,
                betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                frozen: tuple[str, ...] = (), inplace: bool = False,
                sums: dict | None = None) -> tuple[SAEParams, AdamState]:
    """One Adam step (``t`` counts from 1); parameters named in ``frozen`` are left alone.
    ``sums``: a dict that receives each stepped parameter's gradient's sum of squares (the
    terms of :func:`global_norm`) as a 1-D array of parts to add, taken in the step's own
    pass where the backend can.

    A frozen parameter keeps its value and its moments, as PyTorch does for a parameter whose
    gradient is ``None``. The arithmetic is the backend's ``adam``
    (:meth:`sae_ref.backends.StandardBackend.adam`: the formula above; NumPy runs the same
    operations chunk by chunk in cache, torch its fused kernel). With ``inplace=True`` the
    caller donates ``params`` and ``state``: their arrays may be overwritten.
    """
    b1, b2 = betas
    be = get_backend(array_namespace(params.W_enc))
    new_p, new_m, new_v = {}, {}, {}
    for name, p in params.arrays().items():
        if name in frozen:
            continue
        args = (p, getattr(grads, name), getattr(state.m, name), getattr(state.v, name))
        if sums is None:
            new_p[name], new_m[name], new_v[name] = be.adam(*args, lr=lr, b1=b1, b2=b2, eps=eps, t=t,
                                                            inplace=inplace)
        else:
            new_p[name], new_m[name], new_v[name], sums[name] = be.adam_sums(
                *args, lr=lr, b1=b1, b2=b2, eps=eps, t=t, inplace=inplace)
    return replace(params, **new_p), AdamState(replace(state.m, **new_m), replace(state.v, **new_v))


def global_norm(grads: SAEParams):
    """:math:`\\sqrt{\\sum_p \\|g_p\\|^2}` over every gradient, a 0-D array (no host read)."""
    xp = array_namespace(grads.W_enc)
    be = get_backend(xp)
    return xp.sqrt(sum(be.sum_squares(g) for g in grads.arrays().values()))


def clip_by_global_norm(grads: SAEParams, max_norm: float):
    """Scale every gradient by :math:`\\min(1, c / (\\|g\\| + 10^{-6}))` (PyTorch's rule).

    Returns ``(clipped, norm)`` with ``norm`` the norm before clipping (0-D array).
    """
    xp = array_namespace(grads.W_enc)
    norm = global_norm(grads)
    scale = xp.minimum(max_norm / (norm + 1e-6), xp.ones_like(norm))
    return grads.map(lambda g: g * scale), norm


def linear_warmup_decay(s: int, *, base: float, warmup: int = 0, decay: int = 0,
                        total: int | None = None) -> float:
    """A schedule at 0-based step index ``s`` (PyTorch's ``LambdaLR`` convention): the factor
    ``s / warmup`` while ``s < warmup``, then 1, then ``(total - s) / decay`` over the last
    ``decay`` of ``total`` steps; the value is ``base`` times the smaller factor.

    The learning rate of the t-th update (t from 1) is taken at ``s = t - 1``, so with a
    warm-up the first update has rate 0 (as dictionary_learning's ``LambdaLR``); the sparsity
    coefficient is taken at ``s = t`` (SAELens' ``(1 + step) / warmup``).

    >>> [linear_warmup_decay(s, base=1.0, warmup=4) for s in (0, 1, 4, 9)]
    [0.0, 0.25, 1.0, 1.0]
    >>> [linear_warmup_decay(s, base=1.0, decay=2, total=10) for s in (7, 8, 9)]
    [1.0, 1.0, 0.5]
    """
    factor = 1.0
    if warmup > 0 and s < warmup:
        factor = s / warmup
    if decay > 0 and total is not None and s >= total - decay:
        factor = min(factor, max(total - s, 0) / decay)
    return base * factor
