"""``sae_ref.backends.take``: the standard's ``take`` for in-range, non-negative indices.

- on every backend it gives what ``xp.take`` gives, for 1-D arrays and along an axis of 2-D
  ones, repeated and empty index lists included;
- on torch it is one kernel (an ``index_select``), where array-api-compat's ``take`` maps
  negative indices first (three more);
- a 2-D array without an axis is an error that names the argument (the standard asks for an
  axis; NumPy's own ``take`` would flatten).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sae_ref.arrays import to_numpy
from sae_ref.backends import take


@given(data=st.data())
def test_take_equals_the_standard_take_along_any_axis(backend, data):
    shape = tuple(data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=2)))
    axis = data.draw(st.sampled_from([None] if len(shape) == 1 else [0, 1, -1]))
    n = shape[0] if axis is None else shape[axis]
    idx = np.asarray(data.draw(st.lists(st.integers(0, n - 1), max_size=8)), dtype=np.int64)
    x = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    got = take(backend.asarray(x), backend.asarray(idx), axis=axis)
    want = np.take(x, idx, axis=0 if axis is None else axis)
    np.testing.assert_array_equal(to_numpy(got), want)


def test_take_on_torch_is_one_index_select():
    torch = pytest.importorskip("torch")
    from torch.overrides import TorchFunctionMode

    class Calls(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    x, idx = torch.arange(10.0), torch.tensor([3, 0, 9, 3])
    with Calls() as calls:
        got = take(x, idx)
    assert [n for n in calls.names if n != "__get__"] == ["index_select"]
    assert got.tolist() == [3.0, 0.0, 9.0, 3.0]


def test_take_of_a_matrix_without_an_axis_names_the_argument(backend):
    with pytest.raises(ValueError, match="argument 'x' must be 1-D"):
        take(backend.asarray(np.zeros((2, 3))), backend.asarray(np.asarray([0], dtype=np.int64)))
