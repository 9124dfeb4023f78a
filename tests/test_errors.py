"""Bad input raises a clear error that names the op and the argument, on every backend.

Every public op checks its arguments (see ``sae_ref._checks``): wrong shapes, dtypes, values,
libraries and devices are rejected with a TypeError or ValueError whose message starts with
the op's name and quotes the offending argument. ``sae_ref.no_checks()`` switches off the
NaN/inf checks only.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import sae_ref
from sae_ref import activations as A
from sae_ref import auxk as AK
from sae_ref import decoder as D
from sae_ref import losses as L
from sae_ref import sae as S
from sae_ref.sparse import SparseCode

B, D_, H = 3, 4, 6  # batch, features, latents of the small problems below


# --- helpers -----------------------------------------------------------------------------------
def named(op: str, arg: str) -> str:
    """Regex: a message from ``op`` that quotes the argument ``arg``."""
    return rf"^{re.escape(op)}\b.*'{re.escape(arg)}'"


def rng(seed=0):
    return np.random.default_rng(seed)


def np_params(d=D_, h=H, dtype=np.float64, seed=0):
    r = rng(seed)
    W_dec = r.standard_normal((h, d))
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    return {
        "W_enc": (r.standard_normal((d, h)) / np.sqrt(d)).astype(dtype),
        "b_enc": np.zeros(h, dtype),
        "W_dec": W_dec.astype(dtype),
        "b_dec": np.zeros(d, dtype),
        "theta": np.full(h, 0.1, dtype),
    }


def make_params(backend, *, with_theta=True, dtype=np.float64, **override):
    """SAEParams on ``backend``; ``override`` maps a name to a NumPy array or None."""
    p = np_params(dtype=dtype)
    if not with_theta:
        p["theta"] = None
    p.update(override)
    return S.SAEParams(**{k: None if v is None else backend.asarray(v) for k, v in p.items()})


def x_np(b=B, d=D_, seed=1):
    return rng(seed).standard_normal((b, d))


def pre_np(b=B, h=H, seed=2):
    return rng(seed).standard_normal((b, h))


def with_bad(a: np.ndarray, value: float) -> np.ndarray:
    a = np.array(a, dtype=np.float64, copy=True)
    a.flat[a.size // 2] = value
    return a


BAD_VALUES = [np.nan, np.inf, -np.inf]
BAD_IDS = ["nan", "inf", "-inf"]

BTK = S.SAEConfig("batchtopk", k=2)
JUMP = S.SAEConfig("jumprelu")


def foreign(backend, a: np.ndarray):
    """``a`` as an array of another library than ``backend``'s."""
    if backend.name.startswith("numpy"):
        torch = pytest.importorskip("torch")
        return torch.asarray(a)
    return np.asarray(a)


def other_device(backend, a: np.ndarray):
    """``a`` on another device than ``backend.device`` (skip where the library has one)."""
    if backend.name == "strict":
        return backend.xp.asarray(a, device=backend.xp.Device("CPU_DEVICE"))
    if backend.name.startswith("torch"):
        import torch

        dev = "meta" if backend.name in ("torch", "torch-gpu-path") else "cpu"
        return torch.asarray(a, device=dev)
    pytest.skip(f"{backend.name} has a single device here")


# --- activations: the pre-activation ----------------------------------------------------------
def _activation_ops(backend):
    """(name, fn(pre)) for every op that takes ``pre`` of shape [B, H]."""
    theta = backend.asarray(np.full(H, 0.1))
    return [
        ("relu", lambda z: A.relu(z)),
        ("topk", lambda z: A.topk(z, 1)),
        ("batch_topk", lambda z: A.batch_topk(z, 1)),
        ("threshold", lambda z: A.threshold(z, 0.1)),
        ("jumprelu", lambda z: A.jumprelu(z, theta)),
        ("jumprelu_window", lambda z: A.jumprelu_window(z, theta, 0.01)),
        ("jumprelu_l0", lambda z: L.jumprelu_l0(z, theta, 0.01)),
    ]


OP_NAMES = ["relu", "topk", "batch_topk", "threshold", "jumprelu", "jumprelu_window", "jumprelu_l0"]


def _op(backend, name):
    return dict(_activation_ops(backend))[name]


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("shape", [(H,), (2, B, H)], ids=["1d", "3d"])
def test_pre_wrong_ndim(backend, op, shape):
    pre = backend.asarray(np.ones(shape))
    with pytest.raises(ValueError, match=named(op, "pre")):
        _op(backend, op)(pre)


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("dtype", ["int64", "int32", "bool"])
def test_pre_non_floating(backend, op, dtype):
    pre = backend.asarray(np.ones((B, H)), dtype=dtype)
    with pytest.raises(TypeError, match=named(op, "pre")):
        _op(backend, op)(pre)


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("bad", BAD_VALUES, ids=BAD_IDS)
def test_pre_nan_inf(backend, op, bad):
    pre = backend.asarray(with_bad(pre_np(), bad))
    with pytest.raises(ValueError, match=named(op, "pre") + ".*NaN or infinity"):
        _op(backend, op)(pre)


