"""Evaluation metrics and the FVU definitions, on every backend.

Invariants: every metric equals a float64 NumPy oracle written here from the definitions;
streaming over batches, merging shards and reading a sharded store in order all equal the
one-shot computation (for the definitions that do not depend on batching); a constant bias
error separates the FVU definitions exactly as the closed forms of ``sae_ref.fvu`` say;
zero variances give nan, never inf; dead and dense latents follow their stated thresholds;
with input standardisation the metrics live in the input's own space.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from sae_ref import fvu as F
from sae_ref import metrics as M
from sae_ref.data.store import write_store
from sae_ref.sae import SAEConfig, SAEParams, init_params
from sae_ref.sparse import SparseCode
from sae_ref.validation.oracles import assert_close

SCALARS = ("mse_per_element", "mse_per_sample", "nmse", "cosine_similarity", "l2_ratio",
           "relative_reconstruction_bias", "l0_mean") + tuple("fvu_" + k for k in F.DEFINITIONS)
ARRAYS = ("l0_histogram", "latent_counts", "firing_frequency", "log10_density_histogram")


# --- data and the oracle -------------------------------------------------------------------------
def _split(n: int, cuts: list[int]) -> list[int]:
    """Batch sizes (each >= 1) summing to n, from arbitrary integers."""
    points = sorted({1 + c % (n - 1) for c in cuts}) if n > 1 else []
    edges = [0, *points, n]
    return [b - a for a, b in itertools.pairwise(edges)]


def _draw(seed, n, d, h, dtype, offset, density):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, size=d) + offset * rng.standard_normal(d)
    x_hat = 0.8 * x + 0.3 * rng.standard_normal((n, d)) + 0.1
    f = np.abs(rng.standard_normal((n, h))) * (rng.random((n, h)) < density)
    return x.astype(dtype), x_hat.astype(dtype), f.astype(dtype)


def _code(backend, f):
    return SparseCode.from_mask(backend.asarray(f), backend.asarray(f != 0))


def _safe(num, den):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _oracle(x, x_hat, f, sizes, ref=None) -> dict:
    """Every metric from its definition, float64 NumPy, two-pass means, batches by slicing."""
    X, Xh, Fd = (np.asarray(a, dtype=np.float64) for a in (x, x_hat, f))
    N = X.shape[0]
    h = Fd.shape[1]
    R = X - Xh
    rr, xx = (R**2).sum(1), (X**2).sum(1)
    tot = ((X - X.mean(0)) ** 2).sum()
    starts = np.cumsum([0, *sizes])
    batch_dev = np.concatenate([((X[a:b] - X[a:b].mean(0)) ** 2).sum(1)
                                for a, b in itertools.pairwise(starts)])
    nx, nh = np.linalg.norm(X, axis=1), np.linalg.norm(Xh, axis=1)
    fired = Fd != 0
    counts = fired.sum(0)
    freq = counts / N
    l0 = fired.sum(1)
    edges = 10.0 ** np.arange(-10.0, 0.125, 0.25)
    out = {
        "mse_per_element": (R**2).mean(), "mse_per_sample": rr.mean(), "nmse": rr.sum() / xx.sum(),
        "fvu_pooled": rr.sum() / tot, "fvu_about_zero": rr.sum() / xx.sum(),
        "fvu_residual_centred": ((R - R.mean(0)) ** 2).sum() / tot,
        "fvu_batch_mean": float(_safe(rr.sum(), batch_dev.sum())),  # zero total: nan
        "fvu_per_token": None if ref is None else _safe(rr, ((X - ref) ** 2).sum(1)).mean(),
        "fvu_per_token_batch_mean": _safe(rr, batch_dev).mean(),
        "fvu_per_token_about_zero": _safe(rr, xx).mean(),
        "cosine_similarity": _safe((X * Xh).sum(1), nx * nh).mean(),
        "l2_ratio": _safe(nh, nx).mean(),
        "relative_reconstruction_bias": (nh**2).mean() / (X * Xh).sum(1).mean(),
        "l0_mean": l0.mean(), "l0_histogram": np.bincount(l0, minlength=h + 1),
        "latent_counts": counts, "firing_frequency": freq,
        "n_dead": int((counts == 0).sum()), "n_dense_1pct": int((freq > 0.01).sum()),
        "n_dense_10pct": int((freq > 0.1).sum()),
        "log10_density_histogram": np.histogram(np.clip(freq[counts > 0], 1e-10, 1.0), bins=edges)[0],
    }
    return out


def _stream(backend, x, x_hat, f, sizes, ref=None):
    d = x.shape[1]
    mean = None if ref is None else backend.asarray(ref)
    s = M.init(d, f.shape[1], xp=backend.xp, device=backend.device, mean=mean)
    a = 0
    for b in sizes:
        s = M.update(s, backend.asarray(x[a:a + b]), backend.asarray(x_hat[a:a + b]),
                     _code(backend, f[a:a + b]))
        a += b
    return s


def _assert_matches(m: M.Metrics, want: dict, rtol: float, names=None):
    for k in names or want:
        got, exp = getattr(m, k), want[k]
        if exp is None:
            assert got is None, k
        else:
            assert_close(got, exp, rtol=rtol, atol=1e-12, what=k)


sizes_and_data = {
    "seed": st.integers(0, 2**31 - 1), "n": st.integers(2, 40), "d": st.integers(2, 6),
    "h": st.integers(1, 12), "cuts": st.lists(st.integers(0, 1000), max_size=4),
    "dtype": st.sampled_from([np.float32, np.float64]), "offset": st.sampled_from([0.0, 3.0]),
    "density": st.sampled_from([0.0, 0.2, 0.7]),
}


# --- every metric against the oracle ------------------------------------------------------------
@given(**sizes_and_data)
def test_every_metric_equals_the_float64_numpy_oracle(backend, seed, n, d, h, cuts, dtype, offset, density):
    """Streamed over an arbitrary cut into batches, each metric equals its definition."""
    x, x_hat, f = _draw(seed, n, d, h, dtype, offset, density)
    sizes = _split(n, cuts)
    ref = np.asarray(x, dtype=np.float64).mean(0)
    m = M.result(_stream(backend, x, x_hat, f, sizes, ref))
    want = _oracle(x, x_hat, f, sizes, ref)
    _assert_matches(m, want, rtol=1e-9)
    assert m.n_tokens == m.dead_window_tokens == n and (m.d, m.h) == (d, h)
    assert int(m.l0_histogram.sum()) == n
    assert m.n_dead + int(m.log10_density_histogram.sum()) == h


@given(**sizes_and_data)
def test_streaming_and_merging_shards_equal_the_one_shot_computation(backend, seed, n, d, h, cuts,
                                                                    dtype, offset, density):
    """Batches in order, shards merged in reverse and one batch give the same metrics."""
    x, x_hat, f = _draw(seed, n, d, h, dtype, offset, density)
    sizes = _split(n, cuts)
    ref = np.asarray(x, dtype=np.float64).mean(0)
    one = M.result(_stream(backend, x, x_hat, f, [n], ref))
    streamed = M.result(_stream(backend, x, x_hat, f, sizes, ref))
    parts, a = [], 0
    for b in sizes:
        parts.append(_stream(backend, x[a:a + b], x_hat[a:a + b], f[a:a + b], [b], ref))
        a += b
    merged = parts[-1]
    for p in reversed(parts[:-1]):
        merged = M.merge(merged, p)
    merged = M.result(merged)
    independent = [k for k in SCALARS if "batch_mean" not in k] + list(ARRAYS)
    want = {k: getattr(one, k) for k in independent}
    _assert_matches(streamed, want, rtol=1e-11)
    _assert_matches(merged, want, rtol=1e-11)
    # one batch of everything: the batch means are the dataset mean
    assert_close(one.fvu_batch_mean, one.fvu_pooled, rtol=1e-12)
    assert_close(one.fvu_per_token_batch_mean, one.fvu_per_token, rtol=1e-12)


@pytest.mark.parametrize("shard_rows,batch_size,rows", [(7, 5, None), (4, 64, (3, 29)), (30, 1, (0, 9))])
def test_reading_a_sharded_store_in_order_equals_one_shot_evaluation(backend, tmp_path, shard_rows,
                                                                     batch_size, rows):
    """evaluate_store over shards and short batches = evaluate on all rows at once (ReLU SAE)."""
    rng = np.random.default_rng(shard_rows)
    x = (rng.standard_normal((30, 6)) + 2.0).astype(np.float64)
    store = write_store(tmp_path / "s", x, shard_rows=shard_rows, dtype="float64")
    params = init_params(6, 16, xp=backend.xp, dtype=backend.dtype("float64"), device=backend.device, seed=1)
    config = SAEConfig("relu")
    a, b = rows or (0, 30)
    got = M.evaluate_store(params, config, store, batch_size=batch_size, rows=rows)
    sub = x[a:b]
    want = M.evaluate(params, config, [backend.asarray(sub)], mean=backend.asarray(sub.mean(0)))
    assert got.n_tokens == b - a
    names = [k for k in SCALARS if "batch_mean" not in k] + list(ARRAYS)
    _assert_matches(got, {k: getattr(want, k) for k in names}, rtol=1e-9)


# --- the FVU definitions on a constant bias error --------------------------------------------------
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(4, 30), d=st.integers(1, 5),
       cuts=st.lists(st.integers(0, 1000), min_size=1, max_size=4), mu=st.floats(0.5, 20.0))
def test_a_constant_bias_error_separates_the_fvu_definitions_as_documented(backend, seed, n, d, cuts, mu):
    """x_hat = x + c: each definition equals its closed form of the sae_ref.fvu docstring."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) + mu * rng.standard_normal(d)
    x[: n // 2] += rng.standard_normal(d)  # batches with different means
    c = rng.standard_normal(d)
    sizes = _split(n, cuts)  # a batch of one token is allowed: its per-token value is nan
    ref = x.mean(0)
    s = F.init(d, xp=backend.xp, device=backend.device, mean=backend.asarray(ref))
    a = 0
    for b in sizes:
        s = F.update(s, backend.asarray(x[a:a + b]), backend.asarray(x[a:a + b] + c))
        a += b
    got = {k: float(v) for k, v in F.values(s).items()}
    c2, var = float(c @ c), float(((x - ref) ** 2).sum(1).mean())
    starts = np.cumsum([0, *sizes])
    blocks = [x[p:q] for p, q in itertools.pairwise(starts)]
    n_var_j = sum(float(((blk - blk.mean(0)) ** 2).sum()) for blk in blocks)
    dev_j = np.concatenate([((blk - blk.mean(0)) ** 2).sum(1) for blk in blocks])
    closed = {
        "pooled": c2 / var,
        "about_zero": c2 / (var + float(ref @ ref)),
        "batch_mean": float(_safe(n * c2, n_var_j)),  # nan when every batch is one token
        "per_token": float(np.mean(c2 / ((x - ref) ** 2).sum(1))),
        "per_token_batch_mean": float(np.mean(_safe(np.full(n, c2), dev_j))),
        "per_token_about_zero": float(np.mean(c2 / (x**2).sum(1))),
    }
    for k, v in closed.items():
        assert_close(got[k], v, rtol=1e-9, what=k)
    assert abs(got["residual_centred"]) < 1e-20       # a bias leaves no centred residual
    assert got["about_zero"] < got["pooled"]          # a mean away from zero inflates EV
    assert not got["batch_mean"] < got["pooled"] * (1 - 1e-12)  # >= (or nan)
    assert got["per_token"] >= got["pooled"] * (1 - 1e-12)  # Jensen: mean of 1/a >= 1/mean a


def test_batch_dependent_definitions_follow_the_batch_cut(backend):
    """Batches of one token make batch_mean nan; batches sorted by value make it exceed pooled."""
    x = np.arange(12.0).reshape(6, 2) ** 1.5
    x_hat = x + 0.5

    def run(sizes):
        s, a = F.init(2, xp=backend.xp, device=backend.device), 0
        for b in sizes:
            s = F.update(s, backend.asarray(x[a:a + b]), backend.asarray(x_hat[a:a + b]))
            a += b
        return {k: float(v) for k, v in F.values(s).items()}

    ones, sorted3, whole = run([1] * 6), run([3, 3]), run([6])
    assert math.isnan(ones["batch_mean"]) and math.isnan(ones["per_token_batch_mean"])
    assert sorted3["batch_mean"] > 2 * whole["batch_mean"]
    for k in ("pooled", "about_zero", "residual_centred", "per_token_about_zero"):
        assert_close(ones[k], whole[k], rtol=1e-12, what=k)
        assert_close(sorted3[k], whole[k], rtol=1e-12, what=k)
    assert_close(whole["batch_mean"], whole["pooled"], rtol=1e-12)


def test_one_shot_fvu_and_explained_variance_agree_with_the_oracle(backend):
    """fvu()/explained_variance() on one array: the oracle's values, EV = 1 - FVU."""
    x, x_hat, f = _draw(3, 9, 4, 2, np.float64, 3.0, 0.5)
    want = _oracle(x, x_hat, f, [9], x.mean(0))
    for k in F.DEFINITIONS:
        got = float(F.fvu(backend.asarray(x), backend.asarray(x_hat), k))
        assert_close(got, want["fvu_" + k], rtol=1e-10, what=k)
        ev = float(F.explained_variance(backend.asarray(x), backend.asarray(x_hat), k))
        assert_close(ev, 1.0 - want["fvu_" + k], rtol=1e-10, what=k)


# --- edge cases ----------------------------------------------------------------------------------
def _no_inf(m: M.Metrics):
    for k, v in m.summary().items():
        if isinstance(v, float):
            assert not math.isinf(v), k


def test_zero_variances_give_nan_never_inf(backend):
    """Constant tokens: centred FVUs nan; zero tokens: every ratio about zero nan."""
    h = 3
    f = np.zeros((4, h))
    f[0, 1] = 1.0
    const = np.full((4, 3), 0.1)
    noisy = const + np.random.default_rng(0).standard_normal((4, 3))
    m = M.result(_stream(backend, const, noisy, f, [3, 1], const[0]))
    for k in ("fvu_pooled", "fvu_residual_centred", "fvu_batch_mean", "fvu_per_token",
              "fvu_per_token_batch_mean"):
        assert math.isnan(getattr(m, k)), k
    assert math.isfinite(m.fvu_about_zero) and math.isfinite(m.cosine_similarity)
    _no_inf(m)
    zero = np.zeros((4, 3))
    m = M.result(_stream(backend, zero, zero, f, [2, 2]))
    for k in ("nmse", "fvu_about_zero", "fvu_per_token_about_zero", "cosine_similarity", "l2_ratio",
              "relative_reconstruction_bias", "fvu_pooled"):
        assert math.isnan(getattr(m, k)), k
    assert m.mse_per_sample == 0.0
    _no_inf(m)
    # one zero token among others: per-token means nan, pooled ones finite
    x = np.vstack([np.zeros((1, 3)), noisy[1:]])
    m = M.result(_stream(backend, x, x + 0.1, f, [4]))
    assert math.isnan(m.fvu_per_token_about_zero) and math.isnan(m.l2_ratio)
    assert math.isfinite(m.fvu_pooled) and math.isfinite(m.nmse)


def test_an_all_zero_reference_gives_nan_without_a_warning_in_nmse_and_fvu(backend):
    """nmse(x_hat, x) and fvu(x, x_hat) with x all zero: nan (the documented undefined ratio),
    never inf and never only a RuntimeWarning; with reduce="per_row" a zero row makes the mean
    nan and only that row's gradient."""
    import warnings

    from sae_ref.arrays import to_numpy
    from sae_ref.losses import nmse

    zero = backend.asarray(np.zeros((4, 3)), dtype="float64")
    ones = backend.asarray(np.ones((4, 3)), dtype="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x_hat in (ones, zero):
            for reduce in ("pooled", "per_row"):
                value, grad = nmse(x_hat, zero, reduce=reduce)
                assert math.isnan(float(to_numpy(value))), (reduce, x_hat)
                assert np.isnan(to_numpy(grad)).all()
            for definition in F.DEFINITIONS:
                assert math.isnan(float(to_numpy(F.fvu(zero, x_hat, definition)))), definition
        x = np.ones((3, 2))
        x[1] = 0.0
        value, grad = nmse(backend.asarray(x + 0.5, dtype="float64"), backend.asarray(x, dtype="float64"),
                           reduce="per_row")
        g = to_numpy(grad)
        assert math.isnan(float(to_numpy(value))) and np.isnan(g[1]).all() and np.isfinite(g[[0, 2]]).all()
        value, _ = nmse(backend.asarray(x + 0.5, dtype="float64"), backend.asarray(x, dtype="float64"))
        assert float(to_numpy(value)) == pytest.approx(6 * 0.25 / 4)  # pooled: defined


def test_dead_and_dense_latents_use_strict_thresholds_over_the_token_window(backend):
    """100 tokens: latents firing on 0, 1, 2, 10, 11 tokens -> 1 dead, 3 above 1%, 1 above 10%."""
    n, fires = 100, [0, 1, 2, 10, 11]
    f = np.zeros((n, len(fires)))
    for j, k in enumerate(fires):
        f[np.random.default_rng(j).choice(n, size=k, replace=False), j] = 1.0 + j
    x = np.random.default_rng(9).standard_normal((n, 3))
    m = M.result(_stream(backend, x, x, f, [40, 35, 25]))
    assert m.dead_window_tokens == n
    assert m.latent_counts.tolist() == fires
    assert (m.n_dead, m.n_dense_1pct, m.n_dense_10pct) == (1, 3, 1)
    # bins [10^e_i, 10^e_(i+1)), e_i = -10 + i/4: 0.01 opens bin 32, 0.1 opens bin 36
    hist = m.log10_density_histogram
    assert (hist[32], hist[33], hist[36], hist.sum()) == (1, 1, 2, 4)
    assert_close(m.fvu_pooled, 0.0)


def test_with_standardisation_the_metrics_compare_in_the_input_space(backend):
    """FVU of x against the output mapped back (oracle: the SAE written in NumPy)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((12, 5)) * 3.0 + 7.0
    p = init_params(5, 10, xp=np, dtype=np.float64, seed=2)
    config = SAEConfig("relu", standardize=True)
    mean = x.mean(1, keepdims=True)
    scale = x.std(1, ddof=1, keepdims=True) + 1e-5
    xs = (x - mean) / scale
    fz = np.maximum((xs - p.b_dec) @ p.W_enc + p.b_enc, 0.0)
    xs_hat = fz @ p.W_dec + p.b_dec
    x_hat = xs_hat * scale + mean
    params = SAEParams(*(backend.asarray(a) for a in (p.W_enc, p.b_enc, p.W_dec, p.b_dec)))
    m = M.evaluate(params, config, [backend.asarray(x[:5]), backend.asarray(x[5:])])
    want = _oracle(x, x_hat, fz, [5, 7])
    _assert_matches(m, want, rtol=1e-9, names=("fvu_pooled", "cosine_similarity", "l0_mean",
                                              "relative_reconstruction_bias", "latent_counts"))
    in_std_space = ((xs - xs_hat) ** 2).sum() / ((xs - xs.mean(0)) ** 2).sum()
    assert abs(m.fvu_pooled - in_std_space) > 1e-3 * in_std_space


def test_summary_is_json_ready_and_names_every_explained_variance(backend):
    x, x_hat, f = _draw(1, 8, 3, 4, np.float32, 1.0, 0.5)
    m = M.result(_stream(backend, x, x_hat, f, [8]))
    s = m.summary()
    json.dumps(s)
    for k in F.DEFINITIONS:
        ev = s["explained_variance_" + k]
        assert ev is None if k == "per_token" else ev == 1.0 - s["fvu_" + k]
    assert m.explained_variance("about_zero") == 1.0 - m.nmse


# --- errors --------------------------------------------------------------------------------------
def test_bad_arguments_raise_errors_naming_them(backend):
    xp, dev = backend.xp, backend.device
    s = M.init(3, 4, xp=xp, device=dev)
    x = backend.asarray(np.ones((2, 3)))
    code = _code(backend, np.eye(2, 4))
    with pytest.raises(ValueError, match="'x'"):
        M.update(s, backend.asarray(np.ones((2, 4))), backend.asarray(np.ones((2, 4))), code)
    with pytest.raises(ValueError, match="'x_hat'"):
        M.update(s, x, backend.asarray(np.ones((3, 3))), code)
    with pytest.raises(TypeError, match="'x'"):
        M.update(s, backend.asarray(np.ones((2, 3), dtype=np.int64)), x, code)
    with pytest.raises(ValueError, match="'code'"):
        M.update(s, x, x, _code(backend, np.eye(3, 4)))
    with pytest.raises(TypeError, match="'code'"):
        M.update(s, x, x, np.eye(2, 4))
    with pytest.raises(ValueError, match="'x'.*NaN"):
        M.update(s, backend.asarray(np.full((2, 3), np.nan)), x, code)
    with pytest.raises(ValueError, match="no tokens"):
        M.result(s)
    with pytest.raises(ValueError, match="'mean'"):
        M.init(3, 4, xp=xp, device=dev, mean=backend.asarray(np.ones(2)))
    with pytest.raises(ValueError, match="'h'"):
        M.init(3, 0, xp=xp, device=dev)
    with pytest.raises(ValueError, match="'definition'"):
        F.fvu(x, x, "mean_of_ratios")
    with pytest.raises(ValueError, match="h = 4 and h = 5"):
        M.merge(s, M.init(3, 5, xp=xp, device=dev))
    with pytest.raises(ValueError, match="reference mean"):
        F.merge(s.var, F.init(3, xp=xp, device=dev, mean=backend.asarray(np.ones(3))))
    if not backend.name.startswith("numpy"):
        with pytest.raises(TypeError, match="one array library"):
            M.update(s, np.ones((2, 3)), x, code)


def test_store_and_evaluate_arguments_are_checked(tmp_path):
    store = write_store(tmp_path / "s", np.ones((5, 2), dtype=np.float32), shard_rows=2)
    with pytest.raises(ValueError, match="'batch_size'"):
        M.store_batches(store, 0)
    with pytest.raises(ValueError, match="'rows\\[1\\]'"):
        M.store_batches(store, 2, rows=(1, 9))
    with pytest.raises(ValueError, match="no rows"):
        M.store_batches(store, 2, rows=(2, 2))
    with pytest.raises(TypeError, match="'store'"):
        M.store_batches(np.ones((5, 2)), 2)
    params = init_params(2, 4, xp=np)
    with pytest.raises(ValueError, match="'batches'"):
        M.evaluate(params, SAEConfig("relu"), [])
    with pytest.raises(TypeError, match="'params'"):
        M.evaluate(params.arrays(), SAEConfig("relu"), [np.ones((2, 2), dtype=np.float32)])


def test_a_nan_row_in_the_store_is_reported_with_its_shard(tmp_path):
    x = np.ones((6, 2), dtype=np.float32)
    x[4, 1] = np.nan
    store = write_store(tmp_path / "s", x, shard_rows=3)
    with pytest.raises(ValueError, match="store row 4 .*row 1 of shard"):
        list(M.store_batches(store, 4))


def test_store_batches_can_skip_a_batch_with_nan_and_stop_at_the_end(tmp_path):
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    x[9, 1] = np.nan  # in the last batch
    x[0, 0] = np.inf  # in the first
    store = write_store(tmp_path / "s", x, shard_rows=3)
    got = [b[:, 0].tolist() for b in M.store_batches(store, 4, nonfinite="skip")]
    assert got == [[8.0, 10.0, 12.0, 14.0]]


# --- the plot ------------------------------------------------------------------------------------
def test_log_density_plot_draws_the_histogram_and_saves_atomically(tmp_path):
    pytest.importorskip("matplotlib")
    x = _draw(5, 50, 3, 20, np.float64, 0.0, 0.1)[0]
    m = M.evaluate(init_params(3, 20, xp=np, dtype=np.float64), SAEConfig("topk", k=2), [x])
    path = tmp_path / "density.png"
    fig = M.plot_log_density(m, path=path)
    drawn = fig.axes[0].patches[0].get_data()
    heights, edges = drawn.values, drawn.edges
    assert heights.tolist() == m.log10_density_histogram.tolist()
    assert_close(edges, m.log10_density_edges)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["density.png"]
    with pytest.raises(ValueError, match="'path'"):
        M.plot_log_density(m, path=tmp_path / "density.gif")
    with pytest.raises(FileNotFoundError):
        M.plot_log_density(m, path=tmp_path / "missing" / "d.png")
