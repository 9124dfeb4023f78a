"""The fused Triton kernels for Adam: the decoder's constrained step, and the plain step.

The decoder's step (:func:`decoder_adam`):

- float64: it equals the composed form (:meth:`StandardBackend.decoder_adam`) to float64
  rounding, both orders, rows of zero norm included, with hyperparameters drawn from ranges
  (on CUDA, where they are kernel arguments, any rounded to float32 on the way would show;
  the interpreter hands the kernel Python floats);
- float32: it equals the float64 composed form on the same inputs to float32 rounding;
- the gradient Adam receives has no component along its row (zero rows: the gradient itself);
- ``order="after"`` leaves every nonzero row of unit norm;
- it writes ``W``, ``m`` and ``v`` in place, leaves ``g`` and the memory around them alone;
- bad arguments raise ValueError naming the argument.

The plain step (:func:`adam`), on 0-D, 1-D and 2-D tensors, row-major or latent-major (the
transpose of a contiguous matrix, as ``W_enc``):

- float64: it equals :meth:`StandardBackend.adam` to float64 rounding, entries whose gradient
  and moments are zero (a latent that never fired: ``eps`` alone keeps them finite) and tiny
  gradients (where ``eps`` dominates) included;
- float32: it equals the float64 composed form on the same inputs to float32 rounding;
- it writes ``p``, ``m`` and ``v`` in place, leaves ``g`` and the memory around them alone;
- with ``sums=True`` both kernels return parts of the gradient's sum of squares from the same
  pass (their sum its float64 definition) and take the same step;
- bad arguments raise TypeError or ValueError naming the argument;
- torch's backend runs it on the GPU path (its result is the composed one), falls back to
  torch's fused Adam with a warning when it fails, and leaves layouts it does not take to the
  composed form.

Runs on CPU tensors under Triton's interpreter and, with a GPU, on CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from sae_ref.backends import STANDARD  # noqa: E402
from sae_ref.backends._triton_adam import adam, decoder_adam  # noqa: E402
from sae_ref.decoder import TINY  # noqa: E402
from triton_devices import DEVICES  # noqa: E402

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
    return (W, g, m, v), draw(hyperparameters())


@st.composite
def hyperparameters(draw):
    """Adam's ``lr``, ``b1``, ``b2``, ``eps`` and ``t``."""
    return dict(lr=draw(st.floats(1e-4, 1e-1)), b1=draw(st.floats(0.5, 0.99)),
                b2=draw(st.floats(0.9, 0.9999)), eps=draw(st.sampled_from([1e-8, 3e-7])),
                t=draw(st.integers(1, 50)))


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


# -- the plain Adam step ----------------------------------------------------------------------

@st.composite
def adam_problems(draw):
    """``(p, g, m, v)`` float64 NumPy of one shape (0-D, 1-D or 2-D), whether they are stored
    latent-major, and Adam's hyperparameters. The gradient and moments are of one scale (down
    to where ``eps`` dominates the denominator), and some entries may have all three zero."""
    shape = tuple(draw(st.lists(st.integers(1, 40), max_size=2)))
    transposed = len(shape) == 2 and draw(st.booleans())
    r = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1e-9, 1e-3, 1.0]))
    p, g, m, v = (np.array(a, dtype=np.float64, ndmin=len(shape)) for a in (  # 0-D: arrays too
        r.standard_normal(shape) * r.uniform(0.1, 10.0), scale * r.standard_normal(shape),
        0.1 * scale * r.standard_normal(shape), 0.1 * scale**2 * r.random(shape)))
    if draw(st.booleans()):
        idle = r.random(shape) < 0.3
        for a in (g, m, v):
            a[idle] = 0.0
    return (p, g, m, v), transposed, draw(hyperparameters())


def _placed(arrays, dtype, device, transposed=False):
    """``(buffers, tensors)``: each array as a tensor whose elements fill a flat buffer but for
    a guard element of 7.0 at each end; ``transposed``: the buffer holds the contiguous
    transpose and the tensor is its ``.T`` view (latent-major, as ``W_enc``)."""
    buffers, tensors = [], []
    for a in arrays:
        stored = np.array(a.T if transposed else a, order="C")  # 0-D stays 0-D
        buf = torch.full((stored.size + 2,), 7.0, dtype=dtype, device=device)
        x = buf[1:-1].view(stored.shape)
        x.copy_(torch.from_numpy(stored))
        buffers.append(buf)
        tensors.append(x.T if transposed else x)
    return buffers, tensors


def _adam_composed(arrays, hyper):
    """``(p, m, v)`` from :meth:`StandardBackend.adam`, in float64."""
    return [x.numpy() for x in STANDARD.adam(*_tensors(arrays, torch.float64, "cpu"), **hyper)]


