"""Removing the lowest activations: the four methods, frozen statistics and sweeps, on every backend.

Oracles are dense float64 NumPy, written from ALGORITHMS.md section 5 without sae-ref's code.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from sae_ref.pruning import (METHODS, PrunedSAE, global_threshold, latent_quantile, lowest_k,
                             percent_of_max, prune, quantile_thresholds,
                             reference_stats, sweep)
from sae_ref.sae import SAEConfig, SAEParams
from sae_ref.sparse import SparseCode
from sae_ref.validation.oracles import assert_close


# --- data ------------------------------------------------------------------------------------
def _features(rng, B, h, density=0.5, ties=False):
    """A non-negative (B, h) matrix; with ties, values from a small set so that many are equal."""
    if ties:
        v = rng.integers(1, 4, size=(B, h)) / 2.0
    else:
        v = rng.exponential(1.0, size=(B, h)) + 1e-3
    return v * (rng.random((B, h)) < density)


def _code(backend, f, shuffle_seed=None):
    code = SparseCode.from_mask(backend.asarray(f), backend.asarray(f > 0))
    if shuffle_seed is None:
        return code
    perm = backend.asarray(np.random.default_rng(shuffle_seed).permutation(code.nnz).astype(np.int64))
    xp = backend.xp
    return SparseCode(xp.take(code.rows, perm), xp.take(code.cols, perm), xp.take(code.values, perm), code.shape)


def _dense(backend, code):
    return backend.numpy(code.to_dense())


def _entries(backend, code):
    return [backend.numpy(a).tolist() for a in (code.rows, code.cols, code.values)]


# --- oracles -----------------------------------------------------------------------------------
def _lowest_k_oracle(f, k):
    """Keep, per row, the L0 - k largest positive entries, ties to the lower column."""
    out = np.zeros_like(f)
    for b in range(f.shape[0]):
        cols = np.flatnonzero(f[b] > 0)
        order = cols[np.lexsort((cols, -f[b, cols]))]  # largest first, lower column first
        keep = order[: max(len(cols) - k, 0)]
        out[b, keep] = f[b, keep]
    return out


def _latent_max_oracle(ref):
    return ref.max(axis=0, initial=0.0)


def _tau_oracle(ref, q):
    """Per latent: the floor(q m)-th smallest positive reference value; -inf when that is 0."""
    tau = np.full(ref.shape[1], -np.inf)
    for j in range(ref.shape[1]):
        v = np.sort(ref[ref[:, j] > 0, j])
        n = math.floor(q * len(v) + 1e-9)
        if n >= 1:
            tau[j] = v[n - 1]
    return tau


def _apply(backend, f, ref, method, value):
    stats = reference_stats(_code(backend, ref)) if method in ("percent_of_max", "latent_quantile") else None
    return prune(_code(backend, f), method, value, stats), stats


def _param(method, r):
    """A parameter of the method from r in [0, 1]."""
    return {"lowest_k": round(4 * r), "percent_of_max": r, "latent_quantile": r,
            "global_threshold": 2.0 * r}[method]


# --- lowest-k ----------------------------------------------------------------------------------
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 7), h=st.integers(1, 10),
       k=st.integers(0, 12), ties=st.booleans())
def test_lowest_k_removes_exactly_min_k_l0_per_row_lowest_first_higher_column_on_ties(backend, seed, B, h, k, ties):
    """Row i loses exactly min(k, L0_i) entries: what remains is its L0_i - k largest under the
    project's tie rule (the lower column wins among equal values)."""
    f = _features(np.random.default_rng(seed), B, h, ties=ties)
    out = lowest_k(_code(backend, f), k)
    got = _dense(backend, out)
    np.testing.assert_array_equal(got, _lowest_k_oracle(f, k))
    l0 = np.count_nonzero(f, axis=1)
    np.testing.assert_array_equal(np.count_nonzero(got, axis=1), l0 - np.minimum(k, l0))


