"""Every hand-written gradient against torch.autograd and against central finite differences.

Each test writes the same computation graph independently in plain float64 torch (never
calling sae-ref inside it), compares value and gradients with what sae-ref returns on every
backend, and checks a few random coordinates of each gradient with central finite differences
(float64) evaluated through the library's own forward on that backend.

Selections (ReLU / TopK / BatchTopK / threshold) have no derivative: the torch graph holds the
selection mask of the library's forward fixed (``f = pre * mask``), which is exactly the
pass-through rule of the spec; finite differences are taken only where a perturbation leaves
the selection unchanged (there the loss is smooth and the derivative is a true one).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from sae_ref import losses
from sae_ref import sae as S
from sae_ref.arrays import to_numpy
from sae_ref.sae import SAEConfig, SAEParams
from sae_ref.sparse import SparseCode
from sae_ref.validation.oracles import assert_close, finite_difference_check, torch_grad, torch_leaf
from sae_ref.validation.strategies import sae_problems

torch = pytest.importorskip("torch")

SEEDS = st.integers(0, 2**32 - 1)
PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


# --- helpers ----------------------------------------------------------------------------------
tt = torch_leaf
tgrad = torch_grad


fd_check = finite_difference_check


def scalar(backend, a) -> float:
    v = backend.numpy(a)
    assert v.shape == (), f"expected a 0-D array, got shape {v.shape}"
    return float(v)


def to_params(backend, p: dict, names=PARAM_NAMES, dtype=None) -> SAEParams:
    return SAEParams(**{k: backend.asarray(p[k], dtype) for k in names})


def SparseCode_np(code: SparseCode):
    """(rows, cols) of a code as NumPy int64 arrays."""
    return to_numpy(code.rows).astype(np.int64), to_numpy(code.cols).astype(np.int64)


def same_selection(a, b) -> bool:
    return all(np.array_equal(u, v) for u, v in zip(a, b))


def mask_of(code: SparseCode) -> np.ndarray:
    rows, cols = SparseCode_np(code)
    m = np.zeros(code.shape, dtype=np.float64)
    m[rows, cols] = 1.0
    return m


def torch_standardize(X: torch.Tensor) -> torch.Tensor:
    return (X - X.mean(dim=1, keepdim=True)) / (X.std(dim=1, keepdim=True, unbiased=True) + 1e-5)


def grads_np(backend, g: SAEParams) -> dict:
    return {k: backend.numpy(v) for k, v in g.arrays().items()}


@st.composite
def pairs(draw, max_batch=8, max_d=10):
    """(x_hat, x, seed) in float64; x rows never zero."""
    B = draw(st.integers(1, max_batch))
    d = draw(st.integers(1, max_d))
    seed = draw(SEEDS)
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([1e-2, 1.0, 1e2]))
    x = rng.standard_normal((B, d)) * scale
    x_hat = x + rng.standard_normal((B, d)) * scale * draw(st.sampled_from([0.1, 1.0]))
    return x_hat, x, seed


@st.composite
def codes(draw, max_batch=8, max_h=20, max_d=8, min_value=1e-2):
    """(dense f >= 0 as numpy, mask, W_dec with rows of varied norm, seed)."""
    B = draw(st.integers(1, max_batch))
    h = draw(st.integers(1, max_h))
    d = draw(st.integers(1, max_d))
    seed = draw(SEEDS)
    rng = np.random.default_rng(seed)
    density = draw(st.sampled_from([0.1, 0.5, 1.0]))
    mask = rng.random((B, h)) < density
    f = np.where(mask, rng.uniform(min_value, 3.0, size=(B, h)), 0.0)
    W = rng.standard_normal((h, d))
    W *= (rng.uniform(0.3, 3.0, size=h) / np.linalg.norm(W, axis=1))[:, None]
    return f, mask, W, seed


def make_code(backend, f, mask) -> SparseCode:
    return SparseCode.from_mask(backend.asarray(f), backend.asarray(mask))


# --- reconstruction losses --------------------------------------------------------------------
@given(pairs(), st.sampled_from(["element", "sample"]))
def test_mse_value_and_grad(backend, data, unit):
    """mse's value and gradient equal torch.autograd's in float64 and finite differences, in either
    unit; the unit "sample" is exactly d times the unit "element"."""
    x_hat, x, seed = data
    B, d = x.shape
    val, g = losses.mse(backend.asarray(x_hat), backend.asarray(x), unit=unit)
    val, g = scalar(backend, val), backend.numpy(g)

    Xh, X = tt(x_hat), tt(x, grad=False)
    n = B * d if unit == "element" else B
    L = ((Xh - X) ** 2).sum() / n
    L.backward()
    assert_close(val, L.item(), what="mse value")
    assert_close(g, tgrad(Xh), what="mse grad")

    other = "sample" if unit == "element" else "element"
    v_other = scalar(backend, losses.mse(backend.asarray(x_hat), backend.asarray(x), unit=other)[0])
    ratio = d if unit == "element" else 1.0 / d  # "sample" is d times "element"
    assert_close(v_other, val * ratio, what="unit ratio")

    xb = backend.asarray(x)
    fd_check(lambda a: scalar(backend, losses.mse(backend.asarray(a), xb, unit=unit)[0]),
             x_hat, g, seed, what=f"mse[{unit}] FD")


@given(pairs(), st.sampled_from(["pooled", "per_row"]))
def test_nmse_value_and_grad(backend, data, reduce):
    """nmse's value and gradient, pooled and per row (each normalised by the squared norm about
    zero), equal torch.autograd's in float64 and finite differences."""
    x_hat, x, seed = data
    val, g = losses.nmse(backend.asarray(x_hat), backend.asarray(x), reduce=reduce)
    val, g = scalar(backend, val), backend.numpy(g)

    Xh, X = tt(x_hat), tt(x, grad=False)
    if reduce == "pooled":
        L = ((Xh - X) ** 2).sum() / (X ** 2).sum()
    else:
        L = (((Xh - X) ** 2).sum(dim=1) / (X ** 2).sum(dim=1)).mean()
    L.backward()
    assert_close(val, L.item(), what="nmse value")
    assert_close(g, tgrad(Xh), what="nmse grad")

    xb = backend.asarray(x)
    fd_check(lambda a: scalar(backend, losses.nmse(backend.asarray(a), xb, reduce=reduce)[0]),
             x_hat, g, seed, what=f"nmse[{reduce}] FD")


