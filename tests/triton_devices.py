"""The devices a fused Triton kernel's tests run on: CPU tensors under Triton's interpreter
(the conftest turns it on when there is no GPU, before any kernel module loads) and CUDA
when a GPU is present; and a count of a kernel module's calls."""

from __future__ import annotations

import os

import pytest
import torch

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
