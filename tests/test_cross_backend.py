"""The whole SAE (forward and backward) agrees across backends, and half precision runs on torch.

Inputs are drawn once with NumPy; every backend gets the identical arrays. The encoder GEMM
may round differently per library (BLAS summation order), so these tests only use draws whose
pre-activations keep a clear gap at every cut: then the selections must be bit-for-bit equal
and the values equal to float32 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from sae_ref import SAEConfig, SAEParams, backward, forward, losses
from sae_ref.validation.strategies import sae_problems

ACTS = ["relu", "topk", "batchtopk", "jumprelu", "threshold"]


def _config(act, h):
    return SAEConfig(act, k=max(1, min(3, h)), theta=0.05, bandwidth=0.05)


def _gap_ok(x, p, act, k, margin=1e-3):
    """True when no pre-activation sits within ``margin`` of any cut (float64 oracle)."""
    pre = (x.astype(np.float64) - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    cuts = [0.0]
    if act == "batchtopk":
        flat = np.sort(pre.ravel())[::-1]
        cuts.append(flat[min(pre.shape[0] * k, flat.size) - 1])
    if act == "jumprelu":
        return np.min(np.abs(pre - p["theta"])) > margin and np.min(np.abs(pre)) > margin
    if act == "threshold":
        cuts.append(0.05)
    if act == "topk":
        s = np.sort(pre, axis=1)[:, ::-1]
        kk = min(k, pre.shape[1])
        ok = np.all(np.abs(pre - s[:, kk - 1 : kk]) > margin, where=pre != s[:, kk - 1 : kk])
        return bool(ok) and np.min(np.abs(pre)) > margin
    return all(np.min(np.abs(pre - c)[pre != c]) > margin for c in cuts) and np.min(np.abs(pre)) > margin


def _run(backend, x, p, cfg, g):
    params = SAEParams(**{n: backend.asarray(a, np.float32) for n, a in p.items()})
    fwd = forward(params, backend.asarray(x, np.float32), cfg)
    grads = backward(params, fwd, backend.asarray(g, np.float32))
    code = fwd.code
    out = {
        "rows": backend.numpy(code.rows), "cols": backend.numpy(code.cols),
        "values": backend.numpy(code.values), "x_hat": backend.numpy(fwd.x_hat),
    }
    out.update({f"g_{n}": backend.numpy(a) for n, a in grads.arrays().items()})
    return out


@pytest.mark.parametrize("act", ACTS)
@given(problem=sae_problems(max_batch=8, max_d=10, max_h=32), seed=st.integers(0, 2**16))
def test_sae_forward_and_backward_agree_across_backends(all_backends, act, problem, seed):
    """Identical selections (bit for bit) and float32-close values and gradients on every backend."""
    x, p = problem
    cfg = _config(act, p["W_enc"].shape[1])
    assume(_gap_ok(x, p, act, cfg.k))
    g = np.random.default_rng(seed).standard_normal(x.shape)
    ref = _run(all_backends[0], x, p, cfg, g)
    for b in all_backends[1:]:
        got = _run(b, x, p, cfg, g)
        np.testing.assert_array_equal(got["rows"], ref["rows"], err_msg=b.name)
        np.testing.assert_array_equal(got["cols"], ref["cols"], err_msg=b.name)
        for key in ref:
            if key not in ("rows", "cols"):
                scale = max(1.0, float(np.max(np.abs(ref[key]), initial=0.0)))
                np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=2e-6 * scale,
                                           err_msg=f"{b.name} {key}")


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("act", ACTS)
def test_half_precision_forward_selects_as_float32_on_the_same_values(act, dtype_name):
    """torch float16/bfloat16: the forward keeps the dtype; its selection equals the float32
    selection of the same (half-precision) pre-activations, and its decode equals the float32
    decode of the same code to half precision."""
    torch = pytest.importorskip("torch")
    from sae_ref.sae import _select, _decode
    from array_api_compat import array_namespace

    rng = np.random.default_rng(3)
    d, h, B = 16, 48, 12
    W_enc = rng.standard_normal((d, h)) / np.sqrt(d)
    W_dec = rng.standard_normal((h, d))
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    p = {"W_enc": W_enc, "b_enc": np.zeros(h), "W_dec": W_dec, "b_dec": 0.1 * np.ones(d),
         "theta": np.full(h, 0.3)}
    cfg = _config(act, h)
    dt = getattr(torch, dtype_name)
    params16 = SAEParams(**{n: torch.asarray(a, dtype=dt) for n, a in p.items()})
    fwd16 = forward(params16, torch.asarray(rng.standard_normal((B, d)), dtype=dt), cfg)
    assert fwd16.x_hat.dtype == dt and fwd16.code.values.dtype == dt and fwd16.pre.dtype == dt
    params32 = params16.map(lambda a: a.float())
    xp = array_namespace(fwd16.pre)
    code32 = _select(xp, fwd16.pre.float(), cfg, params32, fwd16.x.float())
    assert torch.equal(fwd16.code.rows, code32.rows) and torch.equal(fwd16.code.cols, code32.cols)
    assert torch.equal(fwd16.code.values.float(), code32.values)
    x_hat32 = _decode(xp, params32, code32)
    tol = 0.02 if dtype_name == "bfloat16" else 0.004
    assert (fwd16.x_hat.float() - x_hat32).abs().max().item() <= tol * max(1.0, x_hat32.abs().max().item())
    mse16, _ = losses.mse(fwd16.x_hat, fwd16.x)
    assert mse16.dtype == dt and bool(torch.isfinite(mse16))
