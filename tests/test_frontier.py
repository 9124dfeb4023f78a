"""Frontier fits (linear, Hill, free Hill, power law) on every backend, and their figures.

Oracles are float64 NumPy written in the test: the model formulas, central finite differences
for the Jacobian, and s^2 (J^T J)^-1 for the uncertainties.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, strategies as st

from sae_ref.frontier import (MODELS, PARAMS, FrontierWarning, compare, fit_frontier, hit_plane)
from sae_ref.validation.oracles import assert_close

CURVES = {
    "linear": lambda x, p: x / p["x_half"],
    "hill1": lambda x, p: x / (x + p["x_half"]),
    "hill": lambda x, p: x ** p["n"] / (x ** p["n"] + p["x_half"] ** p["n"]),
    "power": lambda x, p: p["a"] * x ** p["n"],
}


def _truth(model, rng):
    """Known parameters and x values whose y lie inside (0, 1)."""
    xh = float(np.exp(rng.uniform(np.log(1e-3), np.log(0.3))))
    if model in ("linear", "hill1"):
        p = {"x_half": xh}
    elif model == "hill":
        p = {"x_half": xh, "n": float(rng.uniform(0.4, 3.0))}
    else:
        n = float(rng.uniform(0.4, 2.5))
        p = {"a": 0.5 * xh ** (-n), "n": n}  # so that y(xh) = 1/2
    # the unbounded models reach y = 1 at x_half (linear) and 2^(1/n) x_half (power)
    hi = {"linear": 0.95, "power": 0.95 * 2 ** (1 / p.get("n", 1.0))}.get(model, 20.0)
    n = int(rng.integers(4, 12))  # spread over the range: both sides of x_half for the Hill curves
    grid = np.linspace(np.log(0.05), np.log(hi), n) + rng.uniform(-0.1, 0.1, size=n)
    x = xh * np.exp(np.minimum(grid, np.log(hi)))
    return p, x


def _noisy(model, rng, scale=0.05):
    p, x = _truth(model, rng)
    y = CURVES[model](x, p) * (1 + scale * rng.standard_normal(x.size))
    return p, x, np.clip(y, 1e-3, 1 - 1e-3)


def _rel(a, b):
    return abs(a - b) / abs(b)


def _same_fit(a, b):
    """Equal parameters: to 1e-9 relative, or to a millionth of their standard error where the
    minimum is so flat that rounding moves the optimum more (ill-conditioned power laws)."""
    for k in a.params:
        se = a.stderr[k] if math.isfinite(a.stderr[k]) else 0.0
        assert abs(a.params[k] - b.params[k]) <= 1e-9 * abs(b.params[k]) + 1e-6 * se, (k, a.params[k], b.params[k])
    assert _rel(a.rss, b.rss) <= 1e-9


# --- recovery -------------------------------------------------------------------------------------
@given(seed=st.integers(0, 2**31 - 1), model=st.sampled_from(MODELS))
def test_noiseless_points_give_back_their_parameters_to_1e_6(backend, seed, model):
    """Points on a curve with known parameters are fitted back to 1e-6 relative, from the
    default start and from a start far away (Levenberg-Marquardt has to walk there)."""
    rng = np.random.default_rng(seed)
    p, x = _truth(model, rng)
    y = CURVES[model](x, p)
    far = {k: v * (4.0 if k != "n" else 0.5) for k, v in p.items()}
    for start in (None, far):
        fit = fit_frontier(backend.asarray(x), backend.asarray(y), model, start=start)
        assert fit.converged and fit.n_used == x.size and fit.n_dropped == 0
        for k in PARAMS[model]:
            assert _rel(fit.params[k], p[k]) <= 1e-6, (k, fit.params[k], p[k])
        xh = p["x_half"] if "x_half" in p else (2 * p["a"]) ** (-1 / p["n"])
        assert _rel(fit.x_half, xh) <= 1e-6


@given(seed=st.integers(0, 2**31 - 1), model=st.sampled_from(MODELS))
def test_fit_is_invariant_to_the_order_of_the_points(backend, seed, model):
    """Permuting the points leaves the fit unchanged (up to rounding)."""
    rng = np.random.default_rng(seed)
    _, x, y = _noisy(model, rng)
    perm = rng.permutation(x.size)
    a = fit_frontier(backend.asarray(x), backend.asarray(y), model)
    b = fit_frontier(backend.asarray(x[perm]), backend.asarray(y[perm]), model)
    _same_fit(a, b)


@given(seed=st.integers(0, 2**31 - 1), model=st.sampled_from(MODELS))
def test_fitted_curves_are_one_half_at_x_half_and_the_line_is_its_hill_tangent(backend, seed, model):
    """y(x_half) = 1/2 for the Hill curves and the power law (x_half = (2a)^(-1/n)), on the
    backend's own arrays and on plain numbers; the line y = x / x_half reaches 1 there."""
    rng = np.random.default_rng(seed)
    _, x, y = _noisy(model, rng)
    fit = fit_frontier(backend.asarray(x), backend.asarray(y), model)
    want = 1.0 if model == "linear" else 0.5
    assert abs(fit.predict(fit.x_half) - want) <= 1e-12
    at = fit.predict(backend.asarray(np.array([fit.x_half])))
    assert abs(float(backend.numpy(at)[0]) - want) <= 1e-12
    grid = np.linspace(0.5, 2.0, 5) * fit.x_half
    assert_close(backend.numpy(fit.predict(backend.asarray(grid))), CURVES[model](grid, fit.params), rtol=1e-12)


