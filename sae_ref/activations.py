r"""Sparse activation functions, each with its gradient beside it.

Every activation takes the encoder pre-activation ``pre`` (shape [B, h]) and returns a
:class:`~sae_ref.sparse.SparseCode` of the kept entries, whose values are ``pre`` there
(all positive: ReLU comes before any selection). Their backward maps a gradient on the code's
values to a gradient on ``pre`` at the same places.

==============  =======================================================================
op              keeps
==============  =======================================================================
``relu``        every :math:`z_{ij} > 0`
``topk``        per row, the k largest of :math:`\mathrm{relu}(z_i)` that are positive
``batch_topk``  the :math:`B k` largest of :math:`\mathrm{relu}(z)` over the whole batch that are positive
``jumprelu``    :math:`z_{ij} > \theta_j` (per-latent threshold, :math:`\theta > 0`)
``threshold``   :math:`z_{ij} > \theta` and :math:`z_{ij} > 0` (one global :math:`\theta`, or per latent)
==============  =======================================================================

Ties at the cut of ``topk`` / ``batch_topk`` go to the lower index
(see :func:`sae_ref.backends.top_n_mask`), identically on every backend.

>>> import numpy as np
>>> from sae_ref.activations import batch_topk
>>> z = np.array([[3., -1., 2.], [0.5, 4., 1.]])
>>> code = batch_topk(z, k=1)          # B*k = 2 entries over the batch
>>> code.to_dense().tolist()
[[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]]
"""

from __future__ import annotations

from array_api_compat import array_namespace, device as device_of

from sae_ref import _checks as C
from sae_ref.backends import get_backend, is_sync_free, take, top_n_fixed
from sae_ref.sparse import SparseCode


def _check_pre(op, pre, **extra):
    xp = C.namespace(op, pre=pre, **extra)
    C.floating(op, xp, "pre", pre, ndim=2)
    C.nonempty_batch(op, "pre", pre)
    if pre.shape[1] == 0:
        raise ValueError(f"{op}: argument 'pre' has no latents (shape {tuple(pre.shape)})")
    C.finite(op, xp, "pre", pre)
    return xp


# --- ReLU -------------------------------------------------------------------------------------
def relu(pre) -> SparseCode:
    r"""ReLU as a sparse code: :math:`f = \max(z, 0)`, kept where :math:`z > 0`.

    Gradient: :math:`\partial f/\partial z = H(z)`, so the upstream gradient passes through at
    the kept places (:func:`pass_through_backward`).
    """
    _check_pre("relu", pre)
    return SparseCode.from_mask(pre, pre > 0)


# --- TopK -------------------------------------------------------------------------------------
def topk(pre, k: int) -> SparseCode:
    r"""Per-row TopK after ReLU: keep each row's ``k`` largest entries of :math:`\mathrm{relu}(z)`.

    A row with fewer than ``k`` positive entries keeps all of them, so every row has
    :math:`\min(k, \#\{j: z_{ij} > 0\})` nonzeros.

    Parameters
    ----------
    pre : array, shape [B, h]
    k : int, ``1 <= k <= h``

    Gradient: the selection is treated as fixed (it has no derivative); the kept entries pass
    the upstream gradient through unchanged.
    """
    _check_pre("topk", pre)
    k = C.integer_in("topk", "k", k, 1, pre.shape[1], f" (h = {pre.shape[1]})")
    return _topk(pre, k).exact()


def _topk(pre, k: int, backend=None, maxima=None) -> SparseCode:
    """``maxima``: optional group maxima of ``pre`` (:func:`sae_ref.backends.group_size`)."""
    be = backend if backend is not None else get_backend(array_namespace(pre))
    if is_sync_free(pre):
        return _padded_code_at(pre, top_n_fixed(pre, k, axis=-1, backend=be, with_cut=False)[0])
    idx, cut = be.top_n_indices(pre, k, axis=-1, maxima=maxima)
    return _code_at(pre, idx, not bool(array_namespace(pre).all(cut > 0)))