@pytest.mark.parametrize("op", OP_NAMES)
def test_pre_empty_batch(backend, op):
    pre = backend.asarray(np.ones((0, H)))
    with pytest.raises(ValueError, match=named(op, "pre")):
        _op(backend, op)(pre)


def test_pre_not_an_array(backend):
    with pytest.raises(TypeError, match=named("relu", "pre")):
        A.relu(pre_np().tolist())


# --- k ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [A.topk, A.batch_topk], ids=["topk", "batch_topk"])
@pytest.mark.parametrize("k", [0, -1, H + 1, 10**6])
def test_k_out_of_range(backend, fn, k):
    pre = backend.asarray(pre_np())
    with pytest.raises(ValueError, match=named(fn.__name__, "k")):
        fn(pre, k)


@pytest.mark.parametrize("fn", [A.topk, A.batch_topk], ids=["topk", "batch_topk"])
@pytest.mark.parametrize("k", [2.0, 2.5, True, False, "2", None])
def test_k_not_an_int(backend, fn, k):
    pre = backend.asarray(pre_np())
    with pytest.raises(TypeError, match=named(fn.__name__, "k")):
        fn(pre, k)


def test_k_numpy_integer_accepted(backend):
    pre = backend.asarray(pre_np())
    assert A.topk(pre, np.int64(2)).nnz <= 2 * B


# --- theta (jumprelu / threshold) -------------------------------------------------------------
THETA_OPS = {
    "jumprelu": lambda z, t: A.jumprelu(z, t),
    "jumprelu_window": lambda z, t: A.jumprelu_window(z, t, 0.01),
    "jumprelu_l0": lambda z, t: L.jumprelu_l0(z, t, 0.01),
    "threshold": lambda z, t: A.threshold(z, t),
}


@pytest.mark.parametrize("op", list(THETA_OPS))
@pytest.mark.parametrize("shape", [(H - 1,), (H + 1,), (1, H)], ids=["short", "long", "2d"])
def test_theta_wrong_shape(backend, op, shape):
    pre = backend.asarray(pre_np())
    theta = backend.asarray(np.full(shape, 0.1))
    with pytest.raises(ValueError, match=named(op, "theta")):
        THETA_OPS[op](pre, theta)


@pytest.mark.parametrize("op", list(THETA_OPS))
@pytest.mark.parametrize("bad", BAD_VALUES, ids=BAD_IDS)
def test_theta_nan_inf(backend, op, bad):
    pre = backend.asarray(pre_np())
    theta = backend.asarray(with_bad(np.full(H, 0.1), bad))
    with pytest.raises(ValueError, match=named(op, "theta")):
        THETA_OPS[op](pre, theta)


@pytest.mark.parametrize("op", list(THETA_OPS))
def test_theta_integer_dtype(backend, op):
    pre = backend.asarray(pre_np())
    theta = backend.asarray(np.ones(H, dtype=np.int64))
    with pytest.raises(TypeError, match=named(op, "theta")):
        THETA_OPS[op](pre, theta)


@pytest.mark.parametrize("op", ["jumprelu", "jumprelu_window", "jumprelu_l0"])
@pytest.mark.parametrize("bad", [0.0, -0.1], ids=["zero", "negative"])
def test_jumprelu_theta_not_positive(backend, op, bad):
    pre = backend.asarray(pre_np())
    theta = np.full(H, 0.1)
    theta[H // 2] = bad
    with pytest.raises(ValueError, match=named(op, "theta")):
        THETA_OPS[op](pre, backend.asarray(theta))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=BAD_IDS)
def test_threshold_scalar_theta_not_finite(backend, bad):
    pre = backend.asarray(pre_np())
    with pytest.raises(ValueError, match=named("threshold", "theta")):
        A.threshold(pre, bad)


@pytest.mark.parametrize("bad", [None, "abc", [0.1, 0.2]], ids=["none", "str", "list"])
def test_threshold_theta_not_a_number(backend, bad):
    # BUG (str): float("abc") raises ValueError "could not convert string to float" that names
    # neither the op nor 'theta' (activations._as_theta catches TypeError only).
    pre = backend.asarray(pre_np())
    with pytest.raises((TypeError, ValueError), match=named("threshold", "theta")):
        A.threshold(pre, bad)


# --- bandwidth --------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["jumprelu_window", "jumprelu_l0"])
@pytest.mark.parametrize("bw", [0.0, -0.01, float("nan"), float("inf"), True, "0.1"],
                         ids=["zero", "negative", "nan", "inf", "bool", "str"])
def test_bandwidth_not_positive(backend, op, bw):
    pre = backend.asarray(pre_np())
    theta = backend.asarray(np.full(H, 0.1))
    fn = A.jumprelu_window if op == "jumprelu_window" else L.jumprelu_l0
    with pytest.raises(ValueError, match=named(op, "bandwidth")):
        fn(pre, theta, bw)


