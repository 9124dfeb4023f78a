"""Property tests of the sparse activations in ``sae_ref.activations``.

Each property is checked on every backend (the ``backend`` fixture) against an independent
float64 NumPy oracle written here; the tie rule oracle orders entries by (-value, index) with
``np.lexsort`` and keeps the first n. Inputs come from ``pre_activations`` (negatives, zeros,
-0.0 and exact ties) in float32 and float64.
"""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import device as device_of
from hypothesis import assume, given, strategies as st

from sae_ref.activations import (
    batch_topk,
    jumprelu,
    jumprelu_theta_backward,
    jumprelu_window,
    pass_through_backward,
    relu,
    threshold,
    topk,
)
from sae_ref.validation.oracles import top_n_mask_oracle
from sae_ref.validation.strategies import pre_activations

DTYPES = (np.float32, np.float64)


def matrices(**kw):
    """(B, h) pre-activations in float32 or float64."""
    return st.sampled_from(DTYPES).flatmap(lambda dt: pre_activations(dtype=dt, **kw))


# --- oracles (float64 NumPy) ------------------------------------------------------------------
oracle_top_n = top_n_mask_oracle


def oracle_topk(z, k):
    return oracle_top_n(z, k, -1) & (np.asarray(z, np.float64) > 0)


def oracle_batch_topk(z, k):
    return oracle_top_n(z, z.shape[0] * k, None) & (np.asarray(z, np.float64) > 0)


def window_oracle(z, theta, eps):
    """Rectangle-kernel support K((z - theta)/eps) in float64, and the entries whose side of
    +-1/2 rounding in the input dtype may decide (near the edge and not computed exactly)."""
    z64 = z.astype(np.float64)
    t64 = np.asarray(theta, dtype=np.float64)
    u = (z64 - t64) / eps
    inside = (u > -0.5) & (u < 0.5)
    dt = z.dtype.type
    u_dt = ((z - np.asarray(theta, dtype=z.dtype)) / dt(eps)).astype(np.float64)
    near = np.abs(np.abs(u) - 0.5) <= 16 * np.finfo(z.dtype).eps
    return inside, near & (u_dt != u)


def grad_tol(terms, dtype):
    """Rounding bound of a per-column sum of ``terms`` (B, h) computed in ``dtype``: the
    column's own sum, plus (for the pure-standard backend, which sums by differences of a
    float64 prefix sum over all columns) float64 rounding of the whole prefix."""
    B = terms.shape[0]
    own = 8 * np.finfo(dtype).eps * (B + 2) * np.abs(terms).sum(axis=0)
    prefix = 8 * np.finfo(np.float64).eps * (terms.size + 2) * np.abs(terms).sum()
    return own + prefix


# --- helpers ----------------------------------------------------------------------------------
def as_np(backend, code, z):
    """(rows, cols, values, mask) of a code, after checking its structure: shape, device,
    int64 indices, the input's dtype, unique places in row-major order."""
    B, h = z.shape
    assert tuple(code.shape) == (B, h)
    for a in (code.rows, code.cols, code.values):
        assert device_of(a) == backend.device
    rows, cols, vals = (backend.numpy(a) for a in (code.rows, code.cols, code.values))
    assert rows.dtype == np.int64 and cols.dtype == np.int64
    assert vals.dtype == z.dtype
    assert code.nnz == rows.size == cols.size == vals.size
    flat = rows * h + cols
    assert np.all(np.diff(flat) > 0), "places must be unique and row-major"
    assert np.all((rows >= 0) & (rows < B) & (cols >= 0) & (cols < h))
    mask = np.zeros((B, h), dtype=bool)
    mask[rows, cols] = True
    return rows, cols, vals, mask


def dense(backend, code):
    d = code.to_dense()
    assert device_of(d) == backend.device
    return backend.numpy(d)


def k_in(data, h):
    return data.draw(st.one_of(st.just(1), st.just(h), st.integers(1, h)), label="k")


def theta_per_latent(data, z, *, positive: bool):
    """A per-latent theta in z's dtype: random levels, grid levels and exact copies of entries
    of z (so that z == theta happens); positive, or of either sign."""
    B, h = z.shape
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="theta seed"))
    scale = float(np.abs(z).max()) or 1.0
    lo = 0.0 if positive else -scale
    t = rng.uniform(lo, scale, size=h)
    t = np.where(rng.random(h) < 0.3, rng.choice([0.25, 0.5, 0.75, 1.0], size=h), t)
    copy = rng.random(h) < 0.4
    t = np.where(copy, z[rng.integers(0, B, size=h), np.arange(h)], t).astype(z.dtype)
    if positive:
        t = np.where(t > 0, t, z.dtype.type(scale / 2)).astype(z.dtype)
        assert np.all(t > 0)
    return t


