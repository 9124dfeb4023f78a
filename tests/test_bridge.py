"""torch's GPU-path primitives run on another library's arrays through DLPack views
(``backends/_bridge.py``): the path a CuPy step takes to the fused Triton kernels.

Without a GPU the bridge runs on NumPy arrays, with the torch primitives on CPU views under
Triton's interpreter: ``triton_devices.NumpyThroughTorch`` is the CuPy backend's bridge with
NumPy's ``from_dlpack`` (the fixture's ``numpy-gpu-path`` backend runs every property test
through it). The same wrapper, conversions and hand-back run as on CuPy; only CuPy's
stream and device context is left to the GPU tests at the end (which skip without CuPy).
"""

from __future__ import annotations

import inspect
import os
import re

import numpy as np
import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from sae_ref import backends  # noqa: E402
from sae_ref.backends import StandardBackend, get_backend, sync_free, triton_kernels  # noqa: E402
from sae_ref.backends import _bridge, _triton  # noqa: E402
from sae_ref.backends._bridge import BRIDGED  # noqa: E402
from sae_ref.backends._numpy import NumpyBackend  # noqa: E402
from sae_ref.backends._torch import TorchBackend  # noqa: E402
from sae_ref.train import TrainConfig, init_state, step  # noqa: E402
from sae_ref.validation.oracles import assert_close  # noqa: E402
from triton_devices import NumpyThroughTorch, counting  # noqa: E402

INTERPRETED = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="CPU tensors need Triton's interpreter")


class Recording:
    """The torch backend, recording the primitives asked of it."""

    def __init__(self, be):
        self.be, self.names = be, []

    def __getattr__(self, name):
        self.names.append(name)
        return getattr(self.be, name)


@pytest.fixture
def bridged(monkeypatch):
    """The NumPy backend through the bridge, and the list of primitives that reached torch."""
    rec = Recording(get_backend(torch))
    monkeypatch.setattr(_bridge, "_torch_backend", lambda: rec)
    monkeypatch.setattr(_triton, "FAILURE", None)
    return NumpyThroughTorch(), rec.names


def _uses_a_kernel(fn) -> bool:
    return re.search(r"(?<!\w)_kernel\(", inspect.getsource(fn)) is not None


def test_every_fused_kernel_of_the_torch_backend_is_bridged():
    """Each torch primitive that dispatches to a fused kernel (directly or through a helper) is
    in BRIDGED, and every bridged name is a torch primitive with a form of its own elsewhere."""
    fused = {name for name, fn in vars(TorchBackend).items() if callable(fn) and _uses_a_kernel(fn)}
    helpers = {"_decoder_adam_fused": {"decoder_adam", "decoder_adam_sums"}}
    fused = set().union(*(helpers.get(name, {name}) for name in fused))
    assert fused and fused <= set(BRIDGED), fused - set(BRIDGED)
    assert all(callable(getattr(TorchBackend, name)) and callable(getattr(StandardBackend, name)) for name in BRIDGED)


@INTERPRETED
def test_adam_through_the_bridge_updates_the_arrays_in_place_with_the_torch_kernels_bits(bridged):
    be, names = bridged
    r = np.random.default_rng(0)
    p, g, m, v = (r.standard_normal((5, 7)).astype(np.float32) for _ in range(4))
    v = np.abs(v)
    want = [torch.tensor(a) for a in (p, g, m, v)]
    ids = [id(a) for a in (p, m, v)]
    kw = dict(lr=1e-2, b1=0.9, b2=0.99, eps=1e-8, t=3, inplace=True)
    with sync_free(True), triton_kernels(True):
        out = be.adam(p, g, m, v, **kw)
        get_backend(torch).adam(*want, **kw)
    assert names == ["adam"] and [id(a) for a in out] == ids  # the caller's arrays, updated
    for a, w in zip((p, m, v), (want[0], want[2], want[3])):
        assert np.array_equal(a, w.numpy())


@INTERPRETED
def test_dtype_arguments_and_zero_d_results_cross_the_bridge(bridged):
    """A NumPy dtype argument reaches torch as torch's dtype; 0-D results come back as
    NumPy arrays equal to the torch backend's."""
    be, names = bridged
    cols, values, since = np.array([0, 2, 2]), np.array([1.0, 0.0, 2.0], np.float32), np.array([5, 9, 1, 7])
    with sync_free(True), triton_kernels(True):
        new, dead, dead_fraction, l0 = be.dead_counters(cols, values, since, 3, 10, np.float32)
        want = get_backend(torch).dead_counters(*map(torch.tensor, (cols, values, since)), 3, 10, torch.float32)
    assert names == ["dead_counters"]
    assert all(isinstance(a, np.ndarray) for a in (new, dead, dead_fraction, l0)) and l0.dtype == np.float32
    for a, w in zip((new, dead, dead_fraction, l0), want):
        assert np.array_equal(a, w.numpy())