def test_fits_agree_across_backends(all_backends):
    """The same noisy points give the same fit and uncertainties on numpy, torch and strict."""
    rng = np.random.default_rng(11)
    for model in MODELS:
        _, x, y = _noisy(model, rng)
        fits = [fit_frontier(b.asarray(x), b.asarray(y), model) for b in all_backends]
        for f in fits[1:]:
            _same_fit(f, fits[0])
            for k in PARAMS[model]:
                assert _rel(f.stderr[k], fits[0].stderr[k]) <= 1e-6
            assert _rel(f.x_half_stderr, fits[0].x_half_stderr) <= 1e-6


# --- least squares and uncertainties against a NumPy oracle ----------------------------------------
def _jacobian_fd(model, x, p):
    """Central finite differences of the curve in the natural parameters, [n, p]."""
    cols = []
    for k in PARAMS[model]:
        h = 1e-6 * abs(p[k])
        up, dn = dict(p), dict(p)
        up[k] += h
        dn[k] -= h
        cols.append((CURVES[model](x, up) - CURVES[model](x, dn)) / (2 * h))
    return np.stack(cols, axis=1)


@given(seed=st.integers(0, 2**31 - 1), model=st.sampled_from(MODELS))
def test_noisy_fit_is_a_least_squares_minimum_with_covariance_s2_inv_jtj(backend, seed, model):
    """At the fit, J^T r = 0 and no nearby parameters lower the RSS; the covariance is
    s^2 (J^T J)^-1 with s^2 = RSS / (n - p), J the Jacobian in the natural parameters."""
    rng = np.random.default_rng(seed)
    _, x, y = _noisy(model, rng)
    fit = fit_frontier(backend.asarray(x), backend.asarray(y), model)
    p = fit.params
    r = y - CURVES[model](x, p)
    rss = float(r @ r)
    assert_close(fit.rss, rss, rtol=1e-8, atol=1e-14)
    J = _jacobian_fd(model, x, p)
    grad = J.T @ r
    assert np.all(np.abs(grad) <= 1e-6 * np.linalg.norm(J, axis=0) * max(math.sqrt(rss), 1e-12) + 1e-12)
    for k in PARAMS[model]:
        for s in (1 + 1e-4, 1 - 1e-4):
            q = dict(p)
            q[k] *= s
            rq = y - CURVES[model](x, q)
            assert float(rq @ rq) >= rss * (1 - 1e-12)
    n_p = len(PARAMS[model])
    cov = rss / (x.size - n_p) * np.linalg.inv(J.T @ J) if x.size > n_p else np.full((n_p, n_p), np.nan)
    assert_close(np.array(fit.cov), cov, rtol=1e-4, atol=0)
    if model == "power":  # delta method on x_half = (2a)^(-1/n), gradient by finite differences
        g = np.array([(_power_xh(p["a"] * (1 + e), p["n"]) - _power_xh(p["a"] * (1 - e), p["n"])) / (2 * e * p["a"])
                      for e in (1e-6,)] + [(_power_xh(p["a"], p["n"] * (1 + 1e-6)) - _power_xh(p["a"], p["n"] * (1 - 1e-6)))
                                           / (2e-6 * p["n"])])
        se = math.sqrt(g @ cov @ g) if x.size > n_p else math.nan
        assert_close(fit.x_half_stderr, se, rtol=1e-4, atol=0)
    else:
        assert_close(fit.x_half_stderr, math.sqrt(cov[0, 0]) if x.size > n_p else math.nan, rtol=1e-4, atol=0)