# --- sparsity penalties -----------------------------------------------------------------------
@given(codes(), st.booleans())
def test_l1_value_and_grads(backend, data, weighted):
    """l1's value and its gradients on the code's values and (weighted by the decoder row norms) on
    W_dec equal torch.autograd's and finite differences; without W_dec there is no W_dec
    gradient."""
    f, mask, W_dec, seed = data
    B = f.shape[0]
    code = make_code(backend, f, mask)
    Wb = backend.asarray(W_dec) if weighted else None
    val, g_vals, g_W = losses.l1(code, Wb)
    val, g_vals = scalar(backend, val), backend.numpy(g_vals)
    rows, cols = SparseCode_np(code)

    F, W = tt(f), tt(W_dec)
    w = torch.linalg.vector_norm(W, dim=1) if weighted else torch.ones(W.shape[0], dtype=torch.float64)
    L = (F.abs() * w).sum() / B
    L.backward()
    assert_close(val, L.item(), what="l1 value")
    assert_close(g_vals, tgrad(F)[rows, cols], what="l1 grad on values")
    if weighted:
        g_W = backend.numpy(g_W)
        assert_close(g_W, tgrad(W), what="l1 grad on W_dec")
    else:
        assert g_W is None

    def at_values(v):
        return scalar(backend, losses.l1(code.with_values(backend.asarray(v)), Wb)[0])

    v0 = backend.numpy(code.values)
    fd_check(at_values, v0, g_vals, seed, what="l1 FD values")
    if weighted:
        fd_check(lambda Wn: scalar(backend, losses.l1(code, backend.asarray(Wn))[0]),
                 W_dec, g_W, seed + 1, what="l1 FD W_dec")