# --- ReLU -------------------------------------------------------------------------------------
@given(z=matrices())
def test_relu_code_equals_max_z_0(backend, z):
    """Invariant: relu's code is max(z, 0): kept exactly where z > 0, values the inputs."""
    code = relu(backend.asarray(z))
    rows, cols, vals, mask = as_np(backend, code, z)
    np.testing.assert_array_equal(mask, z.astype(np.float64) > 0)
    np.testing.assert_array_equal(vals, z[rows, cols])
    np.testing.assert_array_equal(dense(backend, code), np.maximum(z.astype(np.float64), 0.0))


# --- TopK -------------------------------------------------------------------------------------
@given(z=matrices(), data=st.data())
def test_topk_equals_tie_rule_oracle_lower_column_wins(backend, z, data):
    """Invariant: topk keeps exactly the oracle's set (per row the k largest by (-value,
    column), positive only) and its values are the inputs there."""
    k = k_in(data, z.shape[1])
    code = topk(backend.asarray(z), k)
    rows, cols, vals, mask = as_np(backend, code, z)
    np.testing.assert_array_equal(mask, oracle_topk(z, k))
    np.testing.assert_array_equal(vals, z[rows, cols])


@given(z=matrices(), data=st.data())
def test_topk_row_l0_is_min_k_positives_and_kept_dominate_dropped(backend, z, data):
    """Invariant: each row has min(k, #positive in row) nonzeros (l0()), kept values equal
    the inputs, are positive, and are >= every dropped relu value of the same row."""
    k = k_in(data, z.shape[1])
    code = topk(backend.asarray(z), k)
    rows, cols, vals, mask = as_np(backend, code, z)
    pos = (z > 0).sum(axis=1)
    want = np.minimum(k, pos)
    np.testing.assert_array_equal(mask.sum(axis=1), want)
    l0 = backend.numpy(code.l0())
    np.testing.assert_array_equal(l0, want.astype(l0.dtype))
    np.testing.assert_array_equal(vals, z[rows, cols])
    assert np.all(vals > 0)
    r = np.maximum(z.astype(np.float64), 0.0)
    for b in range(z.shape[0]):
        if mask[b].any() and (~mask[b]).any():
            assert r[b, mask[b]].min() >= r[b, ~mask[b]].max()


# --- BatchTopK --------------------------------------------------------------------------------
@given(z=matrices(), data=st.data())
def test_batch_topk_nnz_is_Bk_or_all_positives_and_mean_l0_is_k(backend, z, data):
    """Invariant: BatchTopK keeps exactly B*k entries when at least B*k are positive (then
    the mean per-sample L0 is exactly k), and every positive entry otherwise."""
    B, h = z.shape
    k = k_in(data, h)
    code = batch_topk(backend.asarray(z), k)
    _, _, _, mask = as_np(backend, code, z)
    n_pos = int((z > 0).sum())
    l0 = backend.numpy(code.l0())
    assert l0.shape == (B,)
    np.testing.assert_array_equal(l0, mask.sum(axis=1).astype(l0.dtype))
    if n_pos >= B * k:
        assert code.nnz == B * k
        assert float(np.sum(l0)) == B * k
        assert float(backend.numpy(backend.xp.mean(code.l0()))) == k
    else:
        assert code.nnz == n_pos
        np.testing.assert_array_equal(mask, z > 0)


@given(z=matrices(), data=st.data())
def test_batch_topk_equals_tie_rule_oracle_and_kept_dominate_dropped(backend, z, data):
    """Invariant: the kept set is the oracle's (B*k largest by (-value, flat index), positive
    only); kept values equal the inputs, are all positive, and are >= every dropped relu value."""
    k = k_in(data, z.shape[1])
    code = batch_topk(backend.asarray(z), k)
    rows, cols, vals, mask = as_np(backend, code, z)
    np.testing.assert_array_equal(mask, oracle_batch_topk(z, k))
    np.testing.assert_array_equal(vals, z[rows, cols])
    assert np.all(vals > 0)
    r = np.maximum(z.astype(np.float64), 0.0)
    if mask.any() and (~mask).any():
        assert r[mask].min() >= r[~mask].max()


