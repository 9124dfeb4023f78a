"""The fused Triton kernel for the decoder's constrained Adam step.

- float64: it equals the composed form (:meth:`StandardBackend.decoder_adam`) to float64
  rounding, both orders, rows of zero norm included, with hyperparameters drawn from ranges
  (on CUDA, where they are kernel arguments, any rounded to float32 on the way would show;
  the interpreter hands the kernel Python floats);
- float32: it equals the float64 composed form on the same inputs to float32 rounding;
- the gradient Adam receives has no component along its row (zero rows: the gradient itself);
- ``order="after"`` leaves every nonzero row of unit norm;
- it writes ``W``, ``m`` and ``v`` in place, leaves ``g`` and the memory around them alone;
- bad arguments raise ValueError naming the argument.

Runs on CPU tensors under Triton's interpreter and, with a GPU, on CUDA.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("triton")
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():  # before the kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sae_ref.backends import STANDARD  # noqa: E402
from sae_ref.backends._triton_adam import decoder_adam  # noqa: E402
from sae_ref.decoder import TINY  # noqa: E402

DEVICES = pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need Triton's interpreter")),
    pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device")),
])
ORDERS = pytest.mark.parametrize("order", ["before", "after"])


@st.composite
def problems(draw):
    """``(W, g, m, v)`` float64 NumPy [h, d] (rows of varied norms, maybe one of zero norm)
    and Adam's hyperparameters."""
    h, d = draw(st.integers(1, 12)), draw(st.integers(1, 40))
    r = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    W = r.standard_normal((h, d)) * r.uniform(0.1, 10.0, (h, 1))
    if draw(st.booleans()):
        W[r.integers(0, h)] = 0.0  # the tiny rule: neither divided nor projected against
    g = r.standard_normal((h, d))
    m = 0.1 * r.standard_normal((h, d))
    v = 0.1 * r.random((h, d))
    hyper = dict(lr=draw(st.floats(1e-4, 1e-1)), b1=draw(st.floats(0.5, 0.99)),
                 b2=draw(st.floats(0.9, 0.9999)), eps=draw(st.sampled_from([1e-8, 3e-7])),
                 t=draw(st.integers(1, 50)))
    return (W, g, m, v), hyper


def _tensors(arrays, dtype, device):
    return [torch.tensor(a, dtype=dtype, device=device) for a in arrays]


def _fused(arrays, hyper, order, dtype, device):
    """``(W, m, v)`` after the kernel, as float64 NumPy."""
    W, g, m, v = _tensors(arrays, dtype, device)
    decoder_adam(W, g, m, v, order=order, tiny=TINY, **hyper)
    return [x.cpu().double().numpy() for x in (W, m, v)]


def _composed(arrays, hyper, order):
    """``(W, m, v)`` from the composed standard form, in float64."""
    out = STANDARD.decoder_adam(*_tensors(arrays, torch.float64, "cpu"), order=order, **hyper)
    return [x.numpy() for x in out]


@DEVICES
@ORDERS
@given(problem=problems())
def test_fused_decoder_adam_equals_composed_form_float64(device, order, problem):
    arrays, hyper = problem
    got = _fused(arrays, hyper, order, torch.float64, device)
    for name, a, b in zip("Wmv", got, _composed(arrays, hyper, order)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, err_msg=name)


@DEVICES
@ORDERS
@given(problem=problems())
def test_fused_decoder_adam_float32_matches_float64_reference_to_float32_rounding(device, order,
                                                                                 problem):
    arrays, hyper = problem
    arrays = [a.astype(np.float32).astype(np.float64) for a in arrays]  # inputs both see
    got = _fused(arrays, hyper, order, torch.float32, device)
    ulp = np.finfo(np.float32).eps
    for name, a, b in zip("Wmv", got, _composed(arrays, hyper, order)):
        np.testing.assert_allclose(a, b, rtol=64 * ulp, atol=64 * ulp, err_msg=name)


