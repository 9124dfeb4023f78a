"""How a check talks to an implementation written in another array library.

Checks draw their inputs as NumPy arrays. An :class:`Interface` is the pair of conversions
around the implementation under test: ``to_user`` turns each NumPy input into the
implementation's own array type (dtype kept), ``from_user`` turns whatever it returns into a
NumPy array. :func:`make_interface` builds one from an array library (``numpy``, ``torch``,
``cupy``, ``array_api_strict`` or an array-api-compat namespace) and a device, or from two
functions given by the caller.

``from_user`` understands sae-ref's :class:`~sae_ref.sparse.SparseCode` (made dense), any
object with a ``to_dense()`` method (torch sparse tensors too), torch tensors that require
grad, CuPy and array-api-strict arrays, and Python numbers.

>>> import numpy as np
>>> from sae_ref.validation.interface import make_interface
>>> io = make_interface()                     # NumPy in, NumPy out
>>> io.from_user(io.to_user(np.ones(2, dtype=np.float32))).dtype
dtype('float32')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from sae_ref.arrays import to_numpy
from sae_ref.sparse import SparseCode


@dataclass(frozen=True)
class Interface:
    """The conversions around an implementation under test (see the module docstring)."""

    to_user: Callable[[np.ndarray], Any]
    from_user: Callable[[Any], np.ndarray]
    name: str = "numpy"


def as_numpy(obj) -> np.ndarray:
    """A NumPy array from an implementation's output (its dtype kept)."""
    if isinstance(obj, SparseCode):
        obj = obj.to_dense()
    elif hasattr(obj, "to_dense") and not isinstance(obj, np.ndarray):
        obj = obj.to_dense()
    if isinstance(obj, (int, float, bool, np.generic)):
        return np.asarray(obj)
    if isinstance(obj, (list, tuple)):
        return np.asarray([as_numpy(o) for o in obj])
    return np.asarray(to_numpy(obj))


def make_interface(xp=None, device=None, to_user=None, from_user=None) -> Interface:
    """An :class:`Interface` for the library ``xp`` (default NumPy) on ``device``.

    ``to_user`` / ``from_user`` replace either conversion (for an implementation with its own
    array type, or one that wants keyword containers).
    """
    if to_user is not None and not callable(to_user):
        raise TypeError(f"make_interface: argument 'to_user' must be callable, got {to_user!r}")
    if from_user is not None and not callable(from_user):
        raise TypeError(f"make_interface: argument 'from_user' must be callable, got {from_user!r}")
    name = "numpy" if xp is None else getattr(xp, "__name__", type(xp).__name__)
    if to_user is None:
        to_user = _numpy_in if xp is None and device is None else _library_in(xp, device)
    return Interface(to_user, from_user or as_numpy, name)


def _numpy_in(a: np.ndarray) -> np.ndarray:
    return np.array(a, copy=True)


def _library_in(xp, device):
    if xp is None:
        raise ValueError("make_interface: argument 'device' needs an array library 'xp' as well")

    def convert(a: np.ndarray):
        a = np.array(a, copy=True, order="C")  # the implementation may write into its inputs
        dtype = xp.bool if a.dtype == np.bool_ else getattr(xp, a.dtype.name)
        if device is None:
            return xp.asarray(a, dtype=dtype)
        return xp.asarray(a, dtype=dtype, device=device)

    return convert
