"""The sparse code: which latents fired for which sample, and how strongly.

An SAE's activations ``f`` (shape [B, h]) are mostly zero. sae-ref keeps them as coordinates
(rows, cols, values) in row-major order, so decoding and every gradient touch only the
``nnz`` kept entries: O(nnz * d) work, not O(B * h * d).

>>> import numpy as np
>>> from sae_ref.sparse import SparseCode
>>> code = SparseCode.from_mask(np.array([[0., 2., 3.]]), np.array([[False, True, True]]))
>>> code.rows.tolist(), code.cols.tolist(), code.values.tolist(), code.shape
([0, 0], [1, 2], [2.0, 3.0], (1, 3))
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from array_api_compat import array_namespace, device as device_of

from sae_ref.backends import get_backend, take


@dataclass(frozen=True)
class SparseCode:
    """Coordinates of the nonzero activations of a (B, h) matrix.

    Attributes
    ----------
    rows : int64 array, shape [nnz]
        Sample (batch row) of each entry; ascending in codes made by :meth:`from_mask`
        (the products do not rely on it: :meth:`concat` output is valid too).
    cols : int64 array, shape [nnz]
        Latent of each entry.
    values : float array, shape [nnz]
        The activation value (or, for a gradient, the gradient at that place).
    shape : (B, h)
    padded : bool
        An internal form of the training step on a GPU (the sync-free mode of
        :mod:`sae_ref.backends`): the selection had a size known in advance, and entries with
        value 0 are places it listed but did not keep (a non-positive pre-activation). They
        add nothing to a product, count in no L0, and the backward pass gives them no
        gradient. No public function returns a padded code: each passes its result through
        :meth:`exact`, so a code's entries are its kept entries on every device.
    """

    rows: Any
    cols: Any
    values: Any
    shape: tuple[int, int]
    padded: bool = False

    @classmethod
    def from_mask(cls, z, mask) -> SparseCode:
        """The entries of ``z`` where ``mask`` is True, in row-major order."""
        xp = array_namespace(z, mask)
        B, h = z.shape
        # one pass over the flat mask, then O(nnz) work: cheaper than a 2-D nonzero plus a
        # boolean-mask gather, which both scan all B*h entries
        (flat,) = xp.nonzero(xp.reshape(mask, (-1,)))
        flat = xp.astype(flat, xp.int64)
        values = take(xp.reshape(z, (-1,)), flat)
        return cls(flat // h, flat % h, values, (B, h))

    def exact(self) -> SparseCode:
        """This code without the padding entries (value 0) of a padded code: the exact code of
        the same selection, entries in the same order. A code that is not padded is returned
        as it is; a padded one costs one host read (its number of kept entries)."""
        if not self.padded:
            return self
        kept = self.values != 0
        return SparseCode(self.rows[kept], self.cols[kept], self.values[kept], self.shape)

    @property
    def nnz(self) -> int:
        return int(self.values.shape[0])

    def with_values(self, values) -> SparseCode:
        """The same coordinates with other values (e.g. a gradient on the code)."""
        return replace(self, values=values)

    def to_dense(self):
        """The dense (B, h) matrix (for inspection and tests; training never builds it)."""
        xp = array_namespace(self.values)
        return get_backend(xp).to_dense(self.rows, self.cols, self.values, self.shape)

    def l0(self):
        """Number of nonzero entries of each row, as a float array of shape [B]."""
        xp = array_namespace(self.values)
        return get_backend(xp).segment_count(self.rows, self.values != 0, self.shape[0], self.values.dtype)

    def latent_counts(self):
        """How many samples each latent fired on (nonzero value), shape [h]."""
        xp = array_namespace(self.values)
        return get_backend(xp).segment_count(self.cols, self.values != 0, self.shape[1], self.values.dtype)

    def concat(self, other: SparseCode) -> SparseCode:
        """Both codes' entries together (duplicated places add up in every product)."""
        if other.shape != self.shape:
            raise ValueError(f"concat: codes of shapes {self.shape} and {other.shape}")
        xp = array_namespace(self.values, other.values)
        return SparseCode(
            xp.concat([self.rows, other.rows]),
            xp.concat([self.cols, other.cols]),
            xp.concat([self.values, other.values]),
            self.shape,
            self.padded or other.padded,
        )


@dataclass(frozen=True)
class ColumnBlock:
    """A (B, h) matrix that is zero outside a few columns, kept as those columns, densely.

    AuxK's activations and their gradient take this form when few latents are dead: every
    row picks among the same ``n`` dead columns, and when its ``k'`` of them fill a good
    share of the ``[B, n]`` block, GEMMs on the block beat sparse products on the entries.

    Attributes
    ----------
    cols : int64 array, shape [n], ascending, unique; or, on the GPU path, the dead columns
        ascending followed by padding columns (repeats of column 0) whose values are zero
    values : float array, shape [B, n]: column ``cols[i]`` of the matrix is ``values[:, i]``
    shape : (B, h)
    precision : the precision of the GEMMs with the block (``SAEConfig.precision``'s values)
    every : True when ``cols`` is every column in order (0 .. h-1)
    sums : each column's sum over the rows ([n]) when it was formed with ``values`` (AuxK's
        gradient block), else None
    """

    cols: Any
    values: Any
    shape: tuple[int, int]
    precision: str = "highest"
    every: bool = False
    sums: Any = None


def values_at(src: SparseCode, dst: SparseCode):
    """The values of ``src`` at the places of ``dst`` (0 where ``src`` has no entry).

    Both codes must be in row-major order with unique places (as :meth:`SparseCode.from_mask`
    makes them). Standard functions only: a binary search of ``dst``'s flat indices in
    ``src``'s.
    """
    xp = array_namespace(src.values, dst.values)
    if src.nnz == 0 or dst.nnz == 0:
        return xp.zeros((dst.nnz,), dtype=src.values.dtype, device=device_of(src.values))
    h = src.shape[1]
    flat_src = src.rows * h + src.cols
    flat_dst = dst.rows * h + dst.cols
    pos = xp.clip(xp.searchsorted(flat_src, flat_dst), max=src.nnz - 1)
    hit = take(flat_src, pos) == flat_dst
    zero = xp.zeros((), dtype=src.values.dtype, device=device_of(src.values))
    return xp.where(hit, take(src.values, pos), zero)


def empty_code(xp, shape, dtype, device) -> SparseCode:
    """A code with no entries."""
    idx = xp.zeros((0,), dtype=xp.int64, device=device)
    return SparseCode(idx, idx, xp.zeros((0,), dtype=dtype, device=device), tuple(shape))