def _code_at(pre, idx, drop_nonpositive: bool) -> SparseCode:
    """The code of ``pre`` at the flat indices ``idx`` (ascending), without the non-positive
    entries when asked (a selection whose cut is not positive keeps only positive values)."""
    xp = array_namespace(pre)
    B, h = pre.shape
    values = take(xp.reshape(pre, (-1,)), idx)
    if drop_nonpositive:
        positive = values > 0
        idx, values = idx[positive], values[positive]
    return SparseCode(idx // h, idx % h, values, (B, h))


def _padded_code_at(pre, idx) -> SparseCode:
    """The code of ``pre`` at the flat indices ``idx`` with the non-positive entries set to
    zero instead of dropped (the sync-free mode: its size stays known without a host read)."""
    rows, cols, values = get_backend(array_namespace(pre)).code_at(pre, idx)
    return SparseCode(rows, cols, values, pre.shape, padded=True)


# --- BatchTopK --------------------------------------------------------------------------------
def batch_topk(pre, k: int) -> SparseCode:
    r"""BatchTopK (Bussmann et al. 2024): keep the :math:`B k` largest entries of the whole batch.

    .. math:: f = \mathrm{relu}(z) \odot \mathbb{1}[\mathrm{relu}(z) \text{ among the } Bk
              \text{ largest of the batch}]

    If at least :math:`Bk` entries of ``pre`` are positive, exactly :math:`Bk` are kept and
    the mean per-sample L0 is exactly ``k`` (rows vary); otherwise every positive entry is kept.
    A batch of one row is :func:`topk`.

    Selecting the top ``n`` of ``pre`` and then dropping the non-positive entries gives the
    same set as selecting from ``relu(pre)`` (when the cut is positive the two rankings agree
    above it, otherwise both keep every positive entry), so no ReLU copy of the batch is made.

    Gradient: as :func:`topk`, pass-through at the kept entries.
    """
    _check_pre("batch_topk", pre)
    k = C.integer_in("batch_topk", "k", k, 1, pre.shape[1], f" (h = {pre.shape[1]})")
    return _batch_topk(pre, k).exact()


def _batch_topk(pre, k: int, backend=None, maxima=None) -> SparseCode:
    """``maxima``: optional group maxima of ``pre`` (:func:`sae_ref.backends.group_size`)."""
    be = backend if backend is not None else get_backend(array_namespace(pre))
    if is_sync_free(pre):
        return _padded_code_at(pre, top_n_fixed(pre, pre.shape[0] * k, backend=be, with_cut=False)[0])
    idx, cut = be.top_n_indices(pre, pre.shape[0] * k, maxima=maxima)
    return _code_at(pre, idx, not bool(cut > 0))  # cut <= 0: fewer than B*k positive entries


# --- threshold inference ----------------------------------------------------------------------
def threshold(pre, theta) -> SparseCode:
    r"""Fixed-threshold inference: :math:`f = \mathrm{relu}(z) \odot \mathbb{1}[z > \theta]`.

    ``theta`` is one number (the global BatchTopK inference threshold) or an array of shape
    [h] (per latent). The comparison is strict: with :math:`\theta` equal to the smallest value
    BatchTopK kept, that element is dropped (``>=`` would reproduce the batch selection).
    A negative theta keeps every positive entry.

    Gradient: pass-through at the kept entries (no gradient to :math:`\theta`).
    """
    xp = _check_pre("threshold", pre)
    theta = _as_theta("threshold", xp, pre, theta, positive=False)
    if getattr(theta, "ndim", 0) == 0:
        return _above(pre, theta)
    return SparseCode.from_mask(pre, (pre > theta) & (pre > 0))


def _above(pre, theta) -> SparseCode:
    """The code of the entries ``> max(theta, 0)`` for one number ``theta``: the entries
    ``>=`` the next representable value above the bound, found by the backend without a
    [B, h] mask (the same set: no value lies strictly between a float and its successor)."""
    xp = array_namespace(pre)
    dev = device_of(pre)
    zero = xp.zeros((), dtype=pre.dtype, device=dev)
    bound = xp.maximum(xp.asarray(theta, dtype=pre.dtype, device=dev), zero)
    bound = xp.nextafter(bound, xp.asarray(xp.inf, dtype=pre.dtype, device=dev))
    idx = xp.astype(get_backend(xp).indices_at_least(pre, bound), xp.int64)
    return _code_at(pre, idx, False)


def _as_theta(op, xp, pre, theta, *, positive: bool):
    if hasattr(theta, "shape") and getattr(theta, "ndim", 0) > 0:
        C.namespace(op, pre=pre, theta=theta)
        C.floating(op, xp, "theta", theta, ndim=1, shape=(pre.shape[1],))
        C.same_dtype(op, pre=pre, theta=theta)
        C.finite(op, xp, "theta", theta)
        if positive and not bool(xp.all(theta > 0)):
            raise ValueError(f"{op}: argument 'theta' must be positive for every latent")
        return xp.astype(theta, pre.dtype)
    try:
        value = float(theta)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: argument 'theta' must be a number or an array of shape [h], got {theta!r}") from None
    if value != value or abs(value) == float("inf") or (positive and value <= 0):
        raise ValueError(f"{op}: argument 'theta' must be a finite{' positive' if positive else ''} number, got {value}")
    return xp.asarray(value, dtype=pre.dtype, device=device_of(pre))


# --- JumpReLU ---------------------------------------------------------------------------------
def jumprelu(pre, theta) -> SparseCode:
    r"""JumpReLU (Rajamanoharan et al. 2024): :math:`f = z \odot H(z - \theta)`, :math:`\theta > 0`.

    Parameters
    ----------
    pre : array, shape [B, h]
    theta : array, shape [h], positive

    Gradient (pseudo-derivatives with the rectangle kernel
    :math:`K(u) = \mathbb{1}[-\tfrac12 < u < \tfrac12]` and bandwidth :math:`\varepsilon`):

    .. math:: \frac{\partial f}{\partial z} = H(z - \theta), \qquad
              \frac{\eth f}{\eth \theta} = -\frac{\theta}{\varepsilon}
              K\!\left(\frac{z - \theta}{\varepsilon}\right).

    The first is :func:`pass_through_backward`; the second needs the upstream gradient at the
    places where the kernel is nonzero, :func:`jumprelu_window`, and is
    :func:`jumprelu_theta_backward`.
    """
    xp = _check_pre("jumprelu", pre, theta=theta)
    theta = _as_theta("jumprelu", xp, pre, theta, positive=True)
    return SparseCode.from_mask(pre, pre > theta)


def jumprelu_window(pre, theta, bandwidth: float) -> SparseCode:
    r"""The places where the rectangle kernel is nonzero: :math:`|z - \theta| / \varepsilon < 1/2`.

    Its values are ``pre`` there. Only these places carry a gradient to :math:`\theta`
    (from the activation and from the L0 penalty).
    """
    xp = _check_pre("jumprelu_window", pre, theta=theta)
    theta = _as_theta("jumprelu_window", xp, pre, theta, positive=True)
    eps = C.positive_number("jumprelu_window", "bandwidth", bandwidth)
    return _window(xp, pre, theta, eps)


def _window(xp, pre, theta, eps):
    u = (pre - theta) / eps
    return SparseCode.from_mask(pre, (u > -0.5) & (u < 0.5))


def jumprelu_theta_backward(window: SparseCode, theta, bandwidth: float, g_window):
    r"""Gradient on :math:`\theta` (shape [h]) of JumpReLU, given the upstream gradient on f.

    .. math:: \frac{\partial L}{\partial \theta_j} = \sum_b \frac{\partial L}{\partial f_{bj}}
              \left(-\frac{\theta_j}{\varepsilon}\right)
              K\!\left(\frac{z_{bj} - \theta_j}{\varepsilon}\right)

    ``g_window`` is :math:`\partial L / \partial f` at the places of ``window``
    (:func:`jumprelu_window`), where :math:`K = 1`.
    """
    xp = array_namespace(theta, g_window)
    eps = C.positive_number("jumprelu_theta_backward", "bandwidth", bandwidth)
    per_entry = g_window * (-take(theta, window.cols) / eps)
    return get_backend(xp).segment_sum(window.cols, per_entry, window.shape[1])


def pass_through_backward(code: SparseCode, g_values) -> SparseCode:
    r"""Backward of every selection above, with respect to ``pre``.

    The selection is held fixed and each kept entry is the identity of its input
    (:math:`\partial f_{ij}/\partial z_{ij} = 1` where kept, 0 elsewhere), so the gradient on
    ``pre`` is the upstream gradient at the kept places and zero elsewhere: a code.
    """
    return code.with_values(g_values)
