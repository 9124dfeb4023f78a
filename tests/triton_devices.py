"""The devices a fused Triton kernel's tests run on: CPU tensors under Triton's interpreter
(the conftest turns it on when there is no GPU, before any kernel module loads) and CUDA
when a GPU is present; a count of a kernel module's calls; and the NumPy backend through
the bridge to torch's GPU-path primitives (the path a CuPy step takes)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from sae_ref.backends import _triton
from sae_ref.backends._bridge import TorchBridge, through_torch
from sae_ref.backends._numpy import NumpyBackend

DEVICES = pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need Triton's interpreter")),
    pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device")),
])


def counting(monkeypatch, module, *names) -> list:
    """The names of ``module``'s functions ``names`` in the order they are called from now on
    (each still runs)."""
    calls = []
    for name in names:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    return calls


@through_torch
class NumpyThroughTorch(TorchBridge, NumpyBackend):
    """NumPy arrays through the bridge (``backends/_bridge.py``) on CPU views: CuPy's bridge
    with NumPy's ``from_dlpack``, on where torch's fused kernels run on the views (the
    sync-free mode and Triton's interpreter)."""

    def bridge_on(self, arrays):
        return all(isinstance(a, np.ndarray) for a in arrays) and _triton.usable(*map(torch.from_dlpack, arrays))

    def from_torch(self, t):
        return np.from_dlpack(t)
