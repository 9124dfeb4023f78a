r"""Training losses, each returning its value and its gradient.

Every function returns ``(value, grad...)``: ``value`` a 0-D array on the input's device (no
host read-back), the gradients arrays of the inputs' shapes. Coefficients (:math:`\lambda`) are
the caller's; these are the unscaled terms.

Units. Reconstruction error has two units in use, both offered and named:

- ``unit="element"``: the mean of :math:`(\hat x - x)^2` over all :math:`B d` elements
  (the BatchTopK authors' code);
- ``unit="sample"``: the squared error summed over the :math:`d` features, averaged over the
  :math:`B` samples (SAELens, dictionary_learning): :math:`d` times larger.

Sparsity penalties act on a :class:`~sae_ref.sparse.SparseCode` and are a per-sample sum
averaged over the batch.

>>> import numpy as np
>>> from sae_ref.losses import mse
>>> value, grad = mse(np.array([[1., 2.]]), np.array([[0., 0.]]))
>>> float(value), grad.tolist()
(2.5, [[1.0, 2.0]])
"""

from __future__ import annotations

from array_api_compat import array_namespace

from sae_ref import _checks as C
from sae_ref.activations import _as_theta, _check_pre, _window
from sae_ref.backends import get_backend, take
from sae_ref.sparse import SparseCode

UNITS = ("element", "sample")


def _check_pair(op, x_hat, x):
    xp = C.namespace(op, x_hat=x_hat, x=x)
    C.floating(op, xp, "x", x, ndim=2)
    C.floating(op, xp, "x_hat", x_hat, ndim=2, shape=tuple(x.shape))
    C.same_dtype(op, x_hat=x_hat, x=x)
    C.nonempty_batch(op, "x", x)
    C.finite(op, xp, "x", x)
    C.finite(op, xp, "x_hat", x_hat)
    return xp


def mse(x_hat, x, *, unit: str = "element"):
    r"""Reconstruction mean squared error and its gradient on ``x_hat``.

    .. math:: L = \frac{1}{N} \sum_{b,i} (\hat x_{bi} - x_{bi})^2, \qquad
              \frac{\partial L}{\partial \hat x} = \frac{2}{N} (\hat x - x),

    with :math:`N = B d` for ``unit="element"`` and :math:`N = B` for ``unit="sample"``.
    """
    xp = _check_pair("mse", x_hat, x)
    C.choice("mse", "unit", unit, UNITS)
    return _mse(xp, x_hat, x, unit)


def _mse_count(x, unit) -> int:
    """The MSE's normaliser: the elements of ``x`` (``unit="element"``) or its rows."""
    B, d = x.shape
    return B * d if unit == "element" else B


def _mse(xp, x_hat, x, unit):
    n = _mse_count(x, unit)
    r = x_hat - x
    flat = xp.reshape(r, (-1,))
    value = xp.vecdot(flat, flat) / n  # vecdot: no [B, d] temporary
    r *= 2.0 / n  # the gradient in r's memory: no second fresh [B, d] array
    return value, r


def nmse(x_hat, x, *, reduce: str = "pooled"):
    r"""Normalised MSE and its gradient on ``x_hat``.

    ``reduce="pooled"``: :math:`L = \sum_b \|\hat x_b - x_b\|^2 / \sum_b \|x_b\|^2`.

    ``reduce="per_row"`` (OpenAI's ``normalized_mean_squared_error``):
    :math:`L = \frac1B \sum_b \|\hat x_b - x_b\|^2 / \|x_b\|^2`.

    Both normalise by the squared norm about zero; the fraction of variance unexplained about
    the batch mean is an evaluation metric (see the metrics pages), not this loss.

    A zero reference. Where the normaliser is zero (``x`` all zero; with ``"per_row"``, any
    all-zero row) the ratio is undefined: the value and the gradient are nan there, never inf
    and without a division warning, as :mod:`sae_ref.fvu`'s ratios with a zero total. No host
    read: a training loop sees the nan in its logged metrics.

    >>> import numpy as np
    >>> from sae_ref.losses import nmse
    >>> float(nmse(np.ones((2, 3)), np.zeros((2, 3)))[0])
    nan
    """
    xp = _check_pair("nmse", x_hat, x)
    C.choice("nmse", "reduce", reduce, ("pooled", "per_row"))
    r = x_hat - x
    if reduce == "pooled":
        den = _defined(xp, xp.sum(x * x))
        return xp.sum(r * r) / den, r * (2.0 / den)
    den = _defined(xp, xp.sum(x * x, axis=1, keepdims=True))
    B = x.shape[0]
    return xp.sum(xp.sum(r * r, axis=1, keepdims=True) / den) / B, r * 2.0 / (den * B)


def _defined(xp, den):
    """``den`` with nan where it is zero: dividing by it gives nan without a warning."""
    return xp.where(den > 0, den, xp.full_like(den, float("nan")))