@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 5))
def test_lowest_k_does_not_depend_on_entry_order(backend, seed, k):
    """Shuffling a code's entries changes neither which entries go nor the order of those kept."""
    f = _features(np.random.default_rng(seed), 5, 8, ties=True)
    a = lowest_k(_code(backend, f), k)
    b = lowest_k(_code(backend, f, shuffle_seed=seed), k)
    np.testing.assert_array_equal(_dense(backend, a), _dense(backend, b))
    flat_b = backend.numpy(b.rows) * 8 + backend.numpy(b.cols)
    perm = np.random.default_rng(seed).permutation(np.count_nonzero(f))
    flat_in = np.flatnonzero(f)[perm]
    np.testing.assert_array_equal(flat_b, flat_in[np.isin(flat_in, flat_b)])  # original order kept


def test_lowest_k_ignores_explicit_zero_entries(backend):
    """Entries stored with value 0 are not active: they neither count toward k nor are removed first."""
    f = np.array([[0.0, 2.0, 1.0, 3.0]])
    code = SparseCode.from_mask(backend.asarray(f), backend.asarray(np.array([[True, True, True, True]])))
    out = lowest_k(code, 1)
    assert backend.numpy(out.values).tolist() == [0.0, 2.0, 3.0]


# --- the threshold methods against dense oracles ---------------------------------------------
@given(seed=st.integers(0, 2**31 - 1), t=st.floats(0, 3), ties=st.booleans())
def test_global_threshold_zeroes_exactly_the_entries_below_t(backend, seed, t, ties):
    """global_threshold(f, t) = f * [f >= t]."""
    f = _features(np.random.default_rng(seed), 6, 9, ties=ties)
    got = _dense(backend, global_threshold(_code(backend, f), t))
    np.testing.assert_array_equal(got, np.where(f >= t, f, 0.0))


@given(seed=st.integers(0, 2**31 - 1), p=st.floats(0, 1.2), ties=st.booleans())
def test_percent_of_max_uses_the_frozen_reference_max_of_each_latent(backend, seed, p, ties):
    """percent_of_max(f, p) = f * [f >= p M_j], M_j the max of latent j over reference data
    (other rows than f; a latent silent on the reference keeps everything)."""
    rng = np.random.default_rng(seed)
    ref, f = _features(rng, 7, 9, ties=ties), _features(rng, 5, 9, ties=ties)
    ref[:, 0] = 0.0  # a latent never seen on the reference data
    stats = reference_stats(_code(backend, ref))
    assert_close(backend.numpy(stats.latent_max), _latent_max_oracle(ref), rtol=0, atol=0)
    got = _dense(backend, percent_of_max(_code(backend, f), p, stats))
    np.testing.assert_array_equal(got, np.where(f >= p * _latent_max_oracle(ref), f, 0.0))


@given(seed=st.integers(0, 2**31 - 1), q=st.floats(0, 1), ties=st.booleans(), density=st.floats(0.1, 0.9))
def test_latent_quantile_zeroes_values_at_or_below_the_reference_quantile(backend, seed, q, ties, density):
    """latent_quantile(f, q) = f * [f > tau_j(q)], tau_j the floor(q m_j)-th smallest positive
    reference value of latent j (no threshold when floor(q m_j) = 0)."""
    rng = np.random.default_rng(seed)
    ref, f = _features(rng, 8, 7, density, ties), _features(rng, 6, 7, density, ties)
    stats = reference_stats(_code(backend, ref))
    tau = _tau_oracle(ref, q)
    np.testing.assert_array_equal(backend.numpy(quantile_thresholds(stats, q)), tau)
    got = _dense(backend, latent_quantile(_code(backend, f), q, stats))
    np.testing.assert_array_equal(got, np.where(f > tau, f, 0.0))


@given(seed=st.integers(0, 2**31 - 1), q=st.sampled_from([0.1, 0.25, 0.29, 0.5, 0.7, 0.9, 1.0]))
def test_latent_quantile_on_the_reference_removes_floor_q_m_of_each_latent(backend, seed, q):
    """On the reference data itself, with distinct values, latent j loses exactly floor(q m_j)
    activations (0.29 of 100 values is 29, although 0.29 * 100 < 29 in floating point)."""
    rng = np.random.default_rng(seed)
    ref = _features(rng, 100, 3, density=0.8)
    ref[:, 2] = rng.exponential(size=100) + 1e-3  # m = 100 exactly
    stats = reference_stats(_code(backend, ref))
    got = _dense(backend, latent_quantile(_code(backend, ref), q, stats))
    m = np.count_nonzero(ref, axis=0)
    removed = m - np.count_nonzero(got, axis=0)
    expected = [round(q * mj) if abs(q * mj - round(q * mj)) < 1e-9 else math.floor(q * mj) for mj in m]
    np.testing.assert_array_equal(removed, expected)


