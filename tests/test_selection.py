"""Property tests of the selection primitive ``top_n_mask`` and ``kth_largest``.

Every test compares a backend's result with an independent float64 NumPy oracle of the tie
rule: order the entries by (-value, index) with ``np.lexsort`` and keep the first ``n`` (flat
row-major index for a whole-array selection, column for a per-row one).
"""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import device as device_of
from hypothesis import given, strategies as st

from sae_ref.backends import get_backend, group_size, top_n_mask
from sae_ref.validation.oracles import top_n_mask_oracle
from sae_ref.validation.strategies import pre_activations

DTYPES = (np.float32, np.float64)


def matrices(**kw):
    """(B, h) pre-activations in float32 or float64, ties often."""
    return st.sampled_from(DTYPES).flatmap(lambda dt: pre_activations(dtype=dt, **kw))


def n_in(data, hi: int) -> int:
    """A selection size in [1, hi], with the ends drawn often."""
    return data.draw(st.one_of(st.just(1), st.just(hi), st.integers(1, hi)), label="n")


# --- oracles (float64 NumPy, independent of the library) --------------------------------------
oracle_top_n = top_n_mask_oracle


def oracle_kth_largest(z, n: int, axis) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    if axis is None:
        return np.sort(z.reshape(-1))[::-1][n - 1]
    return np.sort(z, axis=-1)[:, ::-1][:, n - 1 : n]


def run_mask(backend, x, n, axis, be=None) -> np.ndarray:
    m = top_n_mask(x, n, axis=axis, backend=be)
    assert device_of(m) == backend.device
    m = backend.numpy(m)
    assert m.dtype == np.bool_ and m.shape == tuple(x.shape)
    return m


# --- top_n_mask against the oracle ------------------------------------------------------------
@given(z=matrices(), data=st.data())
def test_top_n_mask_whole_array_equals_tie_rule_oracle_with_exactly_n_true(backend, z, data):
    """Invariant: the whole-array mask is the oracle's (ties to the lower flat index),
    bit-for-bit, and has exactly n True, for every n in [1, B*h]."""
    n = n_in(data, z.size)
    mask = run_mask(backend, backend.asarray(z), n, None)
    assert int(mask.sum()) == n
    np.testing.assert_array_equal(mask, oracle_top_n(z, n, None))


@given(z=matrices(), data=st.data())
def test_top_n_mask_per_row_equals_tie_rule_oracle_with_n_true_per_row(backend, z, data):
    """Invariant: the per-row (axis=-1) mask is the oracle's (ties to the lower column),
    bit-for-bit, with exactly n True in every row, for every n in [1, h]."""
    n = n_in(data, z.shape[1])
    mask = run_mask(backend, backend.asarray(z), n, -1)
    np.testing.assert_array_equal(mask.sum(axis=1), np.full(z.shape[0], n))
    np.testing.assert_array_equal(mask, oracle_top_n(z, n, -1))


@given(data=st.data())
def test_top_n_mask_all_equal_values_keeps_lowest_indices(backend, data):
    """Invariant: on a constant matrix (every entry tied at the cut) the first n flat indices
    (whole array) or the first n columns (per row) are kept."""
    B = data.draw(st.integers(1, 6), label="B")
    h = data.draw(st.integers(1, 12), label="h")
    dt = data.draw(st.sampled_from(DTYPES), label="dtype")
    c = data.draw(st.sampled_from([-1.5, -0.0, 0.0, 2.0]), label="c")
    z = np.full((B, h), c, dtype=dt)
    x = backend.asarray(z)
    n = n_in(data, B * h)
    want = (np.arange(B * h) < n).reshape(B, h)
    np.testing.assert_array_equal(run_mask(backend, x, n, None), want)
    n = n_in(data, h)
    want = np.broadcast_to(np.arange(h) < n, (B, h))
    np.testing.assert_array_equal(run_mask(backend, x, n, -1), want)


# --- native fast path against the pure-standard backend ---------------------------------------
@given(z=matrices(), data=st.data())
def test_native_and_standard_backends_give_identical_masks_and_kth_largest(backend, z, data):
    """Invariant: get_backend(xp) and get_backend(xp, native=False) select the identical
    masks and return the same n-th largest value (= the oracle's, and = the cut that
    top_n_mask(return_cut=True) reports), both axes."""
    x = backend.asarray(z)
    native = get_backend(backend.xp)
    standard = get_backend(backend.xp, native=False)
    for axis, hi in ((None, z.size), (-1, z.shape[1])):
        n = n_in(data, hi)
        m_nat = run_mask(backend, x, n, axis, native)
        m_std = run_mask(backend, x, n, axis, standard)
        np.testing.assert_array_equal(m_nat, m_std)
        np.testing.assert_array_equal(m_nat, run_mask(backend, x, n, axis))  # default = native
        k_nat = native.kth_largest(x, n, axis=axis)
        k_std = standard.kth_largest(x, n, axis=axis)
        want_shape = () if axis is None else (z.shape[0], 1)
        assert tuple(k_nat.shape) == tuple(k_std.shape) == want_shape
        k_nat, k_std = backend.numpy(k_nat), backend.numpy(k_std)
        assert k_nat.dtype == k_std.dtype == z.dtype
        # value equality (-0.0 == 0.0: the two are the same cut)
        np.testing.assert_array_equal(k_nat, k_std)
        np.testing.assert_array_equal(k_nat.astype(np.float64), oracle_kth_largest(z, n, axis))
        m_cut, cut = top_n_mask(x, n, axis=axis, return_cut=True)
        np.testing.assert_array_equal(backend.numpy(m_cut), m_nat)
        np.testing.assert_array_equal(backend.numpy(cut), k_nat)