@DEVICES
@ORDERS
@given(problem=problems())
def test_gradient_fed_to_adam_is_orthogonal_to_its_row(device, order, problem):
    """``(m_new - b1 m) / (1 - b1)`` is the gradient Adam stepped with: ``g`` with its
    component along the row removed, ``g`` itself on a row of zero norm."""
    (W, g, m, v), hyper = problem
    _, m_new, _ = _fused((W, g, m, v), hyper, order, torch.float64, device)
    b1 = hyper["b1"]
    gt = (m_new - b1 * m) / (1 - b1)
    norms = np.linalg.norm(W, axis=1)
    zero = norms <= TINY
    along = np.sum(gt[~zero] * W[~zero], axis=1) / norms[~zero]
    scale = np.linalg.norm(g, axis=1) + np.linalg.norm(m, axis=1) / (1 - b1)
    np.testing.assert_array_less(np.abs(along), 1e-13 * scale[~zero])
    np.testing.assert_allclose(gt[zero], g[zero], rtol=1e-12, atol=1e-13)


@DEVICES
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@given(problem=problems())
def test_after_order_leaves_unit_rows(device, dtype, problem):
    arrays, hyper = problem
    W, _, _ = _fused(arrays, hyper, "after", dtype, device)
    norms = np.linalg.norm(W, axis=1)
    ulp = torch.finfo(dtype).eps
    np.testing.assert_allclose(norms, 1.0, rtol=0, atol=8 * ulp)


@DEVICES
@ORDERS
@given(problem=problems())
def test_fused_decoder_adam_writes_in_place_and_leaves_g_unchanged(device, order, problem):
    """The rows of each matrix sit between two guard rows of a larger buffer: the kernel
    updates the [h, d] views it was given and touches nothing around them."""
    arrays, hyper = problem
    h = arrays[0].shape[0]
    buffers = [torch.full((h + 2, a.shape[1]), 7.0, dtype=torch.float64, device=device)
               for a in arrays]
    views = [buf[1:h + 1] for buf in buffers]
    for view, a in zip(views, arrays):
        view.copy_(torch.from_numpy(a))
    W, g, m, v = views
    before = [buf.clone() for buf in buffers]
    pointers = [x.data_ptr() for x in (W, m, v)]
    assert decoder_adam(W, g, m, v, order=order, tiny=TINY, **hyper) is None
    assert [x.data_ptr() for x in (W, m, v)] == pointers
    assert torch.equal(buffers[1], before[1])  # g, guard rows included
    for i in (0, 2, 3):  # W, m, v
        assert torch.equal(buffers[i][[0, h + 1]], before[i][[0, h + 1]])  # guard rows
        assert not torch.equal(buffers[i][1:h + 1], before[i][1:h + 1])  # the step was written
    for name, a, b in zip("Wmv", (W, m, v), _composed(arrays, hyper, order)):
        np.testing.assert_allclose(a.cpu().numpy(), b, rtol=1e-12, atol=1e-14, err_msg=name)


def _arguments():
    """Valid ``W``, ``g``, ``m``, ``v`` [3, 5] in float64."""
    return {name: torch.ones(3, 5, dtype=torch.float64) for name in ("W", "g", "m", "v")}


@pytest.mark.parametrize("name, change", [
    ("W", lambda a: a.update(W=torch.ones(15, dtype=torch.float64))),
    ("W", lambda a: a.update(W=a["W"].int())),
    ("g", lambda a: a.update(g=torch.ones(3, 4, dtype=torch.float64))),
    ("m", lambda a: a.update(m=torch.zeros(3, 5, dtype=torch.float32))),
    ("v", lambda a: a.update(v=torch.zeros(5, 3, dtype=torch.float64).T)),
], ids=["W-not-2d", "W-integer", "g-shape", "m-dtype", "v-not-contiguous"])
def test_bad_arrays_raise_value_error_naming_the_argument(name, change):
    args = _arguments()
    change(args)
    with pytest.raises(ValueError, match=f"'{name}'"):
        decoder_adam(**args, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, t=1, order="before", tiny=TINY)


def test_unknown_order_raises_value_error_naming_order():
    with pytest.raises(ValueError, match="'order'"):
        decoder_adam(**_arguments(), lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, t=1, order="during",
                     tiny=TINY)
