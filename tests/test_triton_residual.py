"""AuxK's loss against the residual as one fused Triton kernel (``_triton_residual``).

- float64: the sum of squares of ``e + residual`` and the gradient ``scale (e + residual)``
  equal their NumPy definitions to float64 rounding; with ``on`` false the gradient is
  exactly 0 and the sum the same;
- float32: within float32 rounding of the float64 definitions;
- the torch backend on the GPU path runs the kernel and gives what its composed form gives.

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
from sae_ref.backends import _triton_residual as K  # noqa: E402
from triton_devices import DEVICES, counting  # noqa: E402


@st.composite
def problems(draw):
    B, d = draw(st.integers(1, 40)), draw(st.integers(1, 50))
    r = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return r.standard_normal((B, d)), r.standard_normal((B, d)), float(draw(st.sampled_from([1.0, 0.37, 2 / (B * d)])))


def _fused(e, res, scale, on, dtype, device):
    t = lambda a: torch.tensor(a, dtype=dtype, device=device)  # a copy: the kernel writes into e
    ss, g = K.aux_residual(t(e), t(res), scale, torch.tensor(on, device=device))
    return float(ss), g.cpu().double().numpy()


@DEVICES
@given(problem=problems(), on=st.booleans())
@settings(max_examples=25)
def test_fused_aux_residual_equals_its_definitions_float64(device, problem, on):
    e, res, scale = problem
    ss, g = _fused(e, res, scale, on, torch.float64, device)
    r = e + res
    np.testing.assert_allclose(ss, np.sum(r * r), rtol=1e-12)
    if on:
        np.testing.assert_allclose(g, scale * r, rtol=1e-12, atol=1e-15)
    else:
        assert np.array_equal(g, np.zeros_like(r)) and not np.signbit(g).any()


@DEVICES
@given(problem=problems())
@settings(max_examples=15)
def test_fused_aux_residual_float32_matches_float64_definitions_to_float32_rounding(device, problem):
    e, res, scale = (a.astype(np.float32).astype(np.float64) if isinstance(a, np.ndarray) else a for a in problem)
    ss, g = _fused(e, res, scale, True, torch.float32, device)
    r = e + res
    ulp = float(np.finfo(np.float32).eps)
    assert abs(ss - np.sum(r * r)) <= 4 * r.size * ulp * np.sum(r * r) + 1e-30
    assert np.all(np.abs(g - scale * r) <= 3 * ulp * (np.abs(e) + np.abs(res)) * scale)


def test_torch_backend_on_the_gpu_path_runs_the_kernel_and_equals_composed(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors need Triton's interpreter")
    calls = counting(monkeypatch, K, "aux_residual")
    r = np.random.default_rng(2)
    e, res = r.standard_normal((6, 5)), r.standard_normal((6, 5))
    be = get_backend(torch)
    for on in (True, False):
        with sync_free(True), triton_kernels(True):
            got = be.aux_residual(torch.tensor(e), torch.tensor(res), 0.5, torch.tensor(on))
        want = StandardBackend.aux_residual(be, torch.tensor(e), torch.tensor(res), 0.5, torch.tensor(on))
        for a, w in zip(got, want):
            torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-15)
    assert calls == ["aux_residual", "aux_residual"]
