"""The training step's decoding with its squared error as one fused Triton kernel
(``_triton_decode``).

- float64: the residual ``f W + b - x``, its scaled copy, its sum of squares and the input's equal their
  definitions (NumPy, float64) to float64 rounding, with padded entries (value 0), rows
  without entries, codes without entries and rows longer than a program's tile of entries;
- float32: they equal the float64 definitions to float32 rounding;
- a second run gives the same bits;
- on every backend the composed form gives the bits of the decoding followed by the MSE's
  own passes (what the training step computed before the fused form);
- the torch backend on the GPU path runs the kernel, into the caller's buffer, and gives
  what its composed form gives.

Runs on CPU tensors under Triton's interpreter and, with a GPU, on CUDA.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from sae_ref import losses as L  # noqa: E402
from sae_ref.backends import StandardBackend, get_backend, sync_free, triton_kernels  # noqa: E402
from sae_ref.backends import _triton_decode as K  # noqa: E402
from triton_devices import DEVICES, counting  # noqa: E402


@st.composite
def problems(draw):
    """``(rows, cols, values, W, b, x, scale)``: a code (row-major, unique places; some values
    0, some rows empty, maybe no entries at all) with float64 NumPy arrays."""
    B, h, d = draw(st.integers(1, 20)), draw(st.integers(1, 40)), draw(st.integers(1, 40))
    r = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    mask = r.random((B, h)) < density * r.random(B)[:, None] * 2  # some rows long, some empty
    rows, cols = (np.ascontiguousarray(a) for a in np.nonzero(mask))
    values = r.standard_normal(rows.shape[0])
    values[r.random(values.shape[0]) < 0.2] = 0.0
    W, b, x = r.standard_normal((h, d)), r.standard_normal(d), r.standard_normal((B, d))
    return rows, cols, values, W, b, x, float(draw(st.sampled_from([1.0, 2.0 / (B * d), 0.3])))


def _definitions(rows, cols, values, W, b, x, scale):
    x_hat = np.tile(b, (x.shape[0], 1))
    np.add.at(x_hat, rows, values[:, None] * W[cols])
    r = x_hat - x
    return r, scale * r, np.sum(r * r), np.sum(x * x)


def _fused(problem, dtype, device):
    rows, cols, values, W, b, x, scale = problem
    t = lambda a, dt=dtype: torch.as_tensor(a).to(device=device, dtype=dt)
    out = K.decode_residual(t(rows, torch.int64), t(cols, torch.int64), t(values), t(W), t(b), t(x), scale)
    return [o.cpu().double().numpy() for o in out]


@DEVICES
@given(problem=problems())
@settings(max_examples=25)
def test_fused_decode_residual_equals_its_definitions_float64(device, problem):
    for name, a, b in zip(("r", "g", "ss", "xx"), _fused(problem, torch.float64, device), _definitions(*problem)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=name)


@DEVICES
@given(problem=problems())
@settings(max_examples=15)
def test_fused_decode_residual_float32_matches_float64_definitions_to_float32_rounding(device, problem):
    rows, cols, *arrays, scale = problem
    arrays = [a.astype(np.float32).astype(np.float64) for a in arrays]  # inputs both see
    problem = (rows, cols, *arrays, scale)
    r, g, ss, xx = _fused(problem, torch.float32, device)
    want_r, want_g, want_ss, want_xx = _definitions(*problem)
    values, W, b, x = arrays
    # float32 sums of at most h + 2 terms: within a few (h + 2) ulps of the sums of magnitudes
    mag = np.abs(np.tile(b, (x.shape[0], 1))) + np.abs(x)
    np.add.at(mag, rows, np.abs(values)[:, None] * np.abs(W[cols]))
    ulp = float(np.finfo(np.float32).eps)
    bound = 2 * (W.shape[0] + 2) * ulp * mag
    assert np.all(np.abs(r - want_r) <= bound)
    assert np.all(np.abs(g - want_g) <= bound * abs(scale) + 2 * ulp * np.abs(want_g))
    # the sum of B d squares, each off by its r's error
    assert abs(ss - want_ss) <= np.sum(2 * np.abs(want_r) * bound + bound**2) + 2 * r.size * ulp * want_ss
    assert abs(xx - want_xx) <= 2 * x.size * ulp * want_xx


@DEVICES
@given(problem=problems())
@settings(max_examples=10)
def test_fused_decode_residual_repeats_bit_for_bit(device, problem):
    for a, b in zip(_fused(problem, torch.float32, device), _fused(problem, torch.float32, device)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("unit", ["element", "sample"])
def test_composed_decode_residual_gives_the_bits_of_the_decoding_then_the_mse(backend, unit):
    """The training step's former passes: x_hat = f W + b (:func:`sae_ref.sae._decode`),
    then the MSE's residual, sum of squares and scaled gradient (:func:`sae_ref.losses._mse`)."""
    from sae_ref.sae import SAEParams, _decode
    from sae_ref.sparse import SparseCode

    rows, cols, values, W, b, x, _ = _fixed_problem()
    xp = backend.xp
    to = lambda a, dt=None: backend.asarray(a, dt)
    code = SparseCode(to(rows, "int64"), to(cols, "int64"), to(values, "float32"), (x.shape[0], W.shape[0]))
    params = SAEParams(W_enc=to(W.T, "float32"), b_enc=to(np.zeros(W.shape[0]), "float32"),
                       W_dec=to(W, "float32"), b_dec=to(b, "float32"))
    X = to(x, "float32")
    n = L._mse_count(X, unit)
    be = get_backend(xp)
    r, g, ss, xx = StandardBackend.decode_residual(be, code.rows, code.cols, code.values, params.W_dec,
                                                   params.b_dec, X, 2.0 / n)
    x_hat = _decode(xp, params, code)
    mse, g_want = L._mse(xp, x_hat, X, unit)
    np.testing.assert_array_equal(backend.numpy(g), backend.numpy(g_want))
    np.testing.assert_array_equal(backend.numpy(ss / n), backend.numpy(mse))
    np.testing.assert_array_equal(backend.numpy(r), backend.numpy(_decode(xp, params, code) - X))
    flat = xp.reshape(X, (-1,))  # the NMSE's denominator as the step took it
    np.testing.assert_array_equal(backend.numpy(xx), backend.numpy(xp.vecdot(flat, flat)))


def _fixed_problem():
    r = np.random.default_rng(11)
    B, h, d = 9, 13, 7
    rows, cols = (np.ascontiguousarray(a) for a in np.nonzero(r.random((B, h)) < 0.3))
    return (rows, cols, r.standard_normal(rows.shape[0]), r.standard_normal((h, d)), r.standard_normal(d),
            r.standard_normal((B, d)), 1.0)


def test_torch_backend_on_the_gpu_path_runs_the_kernel_into_the_buffer_and_equals_composed(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors need Triton's interpreter")
    rows, cols, values, W, b, x, _ = (torch.as_tensor(a) for a in _fixed_problem())
    calls = counting(monkeypatch, K, "decode_residual")
    be = get_backend(torch)
    buf = torch.full(x.shape, float("nan"), dtype=torch.float64)
    with sync_free(True), triton_kernels(True):
        got = be.decode_residual(rows, cols, values, W, b, x, 0.25, out=buf)
        want = StandardBackend.decode_residual(be, rows, cols, values, W, b, x, 0.25)
    assert calls == ["decode_residual"]
    assert got[0] is buf
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-12)
