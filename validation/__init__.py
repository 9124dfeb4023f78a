"""Reusable property checks for SAE implementations (sae-ref's own and other people's).

A check takes someone's implementation as a plain callable, runs the invariants of the
specification against it with hypothesis (bounded, seeded, reproducible), and returns a
:class:`~sae_ref.validation.report.Report`: per invariant, whether it held and, if not,
hypothesis's shrunk minimal failing example, the implementation's output on it, sae-ref's
output and their difference.

>>> import numpy as np
>>> from sae_ref.validation import check_batch_topk
>>> def my_batch_topk(pre, k):                  # keeps the B*k largest of relu(pre)
...     flat = np.maximum(pre, 0).ravel()
...     keep = np.argsort(-flat, kind="stable")[: pre.shape[0] * k]
...     out = np.zeros_like(flat)
...     out[keep] = flat[keep]
...     return out.reshape(pre.shape)
>>> report = check_batch_topk(my_batch_topk, max_examples=10)
>>> report.ok
True

In pytest, ``check_batch_topk(my_fn).raise_if_failed()`` fails the test with the report; the
plugin :mod:`sae_ref.validation.plugin` adds a ``sae_ref_validate`` fixture.

Modules: :mod:`~sae_ref.validation.strategies` (hypothesis strategies for SAE-shaped inputs),
:mod:`~sae_ref.validation.oracles` (float64 oracles the test suite shares),
``checks_*`` (the checks), :mod:`~sae_ref.validation.checks` (all of them by name, and
sae-ref's own implementations), :mod:`~sae_ref.validation.adapters` (torch modules and
functions), :mod:`~sae_ref.validation.report`, :mod:`~sae_ref.validation.runner`,
:mod:`~sae_ref.validation.interface`, :mod:`~sae_ref.validation.plugin` and
:mod:`~sae_ref.validation.cli` (``sae-ref validate``).

The names below are imported on first use, so ``import sae_ref.validation`` alone needs
neither hypothesis nor torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "check_batch_topk": "checks_selection",
    "check_topk": "checks_selection",
    "check_threshold": "checks_selection",
    "check_jumprelu": "checks_jumprelu",
    "check_top_afa": "checks_afa",
    "check_theta_estimator": "checks_theta",
    "check_auxk": "checks_auxk",
    "check_fvu": "checks_fvu",
    "check_decoder_constraint": "checks_decoder",
    "check_sae": "checks_sae",
    "check_sae_ref": "checks",
    "CHECKS": "checks",
    "Report": "report",
    "Outcome": "report",
    "ValidationError": "report",
    "TorchSAE": "adapters",
    "torch_fn": "adapters",
    "torch_vjp": "adapters",
    "torch_step_vjp": "adapters",
}

__all__ = [  # noqa: RUF022 (grouped as in _EXPORTS)
    "check_batch_topk", "check_topk", "check_threshold", "check_jumprelu", "check_top_afa",
    "check_theta_estimator", "check_auxk", "check_fvu", "check_decoder_constraint", "check_sae",
    "check_sae_ref", "CHECKS", "Report", "Outcome", "ValidationError", "TorchSAE", "torch_fn",
    "torch_vjp", "torch_step_vjp",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
