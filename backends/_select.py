"""Selecting the n largest entries under the project's tie rule.

**Tie rule.** Among entries equal to the cut value, the one with the lower index wins: the
lower flat (row-major) index for a whole-array selection, the lower column for a per-row one.
So the selection is a function of the values alone, identical on every backend, although
``torch.topk`` and ``np.argpartition`` leave ties unspecified.

The work splits into the cut value ``v`` (the n-th largest, a native partition or top-k where
the library has one) and a pass in standard functions: keep ``x > v``, then the first
``n - count(x > v)`` entries equal to ``v``. The prefix count over the ties runs only when
there are more ties at the cut than places left, which float data rarely has.
"""

from __future__ import annotations

from array_api_compat import array_namespace


def top_n_mask(x, n: int, *, axis: int | None = None, backend=None):
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

    Returns
    -------
    mask : bool array, shape of ``x``, with exactly ``n`` True (per row if ``axis=-1``).
    """
    from . import get_backend

    xp = array_namespace(x)
    be = backend if backend is not None else get_backend(xp)
    v = be.kth_largest(x, n, axis=axis)
    gt = x > v
    eq = x == v
    if axis is None:
        need = n - xp.count_nonzero(gt)
        n_eq = xp.count_nonzero(eq)
    else:
        need = n - xp.count_nonzero(gt, axis=-1, keepdims=True)
        n_eq = xp.count_nonzero(eq, axis=-1, keepdims=True)
    if not bool(xp.any(n_eq > need)):
        return gt | eq
    return gt | (eq & (_tie_rank(xp, eq, axis) <= need))


def _tie_rank(xp, eq, axis):
    """1-based position of each tied entry among the ties, in index order."""
    count = xp.astype(eq, xp.int64)
    if axis is None:
        flat = xp.cumulative_sum(xp.reshape(count, (-1,)))
        return xp.reshape(flat, eq.shape)
    return xp.cumulative_sum(count, axis=-1)