# --- properties every method shares ------------------------------------------------------------
@given(seed=st.integers(0, 2**31 - 1), method=st.sampled_from(METHODS), r=st.floats(0, 1), ties=st.booleans())
def test_no_method_increases_any_row_l0_or_changes_a_kept_value(backend, seed, method, r, ties):
    """Pruned code = a subset of the entries with their values: per row, L0 never increases."""
    rng = np.random.default_rng(seed)
    ref, f = _features(rng, 6, 8, ties=ties), _features(rng, 5, 8, ties=ties)
    out, _ = _apply(backend, f, ref, method, _param(method, r))
    got = _dense(backend, out)
    assert np.all((got == 0) | (got == f))
    assert np.all(np.count_nonzero(got, axis=1) <= np.count_nonzero(f, axis=1))


@given(seed=st.integers(0, 2**31 - 1), method=st.sampled_from(METHODS))
def test_parameter_zero_is_the_identity(backend, seed, method):
    """Every method with parameter 0 returns every entry of the code unchanged, in order."""
    rng = np.random.default_rng(seed)
    ref, f = _features(rng, 6, 8), _features(rng, 5, 8)
    ref[:, 1] = 0.0
    f[:, 1] = 0.7  # a latent that never fired on the reference
    out, _ = _apply(backend, f, ref, method, 0)
    assert _entries(backend, out) == _entries(backend, _code(backend, f))


@given(seed=st.integers(0, 2**31 - 1), method=st.sampled_from(["global_threshold", "percent_of_max"]),
       r=st.floats(0, 1), ties=st.booleans())
def test_global_threshold_and_percent_of_max_are_idempotent_with_frozen_stats(backend, seed, method, r, ties):
    """Applying the method twice with the same frozen statistics equals applying it once."""
    rng = np.random.default_rng(seed)
    ref, f = _features(rng, 6, 8, ties=ties), _features(rng, 5, 8, ties=ties)
    once, stats = _apply(backend, f, ref, method, _param(method, r))
    twice = prune(once, method, _param(method, r), stats)
    assert _entries(backend, twice) == _entries(backend, once)


@given(seed=st.integers(0, 2**31 - 1), method=st.sampled_from(METHODS), r1=st.floats(0, 1),
       r2=st.floats(0, 1), ties=st.booleans())
def test_a_larger_parameter_keeps_a_subset_of_the_entries(backend, seed, method, r1, r2, ties):
    """The kept set shrinks as the parameter grows (nested sweeps, so L0 is monotone)."""
    lo, hi = sorted((r1, r2))
    rng = np.random.default_rng(seed)
    ref, f = _features(rng, 6, 8, ties=ties), _features(rng, 5, 8, ties=ties)
    small = _dense(backend, _apply(backend, f, ref, method, _param(method, lo))[0])
    large = _dense(backend, _apply(backend, f, ref, method, _param(method, hi))[0])
    assert np.all((large == 0) | (small != 0))


# --- frozen statistics --------------------------------------------------------------------------
@given(seed=st.integers(0, 2**31 - 1), splits=st.integers(1, 4))
def test_reference_stats_streamed_over_batches_equal_one_pass(backend, seed, splits):
    """Statistics of a list of batches equal those of the stacked batch; the max streams
    identically without keeping the values."""
    ref = _features(np.random.default_rng(seed), 9, 6, ties=True)
    parts = [p for p in np.array_split(ref, splits) if p.shape[0]]
    whole = reference_stats(_code(backend, ref))
    streamed = reference_stats([_code(backend, p) for p in parts])
    light = reference_stats([_code(backend, p) for p in parts], keep_values=False)
    for s in (streamed, light):
        np.testing.assert_array_equal(backend.numpy(s.latent_max), _latent_max_oracle(ref))
        np.testing.assert_array_equal(backend.numpy(s.counts), np.count_nonzero(ref, axis=0))
        assert s.n_rows == 9
    expected = np.concatenate([np.sort(ref[ref[:, j] > 0, j]) for j in range(6)])
    np.testing.assert_array_equal(backend.numpy(streamed.sorted_values), expected)
    np.testing.assert_array_equal(backend.numpy(whole.sorted_values), expected)
    assert light.sorted_values is None