def _adam_fused(arrays, hyper, dtype, device, transposed=False):
    """``(p, m, v)`` after the kernel, as float64 NumPy."""
    _, (p, g, m, v) = _placed(arrays, dtype, device, transposed)
    assert adam(p, g, m, v, **hyper) is None
    return [x.cpu().double().numpy() for x in (p, m, v)]


@DEVICES
@given(problem=adam_problems())
def test_fused_adam_equals_composed_form_float64(device, problem):
    arrays, transposed, hyper = problem
    got = _adam_fused(arrays, hyper, torch.float64, device, transposed)
    for name, a, b in zip("pmv", got, _adam_composed(arrays, hyper)):
        assert np.all(np.isfinite(a)), name
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14 * np.abs(b).max(initial=0.0), err_msg=name)


@DEVICES
@given(problem=adam_problems(), order=st.sampled_from([None, "before", "after"]))
def test_fused_steps_with_sums_give_the_same_step_and_the_gradient_sum_of_squares(device, problem, order):
    """``sums=True``: the step is the one without, and the returned 0-D sum of ``g^2`` (the
    gradient as given, before the decoder's projection) is its float64 definition."""
    (p, g, m, v), transposed, hyper = problem
    if order is not None:  # the decoder's step takes [h, d] rows
        p, g, m, v = (np.atleast_2d(a) for a in (p, g, m, v))
        transposed = False
    arrays = (p, g, m, v)
    _, plain = _placed(arrays, torch.float64, device, transposed)
    _, with_sums = _placed(arrays, torch.float64, device, transposed)
    step = adam if order is None else lambda *a, **k: decoder_adam(*a, order=order, tiny=TINY, **k)
    assert step(*plain, **hyper) is None
    ss = step(*with_sums, sums=True, **hyper)
    assert ss.ndim == 1 and ss.dtype == torch.float64
    np.testing.assert_allclose(float(ss.sum()), float(np.sum(g * g)), rtol=1e-12)
    for a, b in zip(plain, with_sums):
        assert torch.equal(a, b)


@DEVICES
@given(problem=adam_problems())
def test_fused_adam_float32_matches_float64_reference_to_float32_rounding(device, problem):
    arrays, transposed, hyper = problem
    arrays = [a.astype(np.float32).astype(np.float64) for a in arrays]  # inputs both see
    got = _adam_fused(arrays, hyper, torch.float32, device, transposed)
    ulp = np.finfo(np.float32).eps
    for name, a, b in zip("pmv", got, _adam_composed(arrays, hyper)):
        np.testing.assert_allclose(a, b, rtol=64 * ulp, atol=64 * ulp * np.abs(b).max(initial=0.0),
                                   err_msg=name)


@DEVICES
@given(problem=adam_problems())
def test_fused_adam_writes_in_place_and_leaves_g_and_the_memory_around_unchanged(device, problem):
    arrays, transposed, hyper = problem
    buffers, (p, g, m, v) = _placed(arrays, torch.float64, device, transposed)
    before = [buf.clone() for buf in buffers]
    pointers = [x.data_ptr() for x in (p, m, v)]
    assert adam(p, g, m, v, **hyper) is None
    assert [x.data_ptr() for x in (p, m, v)] == pointers
    assert torch.equal(buffers[1], before[1])  # g, guards included
    for i in (0, 2, 3):  # p, m, v
        assert torch.equal(buffers[i][[0, -1]], before[i][[0, -1]])  # guards
    for name, a, b in zip("pmv", (p, m, v), _adam_composed(arrays, hyper)):  # the step, written
        np.testing.assert_allclose(a.cpu().numpy(), b, rtol=1e-12, atol=1e-14 * np.abs(b).max(initial=0.0),
                                   err_msg=name)


SHAPES = pytest.mark.parametrize("shape, transposed", [
    ((), False), ((7,), False), ((5, 33), False), ((5, 33), True),
    ((250, 300), True),  # more than one program under the interpreter (2^16 each), a partial last
], ids=["0-d", "1-d", "row-major", "latent-major", "latent-major-several-programs"])


def _adam_arrays(shape, seed=0):
    r = np.random.default_rng(seed)
    return [np.array(a, ndmin=len(shape)) for a in (  # 0-D: arrays too
        r.standard_normal(shape), r.standard_normal(shape), 0.1 * r.standard_normal(shape),
        0.1 * r.random(shape))]


HYPER = dict(lr=3e-3, b1=0.9, b2=0.999, eps=1e-8, t=7)


@DEVICES
@SHAPES
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_fused_adam_takes_every_shape_and_layout_of_a_parameter(device, shape, transposed, dtype):
    arrays = [a.astype(np.float32).astype(np.float64) for a in _adam_arrays(shape)]
    got = _adam_fused(arrays, HYPER, dtype, device, transposed)
    rtol = 1e-12 if dtype == torch.float64 else 64 * np.finfo(np.float32).eps
    for name, a, b in zip("pmv", got, _adam_composed(arrays, HYPER)):
        assert a.shape == shape
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max(), err_msg=name)


