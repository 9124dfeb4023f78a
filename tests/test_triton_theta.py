"""The BatchTopK threshold estimate's per-step kernels (``_triton_theta``) against their
composed forms and definitions: the batch's smallest positive value (none positive: +inf;
signed zeros and negative values ignored; no entries), and the running mean's ring buffer
with the step's value at its slot (a non-finite value: NaN there) and the mean of its finite
entries. The torch backend on the GPU path runs them.

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
from sae_ref.backends import _triton_theta as K  # noqa: E402
from triton_devices import DEVICES, counting  # noqa: E402

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])


@DEVICES
@DTYPES
@given(values=st.lists(st.sampled_from([-2.0, -0.0, 0.0, 1e-30, 0.5, 3.0, 7e4]) | st.floats(-10, 10),
                       max_size=300))
@settings(max_examples=25)
def test_fused_min_positive_is_the_smallest_positive_value_or_inf(device, dtype, values):
    v = torch.tensor(values, dtype=dtype, device=device)
    got = K.min_positive(v)
    positive = [x for x in v.cpu().tolist() if x > 0]
    assert got.shape == () and got.dtype == dtype
    assert float(got) == (min(positive) if positive else float("inf"))
    assert torch.equal(got.cpu(), StandardBackend.min_positive(get_backend(torch), v).cpu())


@DEVICES
@DTYPES
@given(window=st.integers(1, 40), data=st.data())
@settings(max_examples=25)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0 / 0 in the interpreter
def test_fused_running_mean_step_equals_the_composed_step(device, dtype, window, data):
    entries = st.sampled_from([float("nan"), float("inf"), 0.5, 2.0]) | st.floats(0.01, 10)
    buf = torch.tensor(data.draw(st.lists(entries, min_size=window, max_size=window)), dtype=dtype, device=device)
    m = torch.tensor(data.draw(st.sampled_from([float("inf"), 1.5]) | st.floats(0.01, 10)), dtype=dtype, device=device)
    slot = data.draw(st.integers(0, window - 1))
    new, mean = K.running_mean_step(buf, m, slot)
    want_new, want_mean = StandardBackend.running_mean_step(get_backend(torch), buf, m, slot)
    assert torch.equal(torch.isnan(new), torch.isnan(want_new))
    assert torch.equal(torch.nan_to_num(new), torch.nan_to_num(want_new))
    w = want_mean.cpu().double().item()
    if np.isnan(w):  # no finite entry
        assert torch.isnan(mean)
    else:
        assert abs(mean.cpu().double().item() - w) <= 4 * window * float(torch.finfo(dtype).eps) * abs(w)


def test_torch_backend_on_the_gpu_path_runs_the_kernels(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors need Triton's interpreter")
    calls = counting(monkeypatch, K, "min_positive", "running_mean_step")
    be = get_backend(torch)
    with sync_free(True), triton_kernels(True):
        m = be.min_positive(torch.tensor([0.0, 0.5, -1.0, 0.25]))
        new, mean = be.running_mean_step(torch.tensor([1.0, float("nan"), 3.0]), m, 1)
    assert calls == ["min_positive", "running_mean_step"]
    assert float(m) == 0.25 and new.tolist()[1] == 0.25 and abs(float(mean) - 4.25 / 3) < 1e-6