@pytest.mark.parametrize("bw", [0, -1.0, float("nan")], ids=["zero", "negative", "nan"])
def test_config_bandwidth_not_positive(bw):
    with pytest.raises(ValueError, match=named("SAEConfig", "bandwidth")):
        S.SAEConfig("jumprelu", bandwidth=bw)


# --- reconstruction losses --------------------------------------------------------------------
@pytest.mark.parametrize("op", ["mse", "nmse"])
@pytest.mark.parametrize("shape", [(B, D_ + 1), (B + 1, D_), (D_, B), (B, D_, 1)],
                         ids=["d", "B", "transposed", "3d"])
def test_x_hat_shape_differs(backend, op, shape):
    fn = getattr(L, op)
    with pytest.raises(ValueError, match=named(op, "x_hat")):
        fn(backend.asarray(np.ones(shape)), backend.asarray(x_np()))


@pytest.mark.parametrize("op", ["mse", "nmse"])
@pytest.mark.parametrize("shape", [(D_,), (1, B, D_)], ids=["1d", "3d"])
def test_loss_x_wrong_ndim(backend, op, shape):
    fn = getattr(L, op)
    x = backend.asarray(np.ones(shape))
    with pytest.raises(ValueError, match=named(op, "x")):
        fn(x, x)


@pytest.mark.parametrize("op", ["mse", "nmse"])
@pytest.mark.parametrize("which", ["x", "x_hat"])
def test_loss_integer_dtype(backend, op, which):
    good = x_np()
    ints = backend.asarray(np.ones((B, D_), dtype=np.int64))
    args = {"x_hat": backend.asarray(good), "x": backend.asarray(good)}
    args[which] = ints
    with pytest.raises(TypeError, match=named(op, which)):
        getattr(L, op)(args["x_hat"], args["x"])


@pytest.mark.parametrize("op", ["mse", "nmse"])
@pytest.mark.parametrize("which", ["x", "x_hat"])
@pytest.mark.parametrize("bad", BAD_VALUES, ids=BAD_IDS)
def test_loss_nan_inf(backend, op, which, bad):
    args = {"x_hat": backend.asarray(x_np(seed=3)), "x": backend.asarray(x_np())}
    args[which] = backend.asarray(with_bad(x_np(), bad))
    with pytest.raises(ValueError, match=named(op, which) + ".*NaN or infinity"):
        getattr(L, op)(args["x_hat"], args["x"])


@pytest.mark.parametrize("op", ["mse", "nmse"])
def test_loss_empty_batch(backend, op):
    e = backend.asarray(np.ones((0, D_)))
    with pytest.raises(ValueError, match=named(op, "x")):
        getattr(L, op)(e, e)


@pytest.mark.parametrize("op", ["mse", "nmse"])
def test_loss_mixed_float_dtypes(backend, op):
    x_hat = backend.asarray(x_np(), dtype="float32")
    x = backend.asarray(x_np())
    with pytest.raises(TypeError, match=named(op, "x_hat")):
        getattr(L, op)(x_hat, x)


@pytest.mark.parametrize("unit", ["batch", "Element", "", None])
def test_mse_unknown_unit(backend, unit):
    x = backend.asarray(x_np())
    with pytest.raises(ValueError, match=named("mse", "unit")):
        L.mse(x, x, unit=unit)


@pytest.mark.parametrize("reduce", ["mean", "sum", None])
def test_nmse_unknown_reduce(backend, reduce):
    x = backend.asarray(x_np())
    with pytest.raises(ValueError, match=named("nmse", "reduce")):
        L.nmse(x, x, reduce=reduce)


# --- sparsity penalties -----------------------------------------------------------------------
def _code(backend, dtype="float64"):
    return A.relu(backend.asarray(pre_np(), dtype=dtype))


@pytest.mark.parametrize("shape", [(H + 1, D_), (H - 1, D_), (H,), (H, D_, 1)],
                         ids=["long", "short", "1d", "3d"])
def test_l1_W_dec_wrong_shape(backend, shape):
    with pytest.raises(ValueError, match=named("l1", "W_dec")):
        L.l1(_code(backend), backend.asarray(np.ones(shape)))


def test_l1_W_dec_integer(backend):
    with pytest.raises(TypeError, match=named("l1", "W_dec")):
        L.l1(_code(backend), backend.asarray(np.ones((H, D_), dtype=np.int64)))


def test_l1_W_dec_mixed_float_dtype(backend):
    # BUG: l1 has no same_dtype check (mse, auxk and forward do): a float32 W_dec with a
    # float64 code is silently promoted.
    W_dec = backend.asarray(np.ones((H, D_)), dtype="float32")
    with pytest.raises(TypeError, match=named("l1", "W_dec")):
        L.l1(_code(backend, "float64"), W_dec)


@pytest.mark.parametrize("fn", [L.l1, L.sqrt_l1], ids=["l1", "sqrt_l1"])
def test_penalty_code_not_a_code(backend, fn):
    with pytest.raises(TypeError, match=named(fn.__name__, "code")):
        fn(backend.asarray(pre_np()))


