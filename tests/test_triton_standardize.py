"""The per-row standardisation with the encoder's centred input as one fused Triton kernel
(``_triton_standardize``).

- float64: the standardised rows, the rows' means and scales and the centred input equal their
  definitions (NumPy, float64) to float64 rounding; a row of one column gives NaN scales as the
  composed form does (a sample deviation of one value);
- float32: they equal the float64 definitions to float32 rounding;
- the torch backend on the GPU path runs the kernel and gives what its composed form gives;
  without a bias it runs the composed form.

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

from sae_ref.backends import StandardBackend, get_backend, sync_free, triton_kernels  # noqa: E402
from sae_ref.backends import _triton_standardize as Z  # noqa: E402
from triton_devices import DEVICES, counting  # noqa: E402

EPS = 1e-5


@st.composite
def batches(draw):
    B, d = draw(st.integers(1, 30)), draw(st.integers(2, 70))
    r = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = r.standard_normal((B, d)) * draw(st.sampled_from([1e-3, 1.0, 1e3])) + draw(st.sampled_from([0.0, 5.0]))
    return x, r.standard_normal(d)


def _definitions(x, b):
    mean = x.mean(axis=1, keepdims=True)
    scale = np.sqrt(((x - mean) ** 2).sum(axis=1, keepdims=True) / (x.shape[1] - 1)) + EPS
    s = (x - mean) / scale
    return s, mean, scale, s - b


def _fused(x, b, dtype, device):
    t = lambda a: torch.as_tensor(a).to(device=device, dtype=dtype)
    return [o.cpu().double().numpy() for o in Z.standardize(t(x), t(b), EPS)]


@DEVICES
@given(problem=batches())
@settings(max_examples=25)
def test_fused_standardize_equals_its_definitions_float64(device, problem):
    for name, a, w in zip(("x_std", "mean", "scale", "x_c"), _fused(*problem, torch.float64, device),
                          _definitions(*problem)):
        np.testing.assert_allclose(a, w, rtol=1e-12, atol=1e-12 * np.abs(problem[0]).max(), err_msg=name)


@DEVICES
@given(problem=batches())
@settings(max_examples=15)
def test_fused_standardize_float32_matches_float64_definitions_to_float32_rounding(device, problem):
    x, b = (a.astype(np.float32).astype(np.float64) for a in problem)  # inputs both see
    got = _fused(x, b, torch.float32, device)
    want = _definitions(x, b)
    ulp, d = float(np.finfo(np.float32).eps), x.shape[1]
    spread = np.abs(x).max(axis=1, keepdims=True)  # the sums' terms are at most this
    np.testing.assert_array_less(np.abs(got[1] - want[1]), 4 * d * ulp * spread + 1e-30)
    rel = 8 * d * ulp * spread / want[2]  # the centred values' error, relative to the scale
    np.testing.assert_array_less(np.abs(got[2] - want[2]), rel * want[2] + 1e-30)
    np.testing.assert_array_less(np.abs(got[0] - want[0]), 3 * rel * (np.abs(want[0]) + 1))
    np.testing.assert_array_less(np.abs(got[3] - want[3]), 3 * rel * (np.abs(want[0]) + 1) + 2 * ulp * np.abs(want[3]))


@DEVICES
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0 / 0 in the interpreter
def test_fused_standardize_of_one_column_gives_nan_scales_as_the_composed_form(device):
    x, b = torch.ones((3, 1), dtype=torch.float64, device=device), torch.zeros(1, dtype=torch.float64, device=device)
    got = Z.standardize(x, b, EPS)
    want = StandardBackend.standardize(get_backend(torch), x, b, EPS)
    assert torch.isnan(got[2]).all() and torch.isnan(want[2]).all()


def test_torch_backend_on_the_gpu_path_runs_the_kernel_and_equals_composed(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors need Triton's interpreter")
    r = np.random.default_rng(5)
    x, b = torch.as_tensor(r.standard_normal((7, 11))), torch.as_tensor(r.standard_normal(11))
    calls = counting(monkeypatch, Z, "standardize")
    be = get_backend(torch)
    with sync_free(True), triton_kernels(True):
        got = be.standardize(x, b, EPS)
        want = StandardBackend.standardize(be, x, b, EPS)
        assert be.standardize(x, None, EPS)[3] is None  # no bias: the composed form
    assert calls == ["standardize"]
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-12)