@given(z=matrices(max_batch=1), data=st.data())
def test_batch_topk_of_one_row_equals_topk(backend, z, data):
    """Invariant: with B = 1, batch_topk(z, k) is topk(z, k): same places, same values."""
    assert z.shape[0] == 1
    k = k_in(data, z.shape[1])
    x = backend.asarray(z)
    r1, c1, v1, _ = as_np(backend, batch_topk(x, k), z)
    r2, c2, v2, _ = as_np(backend, topk(x, k), z)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(v1, v2)


@given(z=matrices(ties=False), data=st.data())
def test_batch_topk_row_permutation_equivariant(backend, z, data):
    """Invariant: permuting the rows of the input permutes the rows of the output (identical
    values), when no tie straddles the cut (the tie rule is by flat index)."""
    B, h = z.shape
    k = k_in(data, h)
    perm = np.asarray(data.draw(st.permutations(range(B)), label="perm"))
    ref = oracle_batch_topk(z, k)
    if ref.any():
        cut = z[ref].min()
        assume(not np.any(z[~ref] == cut))
    d = dense(backend, batch_topk(backend.asarray(z), k))
    dp = dense(backend, batch_topk(backend.asarray(np.ascontiguousarray(z[perm])), k))
    np.testing.assert_array_equal(dp, d[perm])


@given(z=matrices(min_h=2), data=st.data())
def test_batch_topk_kept_set_monotone_in_k(backend, z, data):
    """Invariant: the kept set for k is a subset of the kept set for k+1 (ties included)."""
    k = data.draw(st.integers(1, z.shape[1] - 1), label="k")
    x = backend.asarray(z)
    _, _, _, m1 = as_np(backend, batch_topk(x, k), z)
    _, _, _, m2 = as_np(backend, batch_topk(x, k + 1), z)
    assert not np.any(m1 & ~m2)
    assert m1.sum() <= m2.sum()


# --- threshold --------------------------------------------------------------------------------
@given(z=matrices(), data=st.data())
def test_threshold_scalar_keeps_exactly_z_gt_theta_and_positive(backend, z, data):
    """Invariant: threshold(z, theta) keeps exactly z > theta and z > 0 (strict: an entry equal
    to theta is dropped; a negative theta keeps every positive entry), for theta a number or
    a 0-D array."""
    B, h = z.shape
    kind = data.draw(st.sampled_from(["entry", "zero", "random", "negative"]), label="kind")
    if kind == "entry":
        theta = z[data.draw(st.integers(0, B - 1)), data.draw(st.integers(0, h - 1))]
    elif kind == "zero":
        theta = z.dtype.type(0.0)
    else:
        scale = float(np.abs(z).max()) or 1.0
        u = data.draw(st.floats(-1.0, 1.0), label="u")
        theta = z.dtype.type(-abs(u) * scale if kind == "negative" else u * scale)
    want = (z.astype(np.float64) > float(theta)) & (z > 0)
    as_array = data.draw(st.booleans(), label="theta as 0-D array")
    t = backend.asarray(np.asarray(theta, dtype=z.dtype)) if as_array else float(theta)
    code = threshold(backend.asarray(z), t)
    rows, cols, vals, mask = as_np(backend, code, z)
    np.testing.assert_array_equal(mask, want)
    np.testing.assert_array_equal(vals, z[rows, cols])
    assert not np.any(mask & (z == theta))


@given(z=matrices(), data=st.data())
def test_threshold_per_latent_keeps_exactly_z_gt_theta_j_and_positive(backend, z, data):
    """Invariant: with a per-latent theta (shape [h], any sign), threshold keeps exactly
    z_bj > theta_j and z_bj > 0; entries equal to their theta_j are dropped."""
    theta = theta_per_latent(data, z, positive=False)
    code = threshold(backend.asarray(z), backend.asarray(theta))
    rows, cols, vals, mask = as_np(backend, code, z)
    z64, t64 = z.astype(np.float64), theta.astype(np.float64)
    np.testing.assert_array_equal(mask, (z64 > t64[None, :]) & (z64 > 0))
    np.testing.assert_array_equal(vals, z[rows, cols])


