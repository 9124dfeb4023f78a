"""Selecting the n largest entries under the project's tie rule.

**Tie rule.** Among entries equal to the cut value, the one with the lower index wins: the
lower flat (row-major) index for a whole-array selection, the lower column for a per-row one.
So the selection is a function of the values alone, identical on every backend, although
``torch.topk`` and ``np.argpartition`` leave ties unspecified.

The work splits into the cut value ``v`` (the n-th largest, a native partition or top-k where
the library has one) and passes in standard functions: when exactly ``n`` entries are
``>= v`` (no surplus ties, the usual case for float data) that is the mask; otherwise keep
``x > v`` and the first ``n - count(x > v)`` entries equal to ``v`` in index order (a prefix
count over the ties).
"""

from __future__ import annotations

from array_api_compat import array_namespace


def top_n_mask(x, n: int, *, axis: int | None = None, backend=None, return_cut: bool = False):
    """Boolean mask of the ``n`` largest entries of ``x`` under the lower-index tie rule.

    Parameters
    ----------
    x : array, shape (B, h)
        Real floating values, no NaN (the caller checks).
    n : int
        How many to keep: ``1 <= n <= x.size`` (whole array) or ``<= h`` (per row).
    axis : None or -1
        ``None`` selects over the whole array, ``-1`` within each row.
    backend : optional
        A backend from :func:`sae_ref.backends.get_backend`; default, the native one.
    return_cut : bool
        Also return the cut value ``v`` (0-D, or shape (B, 1) per row).

    Returns
    -------
    mask : bool array, shape of ``x``, with exactly ``n`` True (per row if ``axis=-1``);
    and ``v`` when ``return_cut``.
    """
    from . import get_backend

    xp = array_namespace(x)
    be = backend if backend is not None else get_backend(xp)
    v = be.kth_largest(x, n, axis=axis)
    ge = x >= v
    n_ge = xp.count_nonzero(ge) if axis is None else xp.count_nonzero(ge, axis=-1, keepdims=True)
    if bool(xp.all(n_ge == n)):  # no surplus ties at the cut: the common case for float data
        mask = ge
    else:
        gt = x > v
        eq = x == v
        need = n - (xp.count_nonzero(gt) if axis is None else xp.count_nonzero(gt, axis=-1, keepdims=True))
        mask = gt | (eq & (_tie_rank(xp, eq, axis) <= need))
    return (mask, v) if return_cut else mask


def _tie_rank(xp, eq, axis):
    """1-based position of each tied entry among the ties, in index order."""
    count = xp.astype(eq, xp.int64)
    if axis is None:
        flat = xp.cumulative_sum(xp.reshape(count, (-1,)))
        return xp.reshape(flat, eq.shape)
    return xp.cumulative_sum(count, axis=-1)
