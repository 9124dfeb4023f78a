"""The dead-latent counters as fused Triton kernels (``_triton_counters``) against the
composed form (:meth:`StandardBackend.dead_counters`), exactly: the new counters, the dead
mask, the dead fraction and the L0 (nonzero entries per row), with entries of value 0 (listed, not
fired), latents firing in many rows, latents never firing, codes without entries, and
counters at, below and past the threshold. The torch backend on the GPU path runs them.

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
from sae_ref.backends import _triton_counters as K  # noqa: E402
from triton_devices import DEVICES, counting  # noqa: E402


@st.composite
def counters(draw):
    B, h = draw(st.integers(1, 30)), draw(st.integers(1, 70))
    r = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mask = r.random((B, h)) < draw(st.sampled_from([0.0, 0.05, 0.5])) * r.random(h)[None, :] * 2
    rows, cols = np.nonzero(mask)
    values = r.random(cols.shape[0])
    values[r.random(values.shape[0]) < 0.3] = 0.0
    threshold = int(draw(st.integers(1, 5)) * B)
    since = r.integers(0, 2 * threshold, h)
    return cols.astype(np.int64), values, since.astype(np.int64), B, threshold


def _both(problem, device):
    cols, values, since, B, threshold = problem
    t = lambda a: torch.as_tensor(a, device=device)
    args = (t(cols), t(values), t(since), B, threshold, torch.float32)
    return K.dead_counters(*args), StandardBackend.dead_counters(get_backend(torch), *args)


@DEVICES
@given(problem=counters())
@settings(max_examples=25)
def test_fused_dead_counters_equal_the_composed_form_exactly(device, problem):
    got, want = _both(problem, device)
    for name, a, b in zip(("since", "dead", "dead_fraction", "l0"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a.cpu(), b.cpu()), name


@DEVICES
@given(problem=counters())
@settings(max_examples=10)
def test_a_latent_is_fired_exactly_when_one_of_its_entries_is_nonzero(device, problem):
    """Against the definition, in NumPy: the counter restarts where a nonzero entry fired."""
    cols, values, since, B, threshold = problem
    (new, dead, dead_fraction, l0), _ = _both(problem, device)
    fired = np.zeros(since.shape[0], dtype=bool)
    fired[cols[values != 0]] = True
    want = np.where(fired, 0, since + B)
    assert np.array_equal(new.cpu().numpy(), want)
    assert np.array_equal(dead.cpu().numpy(), want >= threshold)
    # the means of exact counts, correctly rounded in float32
    assert float(dead_fraction) == np.float32(np.count_nonzero(want >= threshold)) / np.float32(since.shape[0])
    assert float(l0) == np.float32(np.count_nonzero(values)) / np.float32(B)


def test_torch_backend_on_the_gpu_path_runs_the_kernels(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors need Triton's interpreter")
    calls = counting(monkeypatch, K, "dead_counters")
    cols, values, since = torch.tensor([0, 2, 2]), torch.tensor([1.0, 0.0, 2.0]), torch.tensor([5, 9, 1, 7])
    with sync_free(True), triton_kernels(True):
        new, dead, dead_fraction, l0 = get_backend(torch).dead_counters(cols, values, since, 3, 10, torch.float64)
    assert calls == ["dead_counters"]
    assert new.tolist() == [0, 12, 0, 10] and dead.tolist() == [False, True, False, True]
    assert float(dead_fraction) == 2 / 4 and float(l0) == 2 / 3 and dead_fraction.dtype == torch.float64