@given(z=matrices(), data=st.data())
def test_threshold_at_smallest_batch_kept_value_is_strict_and_nextafter_reproduces_batch(
    backend, z, data
):
    """Invariant: with theta = the smallest value batch_topk kept on the same z,
    threshold(z, theta) drops that element (strict >) and keeps a subset of the batch set,
    while threshold(z, nextafter(theta, -inf)) (i.e. >=) keeps a superset, equal to the batch
    selection when no tie straddles the cut."""
    k = k_in(data, z.shape[1])
    x = backend.asarray(z)
    _, _, vals, batch = as_np(backend, batch_topk(x, k), z)
    assume(batch.any())
    theta = vals.min()
    assert theta > 0
    _, _, _, strict = as_np(backend, threshold(x, float(theta)), z)
    assert not np.any(strict & ~batch)
    assert not np.any(strict & (z == theta)), "the element equal to theta must be dropped"
    assert strict.sum() < batch.sum()
    lo = np.nextafter(theta, z.dtype.type(-np.inf))
    assert lo < theta and lo.dtype == z.dtype
    _, _, _, ge = as_np(backend, threshold(x, float(lo)), z)
    np.testing.assert_array_equal(ge, (z >= theta) & (z > 0))
    assert not np.any(batch & ~ge)
    if not np.any((z == theta) & ~batch):  # no tie at the cut
        np.testing.assert_array_equal(ge, batch)


# --- JumpReLU ---------------------------------------------------------------------------------
@given(z=matrices(), data=st.data())
def test_jumprelu_keeps_exactly_z_gt_theta(backend, z, data):
    """Invariant: jumprelu keeps exactly z_bj > theta_j (strict; theta_j > 0), values the inputs."""
    theta = theta_per_latent(data, z, positive=True)
    code = jumprelu(backend.asarray(z), backend.asarray(theta))
    rows, cols, vals, mask = as_np(backend, code, z)
    np.testing.assert_array_equal(mask, z.astype(np.float64) > theta.astype(np.float64)[None, :])
    np.testing.assert_array_equal(vals, z[rows, cols])
    assert np.all(vals > 0)


EPS = st.sampled_from([0.001, 0.05, 0.25, 0.5, 1.0])


@given(z=matrices(), data=st.data())
def test_jumprelu_window_is_open_interval_of_half_bandwidth(backend, z, data):
    """Invariant: the window is exactly the entries with (z - theta)/eps strictly inside
    (-1/2, 1/2) (float64 oracle; entries within rounding of the edge are not judged unless
    the input dtype computes u exactly)."""
    theta = theta_per_latent(data, z, positive=True)
    eps = data.draw(EPS, label="eps")
    code = jumprelu_window(backend.asarray(z), backend.asarray(theta), eps)
    rows, cols, vals, mask = as_np(backend, code, z)
    inside, undecided = window_oracle(z, theta, eps)
    np.testing.assert_array_equal(mask[~undecided], inside[~undecided])
    np.testing.assert_array_equal(vals, z[rows, cols])


@given(z=matrices(ties=True), data=st.data())
def test_jumprelu_window_excludes_exact_half_edges(backend, z, data):
    """Invariant: on grid values where u = (z - theta)/eps is exact, entries with u = +-1/2
    are outside the window and u strictly between are inside (bit-for-bit oracle)."""
    h = z.shape[1]
    theta = np.asarray(
        data.draw(st.lists(st.sampled_from([0.25, 0.5, 0.75, 1.0]), min_size=h, max_size=h)),
        dtype=z.dtype,
    )
    eps = data.draw(st.sampled_from([0.25, 0.5, 1.0]), label="eps")
    code = jumprelu_window(backend.asarray(z), backend.asarray(theta), eps)
    _, _, _, mask = as_np(backend, code, z)
    u = (z.astype(np.float64) - theta.astype(np.float64)) / eps
    np.testing.assert_array_equal(mask, (u > -0.5) & (u < 0.5))
    assert not np.any(mask & (np.abs(u) == 0.5))


@given(z=matrices(), data=st.data())
def test_jumprelu_theta_backward_equals_kernel_sum_oracle(backend, z, data):
    """Invariant: jumprelu_theta_backward(window, theta, eps, g at the window places) equals
    sum_b g[b, j] * (-(theta_j / eps)) * K((z_bj - theta_j)/eps) for a random dense g, to
    float rounding (exactly 0 for latents with an empty window)."""
    B, h = z.shape
    theta = theta_per_latent(data, z, positive=True)
    eps = data.draw(EPS, label="eps")
    inside, undecided = window_oracle(z, theta, eps)
    assume(not undecided.any())
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="g seed"))
    g = rng.standard_normal((B, h)).astype(z.dtype)
    t = backend.asarray(theta)
    window = jumprelu_window(backend.asarray(z), t, eps)
    rows, cols, _, mask = as_np(backend, window, z)
    np.testing.assert_array_equal(mask, inside)
    grad = jumprelu_theta_backward(window, t, eps, backend.asarray(g[rows, cols]))
    assert device_of(grad) == backend.device
    got = backend.numpy(grad)
    assert got.shape == (h,) and got.dtype == z.dtype
    terms = g.astype(np.float64) * (-(theta.astype(np.float64) / eps))[None, :] * inside
    want = terms.sum(axis=0)
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= grad_tol(terms, z.dtype)), (got, want, err)
    np.testing.assert_array_equal(got[~inside.any(axis=0)], 0)