# --- torch half precisions ----------------------------------------------------------------------
@pytest.mark.parametrize("half", ["float16", "bfloat16"])
@given(z=pre_activations(dtype=np.float32, max_batch=8, max_h=32), data=st.data())
def test_half_precision_selections_equal_oracle_on_same_values(backend, half, z, data):
    """Invariant: in torch float16/bfloat16 (where rounding makes ties common) top_n_mask,
    native and standard, both axes, and topk / batch_topk equal the oracle computed on the
    same (rounded) values."""
    if not backend.name.startswith("torch"):
        pytest.skip("float16/bfloat16 selections are tested on torch only")
    import torch

    from sae_ref.activations import batch_topk, topk

    x = torch.asarray(z, device=backend.device).to(getattr(torch, half))
    v = x.to(torch.float64).cpu().numpy()  # the exact rounded values
    B, h = v.shape
    for be in (get_backend(backend.xp), get_backend(backend.xp, native=False)):
        for axis, hi in ((None, v.size), (-1, h)):
            n = n_in(data, hi)
            m = top_n_mask(x, n, axis=axis, backend=be).cpu().numpy()
            np.testing.assert_array_equal(m, oracle_top_n(v, n, axis))
    k = data.draw(st.integers(1, h), label="k")
    for op, n, axis in ((topk, k, -1), (batch_topk, B * k, None)):
        code = op(x, k)
        assert code.values.dtype == x.dtype
        got = np.zeros((B, h), dtype=bool)
        got[code.rows.cpu().numpy(), code.cols.cpu().numpy()] = True
        np.testing.assert_array_equal(got, oracle_top_n(v, n, axis) & (v > 0))
        np.testing.assert_array_equal(code.values.to(torch.float64).cpu().numpy(), v[got])


# --- top_n_indices (the bracketed selection the SAE uses) against the oracle -------------------
@st.composite
def bracketable(draw):
    """(B, h) with h a multiple of 16..256, so the column-group bracket is used for small n;
    values from a small integer set (ties at the cut) or continuous."""
    B = draw(st.integers(1, 8), label="B")
    h = draw(st.sampled_from([16, 48, 64, 128, 256]), label="h")
    dt = draw(st.sampled_from(DTYPES), label="dtype")
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    if draw(st.booleans(), label="ties"):
        z = rng.integers(-2, 4, size=(B, h)).astype(dt)
    else:
        z = rng.standard_normal((B, h)).astype(dt)
    return z


@pytest.mark.parametrize("native", [True, False], ids=["native", "standard"])
@pytest.mark.parametrize("axis", [None, -1], ids=["whole", "per_row"])
@given(z=st.one_of(bracketable(), matrices()), data=st.data())
def test_top_n_indices_equal_tie_rule_oracle_ascending_and_bracket_never_misses(backend, native, axis, z, data):
    """Invariant: the bracketed selection keeps exactly the oracle's places (ties to the lower
    index), as ascending flat indices, and its cut is the oracle's n-th largest value, on the
    native and the pure-standard backends; small n exercises the group-maximum bracket."""
    hi = z.size if axis is None else z.shape[1]
    n = data.draw(st.one_of(st.integers(1, max(1, hi // 16)), st.integers(1, hi)), label="n")
    x = backend.asarray(z)
    be = get_backend(backend.xp, native=native)
    idx, cut = be.top_n_indices(x, n, axis=axis)
    assert device_of(idx) == backend.device
    idx = backend.numpy(idx).astype(np.int64)
    assert np.all(np.diff(idx) > 0)
    got = np.zeros(z.size, dtype=bool)
    got[idx] = True
    np.testing.assert_array_equal(got.reshape(z.shape), oracle_top_n(z, n, axis))
    np.testing.assert_array_equal(backend.numpy(cut).astype(np.float64), oracle_kth_largest(z, n, axis))
    g = group_size(z.shape, n, axis=axis)
    if g > 1:  # given the group maxima (as the SAE's forward pass computes them): the same
        idx_m, cut_m = be.top_n_indices(x, n, axis=axis, maxima=be.group_max(x, g))
        np.testing.assert_array_equal(backend.numpy(idx_m).astype(np.int64), idx)
        np.testing.assert_array_equal(backend.numpy(cut_m), backend.numpy(cut))