@given(codes(min_value=1e-2), st.sampled_from([1e-6, 1e-4]))
def test_sqrt_l1_value_and_grad(backend, data, eps):
    """sqrt_l1, the sum of sqrt(f + eps) - sqrt(eps) over B, and its gradient 1 / (2B sqrt(f + eps))
    equal torch.autograd's and finite differences."""
    f, mask, _, seed = data
    B = f.shape[0]
    code = make_code(backend, f, mask)
    val, g = losses.sqrt_l1(code, eps=eps)
    val, g = scalar(backend, val), backend.numpy(g)

    V = tt(backend.numpy(code.values))
    L = (torch.sqrt(V + eps) - eps ** 0.5).sum() / B
    L.backward()
    assert_close(val, L.item(), what="sqrt_l1 value")
    assert_close(g, tgrad(V), what="sqrt_l1 grad")
    fd_check(lambda v: scalar(backend, losses.sqrt_l1(code.with_values(backend.asarray(v)), eps=eps)[0]),
             backend.numpy(code.values), g, seed, rel_step=1e-7, what="sqrt_l1 FD")


@given(st.integers(1, 6), st.integers(1, 12), SEEDS, st.sampled_from([1e-8, 1e-6, 1e-4]))
def test_sqrt_l1_finite_at_zero(backend, B, h, seed, eps):
    """At f = 0 sqrt_l1 stays finite: the gradient is positive and at most its bound 1 / (2B
    sqrt(eps)), which it reaches at the zeros, and an all-zero code costs exactly 0."""
    rng = np.random.default_rng(seed)
    f = rng.uniform(0.0, 2.0, size=(B, h))
    f[rng.random((B, h)) < 0.5] = 0.0
    f[0, 0] = 0.0
    mask = np.ones((B, h), dtype=bool)  # zeros are stored explicitly in the code
    code = make_code(backend, f, mask)
    val, g = losses.sqrt_l1(code, eps=eps)
    val, g = scalar(backend, val), backend.numpy(g)
    v = backend.numpy(code.values)
    bound = 1.0 / (2 * B * np.sqrt(eps))
    assert np.isfinite(val) and np.all(np.isfinite(g))
    assert np.all(g > 0)
    assert np.all(g <= bound * (1 + 1e-12)), "sqrt_l1 gradient exceeds 1/(2B sqrt(eps))"
    assert_close(g[v == 0], np.full(int(np.sum(v == 0)), bound), what="gradient at zero")

    V = tt(v)
    L = (torch.sqrt(V + eps) - eps ** 0.5).sum() / B
    L.backward()
    assert_close(val, L.item(), what="sqrt_l1 value")
    assert_close(g, tgrad(V), what="sqrt_l1 grad")

    zero_code = code.with_values(backend.asarray(np.zeros_like(v)))
    zval, zg = losses.sqrt_l1(zero_code, eps=eps)
    assert scalar(backend, zval) == 0.0, "sqrt_l1 of an all-zero code must be exactly 0"
    assert_close(backend.numpy(zg), np.full(v.shape, bound), what="gradient at zero")


# --- the SAE backward -------------------------------------------------------------------------
def torch_sae(p: dict, x: np.ndarray, mask: np.ndarray, standardize: bool):
    """The same SAE written in torch: leaves, pre-activation, code (mask fixed) and x_hat."""
    P = {k: tt(p[k]) for k in PARAM_NAMES}
    X = tt(x, grad=False)
    if standardize:
        X = torch_standardize(X)
    Z = (X - P["b_dec"]) @ P["W_enc"] + P["b_enc"]
    F = Z * torch.tensor(mask)
    Xh = F @ P["W_dec"] + P["b_dec"]
    return P, X, Z, F, Xh


@given(sae_problems(), st.sampled_from(["relu", "topk", "batchtopk", "threshold"]),
       st.data(), st.booleans())