def _adam_arguments():
    """Valid ``p``, ``g``, ``m``, ``v`` [3, 5] in float64."""
    return {name: torch.ones(3, 5, dtype=torch.float64) for name in ("p", "g", "m", "v")}


@pytest.mark.parametrize("name, change", [
    ("p", lambda a: a.update(p=a["p"].int())),
    ("g", lambda a: a.update(g=torch.ones(3, 4, dtype=torch.float64))),
    ("m", lambda a: a.update(m=torch.zeros(3, 5, dtype=torch.float32))),
    ("v", lambda a: a.update(v=torch.zeros(3, 5, dtype=torch.float64, device="meta"))),
    ("v", lambda a: a.update(v=torch.zeros(3, 10, dtype=torch.float64)[:, ::2])),
    ("g", lambda a: a.update(g=torch.zeros(5, 3, dtype=torch.float64).T)),
    ("p", lambda a: a.update(p=torch.zeros(3, 2, 5, dtype=torch.float64).permute(0, 2, 1)[:, :, 0])),
], ids=["p-integer", "g-shape", "m-dtype", "v-device", "v-strided", "g-other-layout", "p-strided"])
def test_bad_adam_arrays_raise_value_error_naming_the_argument(name, change):
    args = _adam_arguments()
    change(args)
    with pytest.raises(ValueError, match=f"'{name}'"):
        adam(**args, **HYPER)


def test_adam_argument_that_is_not_a_tensor_raises_type_error_naming_it():
    args = _adam_arguments()
    args["m"] = np.ones((3, 5))
    with pytest.raises(TypeError, match="'m'"):
        adam(**args, **HYPER)


def _backend_adam(p, g, m, v, **kw):
    from sae_ref.backends import get_backend, sync_free, triton_kernels

    with sync_free(True), triton_kernels(True):
        return get_backend(torch).adam(p, g, m, v, **kw)


@pytest.fixture
def counted(monkeypatch):
    """The calls of the plain Adam kernel, counted, with the kernels on (whatever failed
    before in the process)."""
    from sae_ref.backends import _triton, _triton_adam

    calls = []

    def kernel(*args, **kw):
        calls.append(args)
        return adam(*args, **kw)

    monkeypatch.setattr(_triton_adam, "adam", kernel)
    monkeypatch.setattr(_triton, "FAILURE", None)
    return calls


@DEVICES
@SHAPES
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_torch_backend_adam_on_the_gpu_path_runs_the_kernel_and_equals_composed_form(
        device, shape, transposed, inplace, counted, monkeypatch):
    def eager(*args, **kw):
        raise AssertionError("torch's fused Adam ran: the kernel was not used")

    monkeypatch.setattr(torch, "_fused_adam_", eager)
    arrays = _adam_arrays(shape, seed=1)
    _, tensors = _placed(arrays, torch.float64, device, transposed)
    before = [x.clone() for x in tensors]
    got = _backend_adam(*tensors, inplace=inplace, **HYPER)
    assert len(counted) == 1
    for name, a, b in zip("pmv", got, _adam_composed(arrays, HYPER)):
        np.testing.assert_allclose(a.cpu().numpy(), b, rtol=1e-12, atol=1e-14, err_msg=name)
    assert torch.equal(tensors[1], before[1])  # g is read only
    for x, out, old in zip((tensors[0], tensors[2], tensors[3]), got, (before[0], before[2], before[3])):
        if inplace:
            assert out is x
        else:
            assert torch.equal(x, old) and out.stride() == x.stride()


def test_torch_backend_adam_leaves_mixed_layouts_to_the_composed_form(counted):
    arrays = _adam_arrays((5, 33), seed=2)
    _, (p, m, v) = _placed([arrays[0], arrays[2], arrays[3]], torch.float64, "cpu", transposed=True)
    g = torch.from_numpy(arrays[1])  # row-major where p is latent-major
    got = _backend_adam(p, g, m, v, **HYPER)
    assert counted == []
    for name, a, b in zip("pmv", got, _adam_composed(arrays, HYPER)):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-12, atol=1e-14, err_msg=name)


def test_a_failing_adam_kernel_turns_the_kernels_off_with_a_warning_and_the_composed_result(monkeypatch):
    from sae_ref.backends import _triton, _triton_adam

    def broken(*args, **kw):
        raise RuntimeError("no such instruction on this GPU")

    monkeypatch.setattr(_triton_adam, "adam", broken)
    monkeypatch.setattr(_triton, "FAILURE", None)
    arrays = _adam_arrays((5, 33), seed=3)
    _, tensors = _placed(arrays, torch.float64, "cpu", transposed=True)
    with pytest.warns(RuntimeWarning, match="adam: RuntimeError: no such instruction"):
        got = _backend_adam(*tensors, **HYPER)
    for name, a, b in zip("pmv", got, _adam_composed(arrays, HYPER)):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-12, atol=1e-14, err_msg=name)
    assert _triton.FAILURE is not None
