"""``take`` for the indices sae-ref forms itself (in range, never negative).

The standard's ``take`` on torch (array-api-compat's) first maps negative indices to their
positive equivalents: a comparison, an addition and a ``where`` before the ``index_select``,
three more kernels on a GPU for every gather. The selection, the codes and the products
gather a few dozen times a step, so the GPU path's step took about 70 such kernels more than
it needs. Every other library gets its own ``take``.
"""

from __future__ import annotations

from array_api_compat import array_namespace, is_torch_array


def take(x, indices, /, *, axis: int | None = None):
    """``xp.take(x, indices, axis=axis)`` for ``indices`` in ``[0, x.shape[axis])``: on torch
    one ``index_select`` (``axis=None``: ``x`` 1-D, as the standard asks)."""
    if axis is None and x.ndim != 1:
        raise ValueError(f"take: argument 'x' must be 1-D without an axis, got shape {tuple(x.shape)}")
    if is_torch_array(x):
        return x.index_select(0 if axis is None else axis, indices)
    return array_namespace(x).take(x, indices, axis=axis)
