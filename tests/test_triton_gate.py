"""AuxK's gradient on its dense block as one fused Triton kernel (``_triton_gate``): ``P``
where ``a`` is positive, else 0 (signed zeros and negative ``a`` dropped, ``P``'s own signed
zeros kept), and the result's column sums, against the composed form (the values exactly, the
sums to rounding) and the float64 definition; a second run gives the same bits. The torch
backend on the GPU path runs it.

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
from sae_ref.backends import _triton_gate as K  # noqa: E402
from triton_devices import DEVICES, counting  # noqa: E402


@st.composite
def blocks(draw):
    B, n = draw(st.integers(1, 1100)), draw(st.integers(1, 70))
    r = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = r.choice(np.array([-1.0, -0.0, 0.0, 0.5, 2.0]), size=(B, n)) * (r.random((B, n)) < 0.5)
    return r.standard_normal((B, n)), a


@DEVICES
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@given(problem=blocks())
@settings(max_examples=15)
def test_fused_gate_equals_the_composed_form_and_the_definition(device, dtype, problem):
    P_np, a_np = problem
    P, a = (torch.tensor(x, dtype=dtype, device=device) for x in (P_np, a_np))
    g, sums = K.gate(P, a)
    want_g, want_sums = StandardBackend.gate(get_backend(torch), P, a)
    assert torch.equal(g, want_g)
    definition = np.where(a_np > 0, P.cpu().double().numpy(), 0.0).sum(axis=0)
    eps = float(torch.finfo(dtype).eps)
    mag = np.abs(P.cpu().double().numpy()).sum(axis=0)
    np.testing.assert_array_less(np.abs(sums.cpu().double().numpy() - definition), 2 * P.shape[0] * eps * mag + 1e-300)
    np.testing.assert_allclose(sums.cpu().double().numpy(), want_sums.cpu().double().numpy(),
                               rtol=0, atol=float(2 * P.shape[0] * eps * mag.max()))
    again = K.gate(P, a)
    assert torch.equal(again[0], g) and torch.equal(again[1], sums)


def test_torch_backend_on_the_gpu_path_runs_the_kernel(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors need Triton's interpreter")
    calls = counting(monkeypatch, K, "gate")
    P, a = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.5, 0.0], [-1.0, 2.0]])
    with sync_free(True), triton_kernels(True):
        g, sums = get_backend(torch).gate(P, a)
    assert calls == ["gate"] and g.tolist() == [[1.0, 0.0], [0.0, 4.0]] and sums.tolist() == [1.0, 4.0]