@INTERPRETED
def test_outside_the_gpu_path_the_backend_keeps_its_own_primitives(bridged):
    be, names = bridged
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    with triton_kernels(False), sync_free(True):
        keys = be.group_keys(x, 4, per_row=False)
    with sync_free(False), triton_kernels(True):
        be.group_keys(x, 4, per_row=False)
    assert names == []  # neither call reached torch
    assert np.array_equal(keys, NumpyBackend().group_keys(x, 4, per_row=False))


def _train(arch, n_steps, xs, dead_after=2):
    config = TrainConfig(arch=arch, h=128, k=2, k_aux=8, lr=3e-3, dead_after=dead_after,
                         dead_unit="batches", steps=n_steps)
    state, trace = init_state(config, xs[0]), []
    for i in range(n_steps):
        state, m = step(state, xs[i % len(xs)], check=False)
        trace.append([float(m[name]) for name in ("loss", "mse", "aux", "l0", "dead_fraction", "grad_norm")])
    return state, np.array(trace)


@INTERPRETED
@pytest.mark.parametrize("arch", ["batchtopk", "topk"])
def test_a_numpy_step_through_the_bridge_runs_the_fused_kernels_and_equals_the_torch_step(bridged, monkeypatch, arch):
    """Invariant: float32 training steps (AuxK on dead latents) on NumPy arrays through the
    bridge reach torch's fused primitives and end where the torch GPU-path steps do, and where
    NumPy's own steps do, within float32 rounding."""
    be, names = bridged
    rng = np.random.default_rng(3)
    xs = [(rng.standard_normal((32, 16)) * rng.uniform(0.5, 2, 16)).astype(np.float32) for _ in range(2)]
    with sync_free(True), triton_kernels(True):
        monkeypatch.setitem(backends._NATIVE, "numpy", be)
        through, t_through = _train(arch, 4, xs)
        monkeypatch.setitem(backends._NATIVE, "numpy", NumpyBackend())
        on_torch_calls = counting(monkeypatch, TorchBackend, *BRIDGED)
        on_torch, t_torch = _train(arch, 4, [torch.tensor(x) for x in xs])
    own, t_own = _train(arch, 4, xs)
    assert _triton.FAILURE is None
    # every primitive of the torch step's own that the bridge covers reached torch from NumPy
    assert set(on_torch_calls) <= set(names), set(on_torch_calls) - set(names)
    want = {"standardize", "group_keys", "code_at", "decode_residual", "dead_counters", "backward_products",
            "adam_sums", "decoder_adam_sums"} | ({"min_positive", "running_mean_step"} if arch == "batchtopk" else set())
    assert want <= set(names) and want <= set(on_torch_calls), (want - set(names), want - set(on_torch_calls))
    assert t_through[:, 4].max() > 0  # AuxK had dead latents
    assert "gate" in names or "row_top_block" in names
    np.testing.assert_allclose(t_through, t_torch, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(t_through, t_own, rtol=2e-4, atol=1e-5)
    for name, a in through.params.arrays().items():
        assert isinstance(a, np.ndarray), name
        assert_close(a, getattr(on_torch.params, name).numpy(), rtol=2e-5, atol=1e-6, what=name)


# --- on a GPU, with CuPy -----------------------------------------------------------------------


def _cupy():
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("no CUDA device")
    except Exception:
        pytest.skip("no CUDA device")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    return cp


@pytest.mark.parametrize("arch", ["batchtopk", "topk"])
def test_cupy_steps_run_the_fused_kernels_on_cupys_stream_and_equal_torch_cuda_steps(monkeypatch, arch):
    cp = _cupy()
    rec = Recording(get_backend(torch))
    monkeypatch.setattr(_bridge, "_torch_backend", lambda: rec)
    rng = np.random.default_rng(3)
    xs = [(rng.standard_normal((256, 64)) * rng.uniform(0.5, 2, 64)).astype(np.float32) for _ in range(2)]
    side = cp.cuda.Stream(non_blocking=True)
    with side:  # a stream of CuPy's own: torch and Triton must launch there
        on_cupy, t_cupy = _train(arch, 4, [cp.asarray(x) for x in xs])
    side.synchronize()
    on_torch, t_torch = _train(arch, 4, [torch.tensor(x, device="cuda") for x in xs])
    assert {"decode_residual", "backward_products", "adam_sums"} <= set(rec.names)
    np.testing.assert_allclose(t_cupy, t_torch, rtol=2e-5, atol=1e-6)
    for name, a in on_cupy.params.arrays().items():
        assert isinstance(a, cp.ndarray), name
        assert_close(cp.asnumpy(a), getattr(on_torch.params, name).cpu().numpy(), rtol=2e-5, atol=1e-6, what=name)


def test_cupy_sampled_dots_without_the_bridge_are_the_rows_dot_products():
    cp = _cupy()
    r = np.random.default_rng(5)
    a, b = r.standard_normal((7, 5)), r.standard_normal((9, 5))
    i, j = r.integers(0, 7, 40), r.integers(0, 9, 40)
    with triton_kernels(False):
        got = get_backend(cp).sddmm(*map(cp.asarray, (a, b, i, j)))
    np.testing.assert_allclose(cp.asnumpy(got), np.einsum("ij,ij->i", a[i], b[j]), rtol=1e-12)