# --- the sweep -----------------------------------------------------------------------------------
def _sae(rng, d, h):
    W_enc = rng.standard_normal((d, h)) / math.sqrt(d)
    W_dec = rng.standard_normal((h, d))
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    return W_enc, rng.standard_normal(h) * 0.1 - 0.05, W_dec, rng.standard_normal(d) * 0.1


def _sweep_oracle(np_params, xs, standardize, method, values, ref_f):
    W_enc, b_enc, W_dec, b_dec = np_params
    X = np.concatenate(xs)
    if standardize:
        mu = X.mean(axis=1, keepdims=True)
        sd = X.std(axis=1, ddof=1, keepdims=True) + 1e-5
        Xs = (X - mu) / sd
    else:
        Xs = X
    f = np.maximum((Xs - b_dec) @ W_enc + b_enc, 0.0)
    out = []
    for v in values:
        if method == "global_threshold":
            g = np.where(f >= v, f, 0.0)
        elif method == "lowest_k":
            g = _lowest_k_oracle(f, v)
        elif method == "percent_of_max":
            g = np.where(f >= v * _latent_max_oracle(ref_f), f, 0.0)
        else:
            g = np.where(f > _tau_oracle(ref_f, v), f, 0.0)
        xh = g @ W_dec + b_dec
        if standardize:
            xh = xh * sd + mu
        sse = ((xh - X) ** 2).sum()
        out.append((np.count_nonzero(g, axis=1).mean(), sse / X.size, sse / (X**2).sum(),
                    sse / ((X - X.mean(axis=0)) ** 2).sum(), xh))
    return out


@given(seed=st.integers(0, 2**31 - 1), standardize=st.booleans(), method=st.sampled_from(METHODS))
def test_sweep_reports_l0_mse_nmse_fvu_of_the_pruned_reconstruction_in_input_space(backend, seed, standardize, method):
    """Each point's L0, MSE, NMSE and FVU over all batches equal a dense float64 oracle of
    encode -> prune -> decode -> unstandardise; the downstream callback sees the same pruned SAE."""
    rng = np.random.default_rng(seed)
    d, h = 5, 12
    np_params = _sae(rng, d, h)
    params = SAEParams(*(backend.asarray(a) for a in np_params))
    config = SAEConfig("relu", standardize=standardize)
    xs = [rng.standard_normal((n, d)) * 2 + 0.5 for n in (4, 3, 5)]
    values = [0, 1, 3] if method == "lowest_k" else [0.0, 0.1, 0.35]
    ref_x = rng.standard_normal((6, d)) * 2 + 0.5
    stats = ref_f = None
    if method in ("percent_of_max", "latent_quantile"):
        from sae_ref.sae import encode

        stats = reference_stats(encode(params, backend.asarray(ref_x), config))
        ref_s = ref_x
        if standardize:
            ref_s = (ref_x - ref_x.mean(axis=1, keepdims=True)) / (ref_x.std(axis=1, ddof=1, keepdims=True) + 1e-5)
        ref_f = np.maximum((ref_s - np_params[3]) @ np_params[0] + np_params[1], 0.0)
    probe = np.concatenate(xs)

    def downstream(pruned):
        assert isinstance(pruned, PrunedSAE) and pruned.d == d
        return float(np.sum(backend.numpy(pruned(backend.asarray(probe)))))

    pts = sweep(params, config, [backend.asarray(x) for x in xs], method, values, stats=stats,
                downstream=downstream)
    want = _sweep_oracle(np_params, xs, standardize, method, values, ref_f)
    assert [p.value for p in pts] == [float(v) for v in values]
    for p, (l0, mse, nmse, fvu, xh) in zip(pts, want, strict=True):
        assert p.method == method and p.n_rows == 12
        assert_close(p.l0, l0, rtol=0, atol=0, what="l0")
        assert_close([p.mse, p.nmse, p.fvu], [mse, nmse, fvu], rtol=1e-9, what="errors")
        assert_close(p.downstream, xh.sum(), rtol=1e-9, what="downstream")
    assert all(a.l0 >= b.l0 for a, b in itertools.pairwise(pts))