@pytest.mark.parametrize("fn", [L.l1, L.sqrt_l1], ids=["l1", "sqrt_l1"])
@pytest.mark.parametrize("bad", BAD_VALUES, ids=BAD_IDS)
def test_penalty_code_nan_inf(backend, fn, bad):
    code = _code(backend)
    vals = backend.numpy(code.values)
    code = code.with_values(backend.asarray(with_bad(vals, bad)))
    with pytest.raises(ValueError, match=named(fn.__name__, "code.values")):
        fn(code)


@pytest.mark.parametrize("eps", [0, -1e-6, float("nan"), float("inf")])
def test_sqrt_l1_eps_not_positive(backend, eps):
    with pytest.raises(ValueError, match=named("sqrt_l1", "eps")):
        L.sqrt_l1(_code(backend), eps=eps)


# --- AuxK -------------------------------------------------------------------------------------
def _auxk_args(backend, dtype="float64"):
    r = rng(5)
    dead = np.array([True, False] * (H // 2))
    return dict(
        pre=backend.asarray(r.standard_normal((B, H)), dtype=dtype),
        dead=backend.asarray(dead),
        residual=backend.asarray(r.standard_normal((B, D_)), dtype=dtype),
        W_dec=backend.asarray(r.standard_normal((H, D_)), dtype=dtype),
        k_aux=2,
    )


def _auxk(args, **kw):
    return AK.auxk(args["pre"], args["dead"], args["residual"], args["W_dec"], args["k_aux"], **kw)


def test_auxk_accepts_good_input(backend):
    res = _auxk(_auxk_args(backend))
    assert tuple(res.g_W_dec.shape) == (H, D_)


@pytest.mark.parametrize("shape", [(H + 1, D_), (H, D_ + 1), (D_, H), (H,)],
                         ids=["h", "d", "transposed", "1d"])
def test_auxk_W_dec_wrong_shape(backend, shape):
    args = _auxk_args(backend)
    args["W_dec"] = backend.asarray(np.ones(shape))
    with pytest.raises(ValueError, match=named("auxk", "W_dec")):
        _auxk(args)


@pytest.mark.parametrize("shape", [(B + 1, D_), (B,), (B, D_, 1)], ids=["B", "1d", "3d"])
def test_auxk_residual_wrong_shape(backend, shape):
    args = _auxk_args(backend)
    args["residual"] = backend.asarray(np.ones(shape))
    with pytest.raises(ValueError, match=named("auxk", "residual")):
        _auxk(args)


@pytest.mark.parametrize("shape", [(H,), (1, B, H)], ids=["1d", "3d"])
def test_auxk_pre_wrong_ndim(backend, shape):
    args = _auxk_args(backend)
    args["pre"] = backend.asarray(np.ones(shape))
    with pytest.raises(ValueError, match=named("auxk", "pre")):
        _auxk(args)


@pytest.mark.parametrize(
    "dead",
    [np.ones(H), np.ones(H, dtype=np.int64), np.ones(H + 1, dtype=bool),
     np.ones(H - 1, dtype=bool), np.ones((1, H), dtype=bool)],
    ids=["float", "int", "long", "short", "2d"],
)
def test_auxk_dead_wrong_dtype_or_shape(backend, dead):
    args = _auxk_args(backend)
    args["dead"] = backend.asarray(dead)
    with pytest.raises((TypeError, ValueError), match=named("auxk", "dead")):
        _auxk(args)


@pytest.mark.parametrize("k", [0, -3])
def test_auxk_k_not_positive(backend, k):
    args = _auxk_args(backend)
    args["k_aux"] = k
    with pytest.raises(ValueError, match=named("auxk", "k_aux")):
        _auxk(args)


@pytest.mark.parametrize("k", [2.0, True, "2", None])
def test_auxk_k_not_an_int(backend, k):
    args = _auxk_args(backend)
    args["k_aux"] = k
    with pytest.raises(TypeError, match=named("auxk", "k_aux")):
        _auxk(args)


def test_auxk_normalized_needs_two_rows(backend):
    """One row has no variance about the batch mean: the normalized convention refuses it."""
    args = _auxk_args(backend)
    one = {**args, "pre": args["pre"][:1, :], "residual": args["residual"][:1, :]}
    with pytest.raises(ValueError, match=named("auxk", "residual")):
        _auxk(one, convention="normalized")
    assert float(_auxk(one, convention="authors").value) >= 0.0


@pytest.mark.parametrize("convention", ["openai", "Authors", None])
def test_auxk_unknown_convention(backend, convention):
    with pytest.raises(ValueError, match=named("auxk", "convention")):
        _auxk(_auxk_args(backend), convention=convention)


@pytest.mark.parametrize("which", ["pre", "residual"])
@pytest.mark.parametrize("bad", BAD_VALUES, ids=BAD_IDS)
def test_auxk_nan_inf(backend, which, bad):
    args = _auxk_args(backend)
    args[which] = backend.asarray(with_bad(backend.numpy(args[which]), bad))
    with pytest.raises(ValueError, match=named("auxk", which) + ".*NaN or infinity"):
        _auxk(args)


@pytest.mark.parametrize("which", ["pre", "residual", "W_dec"])
def test_auxk_integer_dtype(backend, which):
    args = _auxk_args(backend)
    args[which] = backend.asarray(backend.numpy(args[which]).astype(np.int64))
    with pytest.raises(TypeError, match=named("auxk", which)):
        _auxk(args)


def test_auxk_empty_batch(backend):
    args = _auxk_args(backend)
    args["pre"] = backend.asarray(np.ones((0, H)))
    args["residual"] = backend.asarray(np.ones((0, D_)))
    with pytest.raises(ValueError, match=named("auxk", "pre")):
        _auxk(args)


@pytest.mark.parametrize("which", ["pre", "residual", "W_dec"])
def test_auxk_mixed_float_dtypes(backend, which):
    args = _auxk_args(backend)
    args[which] = backend.asarray(backend.numpy(args[which]), dtype="float32")
    with pytest.raises(TypeError, match=named("auxk", which)):
        _auxk(args)


# --- SAE: x against params --------------------------------------------------------------------
SAE_OPS = {
    "forward": lambda p, x, c: S.forward(p, x, c),
    "encode": lambda p, x, c: S.encode(p, x, c),
}


@pytest.mark.parametrize("op", list(SAE_OPS))
@pytest.mark.parametrize("shape", [(B, D_ + 1), (B, D_ - 1), (D_,), (1, B, D_)],
                         ids=["d+1", "d-1", "1d", "3d"])
def test_x_wrong_shape_for_params(backend, op, shape):
    x = backend.asarray(np.ones(shape))
    with pytest.raises(ValueError, match=named(op, "x")):
        SAE_OPS[op](make_params(backend), x, BTK)


@pytest.mark.parametrize("op", list(SAE_OPS))
def test_x_integer_dtype(backend, op):
    x = backend.asarray(np.ones((B, D_), dtype=np.int64))
    with pytest.raises(TypeError, match=named(op, "x")):
        SAE_OPS[op](make_params(backend), x, BTK)


@pytest.mark.parametrize("op", list(SAE_OPS))
@pytest.mark.parametrize("bad", BAD_VALUES, ids=BAD_IDS)
def test_x_nan_inf(backend, op, bad):
    x = backend.asarray(with_bad(x_np(), bad))
    with pytest.raises(ValueError, match=named(op, "x") + ".*NaN or infinity"):
        SAE_OPS[op](make_params(backend), x, BTK)


@pytest.mark.parametrize("op", list(SAE_OPS))
def test_x_empty_batch(backend, op):
    with pytest.raises(ValueError, match=named(op, "x")):
        SAE_OPS[op](make_params(backend), backend.asarray(np.ones((0, D_))), BTK)


@pytest.mark.parametrize("name", ["W_enc", "b_enc", "W_dec", "b_dec", "theta"])
def test_params_integer_dtype(backend, name):
    ints = np_params()[name].astype(np.int64)
    params = make_params(backend, **{name: ints})
    with pytest.raises(TypeError, match=named("forward", name)):
        S.forward(params, backend.asarray(x_np()), JUMP)


@pytest.mark.parametrize(
    "name,shape",
    [("W_dec", (D_, H)), ("W_dec", (H, D_ + 1)), ("W_dec", (H + 1, D_)), ("b_enc", (H + 1,)),
     ("b_enc", (1, H)), ("b_dec", (D_ + 1,)), ("theta", (H - 1,)), ("theta", (H + 1,)),
     ("W_enc", (D_ * H,))],
    ids=["W_dec-T", "W_dec-d", "W_dec-h", "b_enc-long", "b_enc-2d", "b_dec-long",
         "theta-short", "theta-long", "W_enc-1d"],
)
def test_params_shape_mismatch(backend, name, shape):
    params = make_params(backend, **{name: np.ones(shape)})
    with pytest.raises(ValueError, match=named("forward", name)):
        S.forward(params, backend.asarray(x_np()), JUMP)


@pytest.mark.parametrize("bad", [0.0, -0.5], ids=["zero", "negative"])
def test_forward_jumprelu_theta_not_positive(backend, bad):
    theta = np.full(H, 0.1)
    theta[1] = bad
    with pytest.raises(ValueError, match=named("forward", "theta")):
        S.forward(make_params(backend, theta=theta), backend.asarray(x_np()), JUMP)


@pytest.mark.parametrize("bad", BAD_VALUES, ids=BAD_IDS)
def test_forward_jumprelu_theta_nan_inf(backend, bad):
    # BUG (inf): sae._check_params checks theta's dtype, shape and ``theta > 0`` but not that it
    # is finite, so +inf passes (jumprelu() itself rejects it); NaN is caught by the > 0 check.
    theta = with_bad(np.full(H, 0.1), bad)
    with pytest.raises(ValueError, match=named("forward", "theta")):
        S.forward(make_params(backend, **{"theta": theta}), backend.asarray(x_np()), JUMP)


def test_forward_jumprelu_needs_theta(backend):
    with pytest.raises(ValueError, match=r"^forward\b.*theta"):
        S.forward(make_params(backend, with_theta=False), backend.asarray(x_np()), JUMP)


@pytest.mark.parametrize("act", ["topk", "batchtopk"])
def test_forward_k_greater_than_h(backend, act):
    with pytest.raises(ValueError, match=named("forward", "config.k")):
        S.forward(make_params(backend), backend.asarray(x_np()), S.SAEConfig(act, k=H + 1))


@pytest.mark.parametrize("name", ["x", "W_enc", "b_enc", "W_dec", "b_dec", "theta"])
def test_forward_mixed_float32_float64(backend, name):
    p = {k: backend.asarray(v) for k, v in np_params().items()}
    x = backend.asarray(x_np())
    if name == "x":
        x = backend.asarray(x_np(), dtype="float32")
    else:
        p[name] = backend.asarray(np_params()[name], dtype="float32")
    with pytest.raises(TypeError, match=named("forward", name)):
        S.forward(S.SAEParams(**p), x, JUMP)


def test_forward_all_float32_accepted(backend):
    params = make_params(backend, dtype=np.float32)
    fwd = S.forward(params, backend.asarray(x_np(), dtype="float32"), BTK)
    assert fwd.x_hat.dtype == backend.xp.float32


def test_forward_params_and_config_types(backend):
    x = backend.asarray(x_np())
    with pytest.raises(TypeError, match=named("forward", "params")):
        S.forward(np_params(), x, BTK)
    with pytest.raises(TypeError, match=named("forward", "config")):
        S.forward(make_params(backend), x, "batchtopk")


def test_decode_code_wrong_h(backend):
    params = make_params(backend)
    code = A.relu(backend.asarray(pre_np(h=H + 1)))
    with pytest.raises(ValueError, match=named("decode", "code")):
        S.decode(params, code)
    with pytest.raises(TypeError, match=named("decode", "code")):
        S.decode(params, backend.asarray(pre_np()))


def test_backward_g_xhat_wrong_shape(backend):
    params = make_params(backend)
    fwd = S.forward(params, backend.asarray(x_np()), BTK)
    with pytest.raises(ValueError, match=named("backward", "g_xhat")):
        S.backward(params, fwd, backend.asarray(np.ones((B, D_ + 1))))


def test_backward_g_code_wrong_shape(backend):
    params = make_params(backend)
    fwd = S.forward(params, backend.asarray(x_np()), BTK)
    g = backend.asarray(np.ones((B, D_)))
    with pytest.raises(ValueError, match=named("backward", "g_code")):
        S.backward(params, fwd, g, g_code=backend.asarray(np.ones(fwd.code.nnz + 1)))


def test_backward_g_xhat_mixed_float_dtype(backend):
    # BUG: backward never checks that g_xhat shares the params' dtype. numpy and strict
    # promote silently; torch fails deep inside with "RuntimeError: expected scalar type Float
    # but found Double" (index_add_ in TorchBackend.spmm), naming no argument.
    params = make_params(backend)
    fwd = S.forward(params, backend.asarray(x_np()), BTK)
    g = backend.asarray(np.ones((B, D_)), dtype="float32")
    with pytest.raises(TypeError, match=named("backward", "g_xhat")):
        S.backward(params, fwd, g)


# --- SAEConfig ----------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["gelu", "TopK", "batch_topk", "", None])
def test_config_unknown_activation(activation):
    with pytest.raises(ValueError, match=named("SAEConfig", "activation")):
        S.SAEConfig(activation, k=2)


@pytest.mark.parametrize("act", ["topk", "batchtopk"])
@pytest.mark.parametrize("k", [0, -1])
def test_config_k_not_positive(act, k):
    with pytest.raises(ValueError, match=named("SAEConfig", "k")):
        S.SAEConfig(act, k=k)


@pytest.mark.parametrize("act", ["topk", "batchtopk"])
@pytest.mark.parametrize("k", [2.0, True, None, "2"])
def test_config_k_not_an_int(act, k):
    with pytest.raises(TypeError, match=named("SAEConfig", "k")):
        S.SAEConfig(act, k=k)


def test_config_threshold_needs_theta():
    with pytest.raises(ValueError, match=named("SAEConfig", "theta")):
        S.SAEConfig("threshold")


@pytest.mark.parametrize("theta", [float("nan"), float("inf"), "0.1"], ids=["nan", "inf", "str"])
def test_config_threshold_theta_invalid(theta):
    # BUG: SAEConfig never checks theta's value: NaN/inf are accepted and forward() runs with
    # them (keeping nothing), a string fails later inside xp.asarray; threshold() rejects all.
    with pytest.raises((TypeError, ValueError), match=named("SAEConfig", "theta")):
        S.SAEConfig("threshold", theta=theta)


# --- standardize / init_params ------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(D_,), (1, B, D_), (B, 1)], ids=["1d", "3d", "d=1"])
def test_standardize_wrong_shape(backend, shape):
    with pytest.raises(ValueError, match=named("standardize", "x")):
        S.standardize(backend.asarray(np.ones(shape)))


def test_standardize_integer(backend):
    with pytest.raises(TypeError, match=named("standardize", "x")):
        S.standardize(backend.asarray(np.ones((B, D_), dtype=np.int64)))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("bad", BAD_VALUES, ids=BAD_IDS)
def test_standardize_nan_inf(backend, bad):
    # BUG: standardize (public) has no finite check, unlike every other op taking x.
    with pytest.raises(ValueError, match=named("standardize", "x")):
        S.standardize(backend.asarray(with_bad(x_np(), bad)))


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")
def test_standardize_empty_batch(backend):
    # BUG: standardize (public) has no empty-batch check, unlike every other op taking x.
    with pytest.raises(ValueError, match=named("standardize", "x")):
        S.standardize(backend.asarray(np.ones((0, D_))))


@pytest.mark.parametrize("arg,value,exc", [
    ("d", 0, ValueError), ("h", 0, ValueError), ("h", -4, ValueError),
    ("h", 4.0, TypeError), ("d", True, TypeError),
])
def test_init_params_bad_sizes(backend, arg, value, exc):
    sizes = {"d": D_, "h": H, arg: value}
    with pytest.raises(exc, match=named("init_params", arg)):
        S.init_params(sizes["d"], sizes["h"], xp=backend.xp, device=backend.device)


def test_init_params_unknown_stream(backend):
    with pytest.raises(ValueError, match="stream"):
        S.init_params(D_, H, xp=backend.xp, device=backend.device, stream="gpu")


# --- decoder ------------------------------------------------------------------------------------
def test_decoder_ops(backend):
    W = backend.asarray(rng(7).standard_normal((H, D_)))
    with pytest.raises(ValueError, match=named("renormalize", "W_dec")):
        D.renormalize(backend.asarray(np.ones(H)))
    with pytest.raises(TypeError, match=named("renormalize", "W_dec")):
        D.renormalize(backend.asarray(np.ones((H, D_), dtype=np.int64)))
    with pytest.raises(ValueError, match=named("project_grad", "g_W_dec")):
        D.project_grad(W, backend.asarray(np.ones((H, D_ + 1))))
    with pytest.raises(ValueError, match=named("constrained_step", "g_W_dec")):
        D.constrained_step(W, backend.asarray(np.ones((H + 1, D_))), lambda w, g: w - g)
    with pytest.raises(ValueError, match=named("constrained_step", "order")):
        D.constrained_step(W, W, lambda w, g: w - g, order="during")


# --- two libraries, two devices -----------------------------------------------------------------
def _mixed_cases(backend, make_other):
    """(op, argument that differs, call) with one argument from elsewhere."""
    params = make_params(backend)
    x = backend.asarray(x_np())
    pre = backend.asarray(pre_np())
    theta = np.full(H, 0.1)
    aux = _auxk_args(backend)
    other_params = S.SAEParams(**{k: make_other(v) for k, v in np_params().items()})
    return [
        ("forward", "x", lambda: S.forward(params, make_other(x_np()), BTK)),
        ("forward", "W_enc", lambda: S.forward(other_params, x, BTK)),
        ("mse", "x", lambda: L.mse(x, make_other(x_np()))),
        ("nmse", "x_hat", lambda: L.nmse(make_other(x_np()), x)),
        ("jumprelu", "theta", lambda: A.jumprelu(pre, make_other(theta))),
        ("threshold", "theta", lambda: A.threshold(pre, make_other(theta))),
        ("jumprelu_l0", "theta", lambda: L.jumprelu_l0(pre, make_other(theta), 0.01)),
        ("auxk", "W_dec", lambda: AK.auxk(aux["pre"], aux["dead"], aux["residual"],
                                         make_other(np.ones((H, D_))), 2)),
        ("auxk", "dead", lambda: AK.auxk(aux["pre"], make_other(np.ones(H, dtype=bool)),
                                        aux["residual"], aux["W_dec"], 2)),
        ("l1", "W_dec", lambda: L.l1(_code(backend), make_other(np.ones((H, D_))))),
        ("project_grad", "g_W_dec", lambda: D.project_grad(
            backend.asarray(np.ones((H, D_))), make_other(np.ones((H, D_))))),
    ]


CASE_IDS = ["forward-x", "forward-params", "mse", "nmse", "jumprelu", "threshold",
            "jumprelu_l0", "auxk-W_dec", "auxk-dead", "l1", "project_grad"]


@pytest.mark.parametrize("i", range(len(CASE_IDS)), ids=CASE_IDS)
def test_arrays_from_two_libraries(backend, i):
    op, arg, call = _mixed_cases(backend, lambda a: foreign(backend, a))[i]
    with pytest.raises(TypeError, match=rf"^{op}\b.*one array library.*'{arg}'"):
        call()


def test_two_libraries_message(backend):
    with pytest.raises(TypeError, match=r"one array library"):
        L.mse(backend.asarray(x_np()), foreign(backend, x_np()))


@pytest.mark.parametrize("i", range(len(CASE_IDS)), ids=CASE_IDS)
def test_arrays_on_two_devices(backend, i):
    if backend.name not in ("strict", "torch", "torch-gpu-path"):
        pytest.skip(f"{backend.name}: one device")
    op, arg, call = _mixed_cases(backend, lambda a: other_device(backend, a))[i]
    with pytest.raises(ValueError, match=rf"^{op}\b.*one device.*'{arg}'"):
        call()


# --- no_checks ----------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_no_checks_skips_only_nan_inf(backend):
    nan_pre = backend.asarray(with_bad(pre_np(), np.nan))
    inf_x = backend.asarray(with_bad(x_np(), np.inf))
    x = backend.asarray(x_np())
    params = make_params(backend)
    aux = _auxk_args(backend)
    nan_theta = backend.asarray(with_bad(np.full(H, 0.1), np.nan))
    with sae_ref.no_checks():
        # value checks off: these now run
        A.relu(nan_pre)
        A.threshold(backend.asarray(pre_np()), nan_theta)
        L.mse(inf_x, x)
        L.nmse(x, inf_x)
        S.forward(params, inf_x, S.SAEConfig("relu"))
        AK.auxk(aux["pre"], aux["dead"], backend.asarray(with_bad(x_np(), np.inf)),
                aux["W_dec"], 2)
        # every other check stays on
        with pytest.raises(ValueError, match=named("relu", "pre")):
            A.relu(backend.asarray(np.full((H,), np.nan)))
        with pytest.raises(ValueError, match=named("relu", "pre")):
            A.relu(backend.asarray(np.ones((0, H))))
        with pytest.raises(TypeError, match=named("relu", "pre")):
            A.relu(backend.asarray(np.ones((B, H), dtype=np.int64)))
        with pytest.raises(ValueError, match=named("topk", "k")):
            A.topk(nan_pre, H + 1)
        with pytest.raises(ValueError, match=named("mse", "x_hat")):
            L.mse(backend.asarray(np.full((B, D_ + 1), np.nan)), x)
        with pytest.raises(ValueError, match=named("mse", "unit")):
            L.mse(inf_x, x, unit="batch")
        with pytest.raises(ValueError, match=named("forward", "x")):
            S.forward(params, backend.asarray(np.full((B, D_ + 1), np.inf)), BTK)
        with pytest.raises(ValueError, match=named("forward", "W_dec")):
            S.forward(make_params(backend, W_dec=np.ones((D_, H))), x, BTK)
        with pytest.raises(TypeError, match=named("forward", "x")):
            S.forward(params, backend.asarray(x_np(), dtype="float32"), BTK)
        with pytest.raises(ValueError, match=named("auxk", "W_dec")):
            AK.auxk(aux["pre"], aux["dead"], aux["residual"], backend.asarray(np.ones((H + 1, D_))), 2)
        with pytest.raises(TypeError, match=named("auxk", "dead")):
            AK.auxk(aux["pre"], backend.asarray(np.ones(H)), aux["residual"], aux["W_dec"], 2)
        with pytest.raises(ValueError, match=named("jumprelu", "theta")):
            A.jumprelu(backend.asarray(pre_np()), backend.asarray(np.zeros(H) - 1.0))
        with pytest.raises(TypeError, match=r"one array library"):
            L.mse(x, foreign(backend, x_np()))
    # and the value checks are back after the block
    with pytest.raises(ValueError, match=named("relu", "pre")):
        A.relu(nan_pre)


def test_no_checks_restored_after_exception(backend):
    nan_pre = backend.asarray(with_bad(pre_np(), np.nan))
    with pytest.raises(RuntimeError):
        with sae_ref.no_checks():
            raise RuntimeError("boom")
    with pytest.raises(ValueError, match=named("relu", "pre")):
        A.relu(nan_pre)


def test_no_checks_nested(backend):
    nan_pre = backend.asarray(with_bad(pre_np(), np.nan))
    with sae_ref.no_checks():
        with sae_ref.no_checks():
            A.relu(nan_pre)
        A.relu(nan_pre)  # the inner block's exit does not switch the checks back on
    with pytest.raises(ValueError, match=named("relu", "pre")):
        A.relu(nan_pre)


def test_sparse_code_concat_shape_mismatch(backend):
    a = A.relu(backend.asarray(pre_np()))
    b = A.relu(backend.asarray(pre_np(h=H + 1)))
    with pytest.raises(ValueError, match="concat"):
        a.concat(b)
    assert isinstance(a.concat(a), SparseCode)