def _check_code(op, code: SparseCode):
    if not isinstance(code, SparseCode):
        raise TypeError(f"{op}: argument 'code' must be a SparseCode, got {type(code).__name__}")
    xp = array_namespace(code.values)
    C.floating(op, xp, "code.values", code.values, ndim=1)
    C.finite(op, xp, "code.values", code.values)
    if code.shape[0] == 0:
        raise ValueError(f"{op}: argument 'code' is an empty batch")
    return xp


def l1(code: SparseCode, W_dec=None):
    r"""L1 penalty, optionally weighted by the decoder row norms, and its gradients.

    .. math:: L = \frac1B \sum_{b,j} f_{bj} \, w_j, \qquad w_j = \|W^{dec}_j\| \text{ (or 1)},

    .. math:: \frac{\partial L}{\partial f_{bj}} = \frac{w_j}{B}, \qquad
              \frac{\partial L}{\partial W^{dec}_j} = \frac{\sum_b f_{bj}}{B}
              \frac{W^{dec}_j}{\|W^{dec}_j\|}.

    Returns ``(value, g_values, g_W_dec)`` with ``g_W_dec`` None when ``W_dec`` is None.
    Activations are non-negative (after ReLU), so :math:`|f| = f`.
    """
    xp = _check_code("l1", code)
    B, h = code.shape
    if W_dec is None:
        return xp.sum(code.values) / B, xp.ones_like(code.values) / B, None
    C.namespace("l1", values=code.values, W_dec=W_dec)
    C.floating("l1", xp, "W_dec", W_dec, ndim=2, shape=(h, None))
    C.same_dtype("l1", values=code.values, W_dec=W_dec)
    norms = xp.linalg.vector_norm(W_dec, axis=1)
    w = take(norms, code.cols)
    per_latent = get_backend(xp).segment_sum(code.cols, code.values, h) / B
    safe = xp.where(norms > 0, norms, xp.ones_like(norms))
    g_W_dec = (per_latent / safe)[:, None] * W_dec
    return xp.sum(code.values * w) / B, w / B, g_W_dec


def sqrt_l1(code: SparseCode, *, eps: float = 1e-6):
    r"""The sqrt-L1 penalty (Riggs Smith 2024) with a guard that keeps it finite at zero.

    .. math:: L = \frac1B \sum_{b,j} \left(\sqrt{f_{bj} + \epsilon} - \sqrt{\epsilon}\right),
              \qquad \frac{\partial L}{\partial f_{bj}} = \frac{1}{2B\sqrt{f_{bj} + \epsilon}}.

    The plain :math:`\sum \sqrt f` has an infinite derivative at :math:`f = 0`; shifting by
    :math:`\epsilon` bounds it by :math:`1/(2B\sqrt\epsilon)` (500/B for the default
    :math:`10^{-6}`) and subtracting :math:`\sqrt\epsilon` keeps :math:`L = 0` at
    :math:`f = 0`. For :math:`f \gg \epsilon` it equals :math:`\sum\sqrt f` to
    :math:`O(\sqrt\epsilon)` per entry. (The penalty is :math:`\sum |f|^{1/2}`, not the norm
    :math:`\|f\|_{1/2}`, which another library's "Lp" option computes.)
    """
    xp = _check_code("sqrt_l1", code)
    eps = C.positive_number("sqrt_l1", "eps", eps)
    B = code.shape[0]
    s = xp.sqrt(code.values + eps)
    return xp.sum(s - eps**0.5) / B, 0.5 / (s * B)


def jumprelu_l0(pre, theta, bandwidth: float):
    r"""The JumpReLU L0 penalty and its pseudo-derivative on :math:`\theta`.

    .. math:: L = \frac1B \sum_{b,j} H(z_{bj} - \theta_j), \qquad
              \frac{\eth L}{\eth \theta_j} = -\frac{1}{B \varepsilon} \sum_b
              K\!\left(\frac{z_{bj} - \theta_j}{\varepsilon}\right),
              \qquad \frac{\partial L}{\partial z} = 0 \text{ (as in the paper's estimator)}.

    Returns ``(value, g_theta)``.
    """
    xp = _check_pre("jumprelu_l0", pre, theta=theta)
    theta = _as_theta("jumprelu_l0", xp, pre, theta, positive=True)
    eps = C.positive_number("jumprelu_l0", "bandwidth", bandwidth)
    return _jumprelu_l0(xp, pre, theta, eps)


def _jumprelu_l0(xp, pre, theta, eps, window: SparseCode | None = None):
    B, h = pre.shape
    value = xp.astype(xp.count_nonzero(pre > theta), pre.dtype) / B
    if window is None:
        window = _window(xp, pre, theta, eps)
    ones = xp.ones_like(window.values)
    g_theta = get_backend(xp).segment_sum(window.cols, ones, h) * (-1.0 / (B * eps))
    return value, g_theta