def test_pruned_sae_code_is_the_pruned_encoding(backend):
    """PrunedSAE.code(x) is prune(encode(x)) on the same backend, bit for bit, and calling it
    decodes that code; both equal the NumPy oracle within float64 rounding (a GPU's product
    rounds differently from the host's) with the oracle's kept places."""
    from sae_ref.sae import decode, encode

    rng = np.random.default_rng(3)
    np_params = _sae(rng, 4, 10)
    params = SAEParams(*(backend.asarray(a) for a in np_params))
    x = rng.standard_normal((6, 4))
    config = SAEConfig("relu")
    pruned = PrunedSAE(params, config, "lowest_k", 2)
    xb = backend.asarray(x)
    code = pruned.code(xb)
    want = lowest_k(encode(params, xb, config), 2)
    for name in ("rows", "cols", "values"):
        np.testing.assert_array_equal(backend.numpy(getattr(code, name)), backend.numpy(getattr(want, name)))
    np.testing.assert_array_equal(backend.numpy(pruned(xb)), backend.numpy(decode(params, want)))
    f = np.maximum((x - np_params[3]) @ np_params[0] + np_params[1], 0.0)
    oracle = _lowest_k_oracle(f, 2)
    dense = _dense(backend, code)
    np.testing.assert_array_equal(dense != 0, oracle != 0)
    assert_close(dense, oracle)
    assert_close(backend.numpy(pruned(xb)), oracle @ np_params[2] + np_params[3])


# --- errors ----------------------------------------------------------------------------------------
def test_bad_arguments_raise_errors_naming_them(backend):
    """Negative activations, a dense array for a code, parameters outside their range or not finite,
    an unknown method, missing, foreign or mismatched statistics, statistics without values for
    quantiles, no reference codes, mixed widths, no values and no rows each raise an error that
    names the argument."""
    f = np.array([[1.0, 0.0, 2.0], [0.5, 0.3, 0.0]])
    code = _code(backend, f)
    stats = reference_stats(code)
    neg = SparseCode.from_mask(backend.asarray(-f), backend.asarray(f > 0))
    with pytest.raises(ValueError, match="'code' has negative values"):
        lowest_k(neg, 1)
    with pytest.raises(TypeError, match="'code' must be a SparseCode"):
        global_threshold(backend.asarray(f), 0.1)
    with pytest.raises(ValueError, match="'k' must be in"):
        lowest_k(code, -1)
    with pytest.raises(TypeError, match="'k' must be an integer"):
        lowest_k(code, 1.5)
    with pytest.raises(ValueError, match="'p' must be in"):
        percent_of_max(code, -0.1, stats)
    with pytest.raises(ValueError, match="'q' must be in"):
        latent_quantile(code, 1.5, stats)
    with pytest.raises(ValueError, match="'t' must be in"):
        global_threshold(code, -1.0)
    with pytest.raises(ValueError, match="'t' must be finite"):
        global_threshold(code, float("nan"))
    with pytest.raises(ValueError, match="'method' must be one of"):
        prune(code, "median", 0.1)
    with pytest.raises(ValueError, match="needs argument 'stats'"):
        prune(code, "percent_of_max", 0.1)
    with pytest.raises(TypeError, match="'stats' must be PruningStats"):
        percent_of_max(code, 0.1, {"max": 1})
    wide = _code(backend, np.ones((1, 5)))
    with pytest.raises(ValueError, match="'stats' is for h = 3"):
        percent_of_max(wide, 0.1, stats)
    with pytest.raises(ValueError, match="keep_values=False"):
        latent_quantile(code, 0.1, reference_stats(code, keep_values=False))
    with pytest.raises(ValueError, match="'codes' holds no code"):
        reference_stats([])
    with pytest.raises(ValueError, match="mixes h = 3 and h = 5"):
        reference_stats([code, wide])
    params = SAEParams(*(backend.asarray(a) for a in _sae(np.random.default_rng(0), 2, 3)))
    with pytest.raises(ValueError, match="'values' must be a non-empty sequence"):
        sweep(params, SAEConfig("relu"), [backend.asarray(np.ones((2, 2)))], "global_threshold", [])
    with pytest.raises(ValueError, match="'batches' holds no rows"):
        sweep(params, SAEConfig("relu"), [], "global_threshold", [0.0])
    with pytest.raises(ValueError, match="needs argument 'stats'"):
        sweep(params, SAEConfig("relu"), [], "latent_quantile", [0.1])