def test_sae_backward_matches_autograd(backend, problem, activation, data, standardize):
    """The SAE's hand-written backward (relu, topk, batchtopk, threshold; with and without
    standardisation) gives torch.autograd's gradients of every parameter through the same
    selection, and finite differences where the selection does not change; the code keeps only
    positive pre-activations."""
    x, p = problem
    B, d = x.shape
    h = p["W_enc"].shape[1]
    k = data.draw(st.integers(1, h), label="k")
    threshold = data.draw(st.sampled_from([0.0, 0.1, 0.3]), label="threshold")
    seed = data.draw(SEEDS, label="seed")
    g = np.random.default_rng(seed).standard_normal((B, d))
    config = SAEConfig(activation, k=k if activation in ("topk", "batchtopk") else None,
                       theta=threshold if activation == "threshold" else None,
                       standardize=standardize)

    params = to_params(backend, p)
    fwd = S.forward(params, backend.asarray(x), config)
    grads = grads_np(backend, S.backward(params, fwd, backend.asarray(g)))
    assert set(grads) == set(PARAM_NAMES)
    mask = mask_of(fwd.code)
    assert np.all(backend.numpy(fwd.pre)[mask > 0] > 0), "kept an entry whose pre-activation is <= 0"

    P, X, Z, F, Xh = torch_sae(p, x, mask, standardize)
    assert_close(backend.numpy(fwd.x_hat), Xh.detach().numpy(), what="x_hat")
    assert_close(backend.numpy(fwd.pre), Z.detach().numpy(), what="pre")
    (Xh * torch.tensor(g)).sum().backward()
    for name in PARAM_NAMES:
        assert_close(grads[name], tgrad(P[name]), what=f"{activation}: grad {name}")

    base = SparseCode_np(fwd.code)
    xb = backend.asarray(x)
    for i, name in enumerate(PARAM_NAMES):
        def fun(a, name=name):
            q = dict(p)
            q[name] = a
            f2 = S.forward(to_params(backend, q), xb, config)
            if not same_selection(SparseCode_np(f2.code), base):
                return None
            return float(np.sum(g * backend.numpy(f2.x_hat)))

        fd_check(fun, p[name], grads[name], seed + i, n=2, what=f"{activation}: FD {name}")


@given(sae_problems(), st.sampled_from(["relu", "topk"]),
       st.sampled_from(["l1", "l1_weighted", "sqrt_l1"]), st.sampled_from(["element", "sample"]),
       st.sampled_from([0.1, 1.0]), st.data())
def test_sae_backward_with_code_penalty(backend, problem, activation, penalty, unit, lam, data):
    """Total loss mse + lambda * penalty(f): g_code (and l1's g_W_dec) through sae.backward."""
    x, p = problem
    B, d = x.shape
    h = p["W_enc"].shape[1]
    k = data.draw(st.integers(1, h), label="k")
    seed = data.draw(SEEDS, label="seed")
    config = SAEConfig(activation, k=k if activation == "topk" else None)
    eps = 1e-6
    xb = backend.asarray(x)

    def library(params_b, fwd):
        mval, g_xhat = losses.mse(fwd.x_hat, fwd.x, unit=unit)
        g_Wd = None
        if penalty == "sqrt_l1":
            pval, g_vals = losses.sqrt_l1(fwd.code, eps=eps)
        else:
            pval, g_vals, g_Wd = losses.l1(fwd.code, params_b.W_dec if penalty == "l1_weighted" else None)
        return mval + lam * pval, g_xhat, lam * g_vals, None if g_Wd is None else lam * g_Wd

    params = to_params(backend, p)
    fwd = S.forward(params, xb, config)
    total, g_xhat, g_code, g_Wd = library(params, fwd)
    grads = grads_np(backend, S.backward(params, fwd, g_xhat, g_code=g_code, g_W_dec_extra=g_Wd))

    mask = mask_of(fwd.code)
    P, X, Z, F, Xh = torch_sae(p, x, mask, False)
    n = B * d if unit == "element" else B
    L = ((Xh - X) ** 2).sum() / n
    if penalty == "l1":
        L = L + lam * F.abs().sum() / B
    elif penalty == "l1_weighted":
        L = L + lam * (F.abs() * torch.linalg.vector_norm(P["W_dec"], dim=1)).sum() / B
    else:
        L = L + lam * (torch.sqrt(F.abs() + eps) - eps ** 0.5).sum() / B
    L.backward()
    assert_close(scalar(backend, total), L.item(), what="total loss")
    for name in PARAM_NAMES:
        assert_close(grads[name], tgrad(P[name]), what=f"{activation}+{penalty}: grad {name}")

    base = SparseCode_np(fwd.code)
    for i, name in enumerate(PARAM_NAMES):
        def fun(a, name=name):
            q = dict(p)
            q[name] = a
            pb = to_params(backend, q)
            f2 = S.forward(pb, xb, config)
            if not same_selection(SparseCode_np(f2.code), base):
                return None
            if penalty == "sqrt_l1" and f2.code.nnz and np.min(backend.numpy(f2.code.values)) < 1e-2:
                return None  # sqrt's curvature near 0 is too large for a 1e-6 central difference
            return scalar(backend, library(pb, f2)[0])

        fd_check(fun, p[name], grads[name], seed + i, n=2, what=f"{penalty}: FD {name}")


