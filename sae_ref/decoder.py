r"""The decoder constraint: unit-norm decoder rows.

Two pieces, used in two orders:

- :func:`project_grad` removes from each row's gradient its component along the row,
  :math:`g_j \leftarrow g_j - (g_j \cdot \hat w_j)\, \hat w_j` with
  :math:`\hat w_j = W^{dec}_j / \|W^{dec}_j\|`, so a small step moves along the sphere;
- :func:`renormalize` divides each row by its norm.

``order="before"`` (BatchTopK authors): renormalise the rows and project the gradient, then
take the optimiser step (rows are unit-norm before the step, close to it after).
``order="after"`` (SAELens, dictionary_learning): project, step, then renormalise (rows are
unit-norm after the step, exactly to rounding).
"""

from __future__ import annotations

from sae_ref import _checks as C

ORDERS = ("before", "after")
#: Rows with a norm below this are left as they are by :func:`renormalize` (no division by 0).
TINY = 1e-12


def _unit(xp, W, inplace: bool = False):
    """Rows divided by their norms (``inplace``: in ``W``'s memory; the same bits)."""
    norms = xp.sqrt(xp.vecdot(W, W, axis=-1))[:, None]  # vecdot: no [h, d] temporary
    norms = xp.where(norms > TINY, norms, xp.ones_like(norms))
    if inplace:
        W /= norms
        return W
    return W / norms


def renormalize(W_dec):
    """Each row divided by its Euclidean norm (rows of norm below ``TINY`` unchanged)."""
    xp = C.namespace("renormalize", W_dec=W_dec)
    C.floating("renormalize", xp, "W_dec", W_dec, ndim=2)
    return _unit(xp, W_dec)


def project_grad(W_dec, g_W_dec):
    r"""The gradient with each row's component along its decoder row removed.

    .. math:: g_j - (g_j \cdot \hat w_j)\,\hat w_j,

    orthogonal to :math:`W^{dec}_j` for every row ``j``.
    """
    op = "project_grad"
    xp = C.namespace(op, W_dec=W_dec, g_W_dec=g_W_dec)
    C.floating(op, xp, "W_dec", W_dec, ndim=2)
    C.floating(op, xp, "g_W_dec", g_W_dec, ndim=2, shape=tuple(W_dec.shape))
    C.same_dtype(op, W_dec=W_dec, g_W_dec=g_W_dec)
    return _project(xp, W_dec, g_W_dec)


def _project(xp, W, g):
    return _project_unit(xp, _unit(xp, W), g)


def _project_unit(xp, u, g):
    """:func:`project_grad` for rows ``u`` already of unit norm (or zero)."""
    return g - xp.vecdot(g, u, axis=-1)[:, None] * u


def constrained_step(W_dec, g_W_dec, step, *, order: str = "before"):
    """Apply the decoder constraint around one optimiser ``step(W, g) -> W_new``.

    Returns the new decoder. ``order`` as in the module docstring.
    """
    op = "constrained_step"
    xp = C.namespace(op, W_dec=W_dec, g_W_dec=g_W_dec)
    C.floating(op, xp, "W_dec", W_dec, ndim=2)
    C.floating(op, xp, "g_W_dec", g_W_dec, ndim=2, shape=tuple(W_dec.shape))
    C.same_dtype(op, W_dec=W_dec, g_W_dec=g_W_dec)
    C.choice(op, "order", order, ORDERS)
    if order == "before":
        W = _unit(xp, W_dec)
        return step(W, _project(xp, W, g_W_dec))
    return _unit(xp, step(W_dec, _project(xp, W_dec, g_W_dec)))