def _power_xh(a, n):
    return (2 * a) ** (-1 / n)


def test_uncertainties_are_nan_when_there_are_as_many_points_as_parameters(backend):
    """Two points fix a two-parameter curve exactly: RSS 0, s^2 undefined, stderr NaN."""
    x = np.array([0.01, 0.05])
    y = x**1.3 / (x**1.3 + 0.03**1.3)
    fit = fit_frontier(backend.asarray(x), backend.asarray(y), "hill")
    assert _rel(fit.params["n"], 1.3) <= 1e-6 and _rel(fit.x_half, 0.03) <= 1e-6
    assert math.isnan(fit.stderr["n"]) and math.isnan(fit.x_half_stderr)


# --- dropping points and bad input ------------------------------------------------------------------
@given(seed=st.integers(0, 2**31 - 1), model=st.sampled_from(MODELS))
def test_points_outside_the_unit_interval_are_dropped_with_a_warning(backend, seed, model):
    """Points with y <= 0, y >= 1 or x <= 0 are left out with a warning saying how many; the
    fit equals the fit of the remaining points."""
    rng = np.random.default_rng(seed)
    _, x, y = _noisy(model, rng)
    bad_x = np.array([0.01, 0.02, 0.5, 0.0, -0.1])
    bad_y = np.array([0.0, -0.2, 1.0, 0.3, 0.3])
    pos = rng.permutation(x.size + 5)
    xa, ya = np.concatenate([x, bad_x])[pos], np.concatenate([y, bad_y])[pos]
    with pytest.warns(FrontierWarning, match=f"dropped 5 of {x.size + 5} points"):
        fit = fit_frontier(backend.asarray(xa), backend.asarray(ya), model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = fit_frontier(backend.asarray(x), backend.asarray(y), model)
    assert fit.n_dropped == 5 and fit.n_used == x.size
    _same_fit(fit, clean)


def test_bad_input_raises_errors_naming_the_argument(backend):
    """Unknown models, mismatched shapes, NaN, 2-D input, too few usable or distinct points,
    bad starting points, a comparison of something that is not a fit and a non-positive L0
    each raise an error that names the argument."""
    x = backend.asarray(np.array([0.01, 0.02, 0.05]))
    y = backend.asarray(np.array([0.2, 0.3, 0.5]))
    with pytest.raises(ValueError, match="'model' must be one of"):
        fit_frontier(x, y, "sigmoid")
    with pytest.raises(ValueError, match="must have one shape"):
        fit_frontier(x, backend.asarray(np.array([0.2, 0.3])), "hill1")
    with pytest.raises(ValueError, match="argument 'y' contains NaN"):
        fit_frontier(x, backend.asarray(np.array([0.2, np.nan, 0.5])), "hill1")
    with pytest.raises(ValueError, match="argument 'x' must be 1-D"):
        fit_frontier(backend.asarray(np.ones((3, 1))), y, "hill1")
    with pytest.raises(ValueError, match="needs at least 2 point"), pytest.warns(FrontierWarning):
        fit_frontier(x, backend.asarray(np.array([0.2, 1.5, 1.0])), "hill")
    with pytest.raises(ValueError, match="two distinct values of 'x'"):
        fit_frontier(backend.asarray(np.full(3, 0.02)), y, "power")
    with pytest.raises(ValueError, match="'start' must be a dict with keys"):
        fit_frontier(x, y, "hill", start={"x_half": 0.1})
    with pytest.raises(ValueError, match="'start\\['x_half'\\]' must be positive"):
        fit_frontier(x, y, "hill1", start={"x_half": -0.1})
    with pytest.raises(TypeError, match="'fit_a' must be a FrontierFit"):
        compare(0.5, fit_frontier(x, y, "hill1"))
    with pytest.raises(ValueError, match="'l0' must be positive"):
        hit_plane(backend.asarray(np.array([0.0, 4.0])), backend.asarray(np.array([0.5, 0.5])))


@given(seed=st.integers(0, 2**31 - 1), model=st.sampled_from(MODELS), side=st.sampled_from(["below", "above"]))
def test_x_half_outside_the_points_is_flagged_as_extrapolated(backend, seed, model, side):
    """When every point lies on one side of where the curve reaches y = 1/2 (x_half; x_half/2
    for the line), the fit warns that x_half is extrapolated and its result says so
    (``extrapolated``, the message in ``warnings``, the points' ``x_range``); points on both
    sides give no warning and ``extrapolated`` False."""
    rng = np.random.default_rng(seed)
    p, _ = _truth(model, rng)
    half = p["x_half"] if "x_half" in p else (2 * p["a"]) ** (-1 / p["n"])
    half = half / 2 if model == "linear" else half
    # the line and the power law pass y = 1 at 2 and 2^(1/n) times their crossing of 1/2
    top = {"linear": 0.95 * 2.0, "power": 0.95 * 2 ** (1 / p.get("n", 1.0))}.get(model, 20.0)
    lo, hi = (0.05, 0.6) if side == "below" else (1 + 0.2 * (top - 1), top)
    x = half * np.exp(np.linspace(np.log(lo), np.log(hi), 6))
    y = CURVES[model](x, p)
    with pytest.warns(FrontierWarning, match="extrapolated") as caught:
        fit = fit_frontier(backend.asarray(x), backend.asarray(y), model)
    assert fit.extrapolated and fit.x_range == (float(x.min()), float(x.max()))
    assert [str(w.message) for w in caught if w.category is FrontierWarning] == list(fit.warnings)
    assert any("extrapolated" in m for m in fit.warnings)
    assert not fit.x_range[0] <= fit.x_at_half <= fit.x_range[1]
    both = half * np.exp(np.linspace(np.log(0.3), np.log(min(1.5, top)), 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inside = fit_frontier(backend.asarray(both), backend.asarray(CURVES[model](both, p)), model)
    assert not inside.extrapolated and inside.warnings == ()
    assert inside.as_dict()["warnings"] == [] and fit.as_dict()["extrapolated"] is True


def test_plain_sequences_are_fitted_with_the_namespace_given(backend):
    """Lists are turned into arrays of ``xp`` (default NumPy) and fit like arrays."""
    x = [0.01, 0.02, 0.05, 0.1]
    y = [v / (v + 0.04) for v in x]
    a = fit_frontier(x, y, "hill1", xp=backend.xp)
    assert _rel(a.x_half, 0.04) <= 1e-9


# --- comparing families and the plane -------------------------------------------------------------
@given(seed=st.integers(0, 2**31 - 1))
def test_compare_is_the_ratio_of_x_half_with_delta_method_error(backend, seed):
    """ratio = x_a / x_b; se = ratio * sqrt((se_a/x_a)^2 + (se_b/x_b)^2); noiseless families
    give their true ratio."""
    rng = np.random.default_rng(seed)
    # both ends fixed, so each family's x_half (0.01 to 0.2) lies among the points
    x = np.exp(np.concatenate([[np.log(1e-3), np.log(0.5)], rng.uniform(np.log(1e-3), np.log(0.5), size=4)]))
    xa, xb = float(rng.uniform(0.01, 0.2)), float(rng.uniform(0.01, 0.2))
    fa = fit_frontier(backend.asarray(x), backend.asarray(x / (x + xa)), "hill1")
    fb = fit_frontier(backend.asarray(x), backend.asarray(x / (x + xb)), "hill1")
    assert _rel(compare(fa, fb).ratio, xa / xb) <= 1e-6
    _, x1, y1 = _noisy("hill", rng)
    _, x2, y2 = _noisy("hill", rng)
    a = fit_frontier(backend.asarray(x1), backend.asarray(y1), "hill")
    b = fit_frontier(backend.asarray(x2), backend.asarray(y2), "hill")
    c = compare(a, b)
    r = a.x_half / b.x_half
    assert_close(c.ratio, r, rtol=1e-15)
    want = r * math.hypot(a.x_half_stderr / a.x_half, b.x_half_stderr / b.x_half)
    assert_close(c.stderr, want, rtol=1e-12) if math.isfinite(want) else math.isnan(c.stderr)


def test_a_fit_that_does_not_converge_warns_and_reports_nan_uncertainties(backend):
    """Four noisy points on the plateau of a Hill curve: the least-squares optimum runs off to
    n -> 0 (a flat line), so the fit warns, and its uncertainties and comparisons are NaN."""
    x = np.array([0.50986936, 0.38357344, 0.64801514, 0.26483981])
    y = np.array([0.8034259, 0.77612445, 0.82982922, 0.87770085])
    with pytest.warns(FrontierWarning) as caught:
        fit = fit_frontier(backend.asarray(x), backend.asarray(y), "hill", max_iter=50)
    assert any("did not converge in 50 iterations" in str(w.message) for w in caught)
    assert not fit.converged and fit.params["n"] < 0.05
    assert "did not converge in 50 iterations" in fit.warnings[0]
    assert all(math.isnan(v) for v in fit.stderr.values()) and math.isnan(fit.x_half_stderr)
    good = fit_frontier(backend.asarray(x), backend.asarray(x / (x + 0.4)), "hill1")
    assert math.isnan(compare(good, fit).stderr)


def test_hit_plane_is_inverse_l0_and_one_minus_recovered(backend):
    """The plane's coordinates are x = 1/L0 and y = 1 - loss recovered, on the backend's arrays."""
    l0 = np.array([8.0, 32.0, 100.0])
    rec = np.array([0.95, 0.7, 0.2])
    x, y = hit_plane(backend.asarray(l0), backend.asarray(rec))
    assert_close(backend.numpy(x), 1 / l0, rtol=1e-15)
    assert_close(backend.numpy(y), 1 - rec, rtol=1e-15)


# --- figures (the plots extra) -------------------------------------------------------------------
PNG = b"\x89PNG\r\n\x1a\n"


def test_each_figure_is_written_as_a_png_and_no_temporary_file_is_left(backend, tmp_path):
    """A smoke test: every figure function returns a Figure and writes a PNG atomically."""
    pytest.importorskip("matplotlib")
    from sae_ref.frontier_plots import plot_hit_plane, plot_l0_frontier, plot_pruning_sweep
    from sae_ref.pruning import PruningPoint

    rng = np.random.default_rng(5)
    fams, fits = {}, {}
    for name, model in (("TopK", "hill1"), ("BatchTopK", "hill")):
        _, x, y = _noisy(model, rng)
        fams[name] = (backend.asarray(x), backend.asarray(y))
        fits[name] = [fit_frontier(backend.asarray(x), backend.asarray(y), m) for m in (model, "power")]
    plot_hit_plane(fams, fits, path=tmp_path / "plane.png")
    plot_l0_frontier({k: (1 / backend.numpy(x), backend.numpy(y)) for k, (x, y) in fams.items()},
                     metric="downstream loss", path=tmp_path / "frontier.png")
    pts = [PruningPoint(m, v, 40 - 30 * v, 0.1, 0.05 + 0.2 * v, 0.1 + 0.2 * v, 16)
           for m in ("global_threshold", "lowest_k") for v in (0.0, 0.5, 1.0)]
    fig = plot_pruning_sweep(pts, path=tmp_path / "sweep.png")
    assert fig.axes[0].get_legend_handles_labels()[1] == ["global_threshold", "lowest_k", "unpruned"]
    for name in ("plane.png", "frontier.png", "sweep.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frontier.png", "plane.png", "sweep.png"]


def test_figure_arguments_are_checked(tmp_path):
    """A zero L0 on the log axis, x and y of different lengths, an unknown metric and an
    unknown file suffix are refused; an SVG is written as SVG."""
    pytest.importorskip("matplotlib")
    from sae_ref.frontier_plots import plot_l0_frontier, plot_pruning_sweep, save_figure

    with pytest.raises(ValueError, match="a log axis cannot show"):
        plot_l0_frontier({"A": ([0, 10], [0.1, 0.2])})
    with pytest.raises(ValueError, match="has 2 x and 3 y values"):
        plot_l0_frontier({"A": ([5, 10], [0.1, 0.2, 0.3])})
    with pytest.raises(ValueError, match="'metric' must be one of"):
        plot_pruning_sweep([], metric="ce")
    fig = plot_l0_frontier({"A": ([5, 10], [0.2, 0.1])})
    with pytest.raises(ValueError, match="'path' must end in one of"):
        save_figure(fig, tmp_path / "f.jpg")
    save_figure(fig, tmp_path / "f.svg")
    assert b"<svg" in (tmp_path / "f.svg").read_bytes()[:400]