# --- JumpReLU ---------------------------------------------------------------------------------
def rect(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class TorchJumpReLU(torch.autograd.Function):
    """f = z H(z - theta); df/dz = H(z - theta), df/dtheta = -(theta/eps) K((z - theta)/eps)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        gz = g * (z > theta).to(z.dtype)
        gth = (-(theta / eps) * rect((z - theta) / eps) * g).sum(dim=0)
        return gz, gth, None


class TorchStep(torch.autograd.Function):
    """H(z - theta); d/dz = 0, d/dtheta = -(1/eps) K((z - theta)/eps)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        gth = (-(1.0 / eps) * rect((z - theta) / eps) * g).sum(dim=0)
        return torch.zeros_like(z), gth, None


@st.composite
def jumprelu_problems(draw):
    """An SAE problem whose thresholds sit, for about half the latents, inside the kernel
    window of one sample's pre-activation, so theta gets a nonzero pseudo-gradient."""
    x, p = draw(sae_problems())
    eps = draw(st.sampled_from([0.001, 0.05, 0.3]))
    rng = np.random.default_rng(draw(SEEDS))
    z = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    B, h = z.shape
    theta = p["theta"].copy()
    planted = 0
    for j in range(h):
        rows = np.flatnonzero(z[:, j] > 1e-3 + 0.5 * eps)  # theta must stay positive
        if rows.size and rng.random() < 0.5:
            theta[j] = z[rng.choice(rows), j] + rng.uniform(-0.45, 0.45) * eps
            planted += 1
    assume(planted > 0)
    p = dict(p, theta=theta)
    # stay clear of the kinks (selection and kernel edges) where the two sides could differ
    # by rounding
    u = (z - theta) / eps
    assume(np.min(np.abs(z - theta)) > 1e-9)
    assume(np.min(np.abs(np.abs(u) - 0.5)) > 1e-7)
    return x, p, eps


@given(jumprelu_problems(), st.sampled_from([0.0, 0.5]), st.sampled_from([0.0, 0.3]), SEEDS)
def test_jumprelu_backward_matches_ste(backend, problem, lam_l0, lam_l1, seed):
    """sae.backward + jumprelu_l0 against a torch graph built on custom STE Functions.

    Finite differences do not apply to theta: its gradient is a pseudo-derivative (the true
    derivative of the loss with respect to theta is 0 almost everywhere and infinite at the
    jumps). They are checked for W_dec and b_dec, where the derivative is a true one away from
    the kink (selection unchanged by the perturbation).
    """
    x, p, eps = problem
    B, d = x.shape
    names = PARAM_NAMES + ("theta",)
    config = SAEConfig("jumprelu", bandwidth=eps)
    g = np.random.default_rng(seed).standard_normal((B, d))
    xb = backend.asarray(x)

    def library_loss(params_b, fwd):
        l0, g_th = losses.jumprelu_l0(fwd.pre, params_b.theta, eps)
        l1v, g_vals, _ = losses.l1(fwd.code)
        value = float(np.sum(g * backend.numpy(fwd.x_hat))) + lam_l0 * scalar(backend, l0) \
            + lam_l1 * scalar(backend, l1v)
        return value, lam_l0 * g_th, lam_l1 * g_vals

    params = to_params(backend, p, names)
    fwd = S.forward(params, xb, config)
    value, g_theta, g_code = library_loss(params, fwd)
    grads = grads_np(backend, S.backward(params, fwd, backend.asarray(g), g_code=g_code,
                                         g_theta=g_theta))
    assert set(grads) == set(names)

    P = {k: tt(p[k]) for k in names}
    X = tt(x, grad=False)
    Z = (X - P["b_dec"]) @ P["W_enc"] + P["b_enc"]
    F = TorchJumpReLU.apply(Z, P["theta"], eps)
    Xh = F @ P["W_dec"] + P["b_dec"]
    L = (torch.tensor(g) * Xh).sum() + lam_l0 * TorchStep.apply(Z, P["theta"], eps).sum() / B \
        + lam_l1 * F.abs().sum() / B
    L.backward()
    assert_close(backend.numpy(fwd.x_hat), Xh.detach().numpy(), what="x_hat")
    assert_close(value, L.item(), what="loss value")
    for name in names:
        assert_close(grads[name], tgrad(P[name]), what=f"jumprelu: grad {name}")

    # the planted thresholds put entries in the kernel window: theta's gradient is exercised
    assert fwd.window is not None and fwd.window.nnz > 0

    base = SparseCode_np(fwd.code)
    for i, name in enumerate(("W_dec", "b_dec")):
        def fun(a, name=name):
            q = dict(p)
            q[name] = a
            pb = to_params(backend, q, names)
            f2 = S.forward(pb, xb, config)
            if not same_selection(SparseCode_np(f2.code), base):
                return None
            return library_loss(pb, f2)[0]

        fd_check(fun, p[name], grads[name], seed + i, n=3, what=f"jumprelu: FD {name}")


# --- sparsity of the gradients ----------------------------------------------------------------
@given(sae_problems(max_h=40), st.sampled_from(["topk", "batchtopk"]), st.integers(1, 3), SEEDS)
def test_gradients_zero_for_latents_that_never_fired(backend, problem, activation, k, seed):
    """A latent that fired for no sample of the batch gets exactly zero gradient in its W_dec row,
    its W_enc column and its b_enc; the latents that fired do get a gradient."""
    x, p = problem
    B, d = x.shape
    h = p["W_enc"].shape[1]
    assume(k <= h)
    config = SAEConfig(activation, k=k)
    params = to_params(backend, p)
    fwd = S.forward(params, backend.asarray(x), config)
    g = np.random.default_rng(seed).standard_normal((B, d))
    grads = grads_np(backend, S.backward(params, fwd, backend.asarray(g)))
    fired = np.zeros(h, dtype=bool)
    fired[SparseCode_np(fwd.code)[1]] = True
    dead = ~fired
    assert np.all(grads["W_dec"][dead] == 0.0), "g_W_dec rows of latents that never fired are not 0"
    assert np.all(grads["W_enc"][:, dead] == 0.0), "g_W_enc columns of latents that never fired are not 0"
    assert np.all(grads["b_enc"][dead] == 0.0), "g_b_enc of latents that never fired is not 0"
    # and the fired ones do carry gradient (a random upstream almost surely gives a nonzero row)
    vals = backend.numpy(fwd.code.values)
    if np.all(vals > 1e-8):
        assert np.all(np.any(grads["W_dec"][fired] != 0.0, axis=1))


# --- float32 against float64 ------------------------------------------------------------------
@given(sae_problems(), st.sampled_from(["relu", "topk", "batchtopk", "jumprelu"]), st.data())
def test_float32_gradients_agree_with_float64(backend, problem, activation, data):
    """In float32 every gradient keeps the parameters' dtype and agrees with float64 to 1e-4 of its
    largest entry, whenever the two precisions select the same entries."""
    x, p = problem
    h = p["W_enc"].shape[1]
    k = data.draw(st.integers(1, h), label="k")
    config = SAEConfig(activation, k=k if activation in ("topk", "batchtopk") else None,
                       bandwidth=0.05)
    names = PARAM_NAMES + (("theta",) if activation == "jumprelu" else ())
    out = {}
    for dt in ("float64", "float32"):
        params = to_params(backend, p, names, dtype=dt)
        fwd = S.forward(params, backend.asarray(x, dt), config)
        mval, g_xhat = losses.mse(fwd.x_hat, fwd.x)
        g_theta = None
        if activation == "jumprelu":
            g_theta = losses.jumprelu_l0(fwd.pre, params.theta, config.bandwidth)[1] * 0.01
        grads = S.backward(params, fwd, g_xhat, g_theta=g_theta)
        for name, arr in grads.arrays().items():
            assert arr.dtype == params.W_enc.dtype, f"{name} gradient has dtype {arr.dtype}"
        win = None if fwd.window is None else SparseCode_np(fwd.window)
        out[dt] = (SparseCode_np(fwd.code), win, grads_np(backend, grads))
    (sel64, win64, g64), (sel32, win32, g32) = out["float64"], out["float32"]
    assume(same_selection(sel64, sel32))  # rounding may move a near-tie across the cut
    if activation == "jumprelu":
        assume(same_selection(win64, win32))
    for name in names:
        a, b = g32[name].astype(np.float64), g64[name]
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        err = float(np.max(np.abs(a - b))) if b.size else 0.0
        assert err <= 1e-4 * scale + 1e-9, f"{activation}: float32 {name} off by {err:.3g} (scale {scale:.3g})"