@given(z=matrices(), data=st.data())
def test_pass_through_backward_is_upstream_gradient_at_kept_places(backend, z, data):
    """Invariant: pass_through_backward(code, g at the code's places) has the code's places
    and values g there; as a dense matrix it is g where kept and 0 elsewhere."""
    k = k_in(data, z.shape[1])
    code = batch_topk(backend.asarray(z), k)
    rows, cols, _, mask = as_np(backend, code, z)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="g seed"))
    g = rng.standard_normal(z.shape).astype(z.dtype)
    gc = pass_through_backward(code, backend.asarray(g[rows, cols]))
    r2, c2, v2, _ = as_np(backend, gc, z)
    np.testing.assert_array_equal(r2, rows)
    np.testing.assert_array_equal(c2, cols)
    np.testing.assert_array_equal(v2, g[rows, cols])
    np.testing.assert_array_equal(dense(backend, gc), np.where(mask, g, 0).astype(z.dtype))


# --- cross-backend ----------------------------------------------------------------------------
OPS = ["relu", "topk", "batch_topk", "threshold_scalar", "threshold_per_latent", "jumprelu",
       "jumprelu_window", "jumprelu_theta_backward"]


def _apply(op, be, z, p):
    x = be.asarray(z)
    if op == "relu":
        return relu(x)
    if op == "topk":
        return topk(x, p["k"])
    if op == "batch_topk":
        return batch_topk(x, p["k"])
    if op == "threshold_scalar":
        return threshold(x, p["theta_scalar"])
    if op == "threshold_per_latent":
        return threshold(x, be.asarray(p["theta_any"]))
    if op == "jumprelu":
        return jumprelu(x, be.asarray(p["theta_pos"]))
    window = jumprelu_window(x, be.asarray(p["theta_pos"]), p["eps"])
    if op == "jumprelu_window":
        return window
    rows, cols = be.numpy(window.rows), be.numpy(window.cols)
    return jumprelu_theta_backward(window, be.asarray(p["theta_pos"]), p["eps"],
                                   be.asarray(p["g"][rows, cols]))


@pytest.mark.parametrize("op", OPS)
@given(z=matrices(), data=st.data())
def test_same_input_gives_identical_selection_on_every_backend(all_backends, op, z, data):
    """Invariant: the same input gives bit-for-bit the same places (rows, cols) on every
    backend and values within rounding (1e-6 relative in float32); theta gradients agree to
    float rounding."""
    B, h = z.shape
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    p = {
        "k": data.draw(st.integers(1, h), label="k"),
        "theta_scalar": float(z.reshape(-1)[rng.integers(z.size)]),
        "theta_any": theta_per_latent(data, z, positive=False),
        "theta_pos": theta_per_latent(data, z, positive=True),
        "eps": data.draw(EPS, label="eps"),
        "g": rng.standard_normal((B, h)).astype(z.dtype),
    }
    rtol = 1e-6 if z.dtype == np.float32 else 1e-12
    ref = None
    for be in all_backends:
        out = _apply(op, be, z, p)
        if op == "jumprelu_theta_backward":
            got = be.numpy(out)
            assert got.dtype == z.dtype and got.shape == (h,)
            terms = p["g"].astype(np.float64) * (p["theta_pos"].astype(np.float64) / p["eps"])
            if ref is None:
                ref = got
            else:
                err = np.abs(got.astype(np.float64) - ref)
                assert np.all(err <= 2 * grad_tol(terms, z.dtype)), (be.name, got, ref)
            continue
        rows, cols, vals, _ = as_np(be, out, z)
        if ref is None:
            ref = (be.name, rows, cols, vals)
            continue
        np.testing.assert_array_equal(rows, ref[1], err_msg=f"rows: {be.name} vs {ref[0]}")
        np.testing.assert_array_equal(cols, ref[2], err_msg=f"cols: {be.name} vs {ref[0]}")
        np.testing.assert_allclose(vals, ref[3], rtol=rtol, atol=0,
                                   err_msg=f"values: {be.name} vs {ref[0]}")
