"""Every check by name, and sae-ref's own implementations in the form each check takes.

:data:`CHECKS` maps a short name to its ``check_*`` function (the CLI's ``--check`` and the
pytest fixture use it). :func:`sae_ref_implementations` gives, for every check, sae-ref's own
implementation and the keyword arguments that describe its convention; :func:`check_sae_ref`
runs them all (sae-ref must pass every check on every backend).

>>> from sae_ref.validation.checks import CHECKS, check_sae_ref
>>> sorted(CHECKS)[:3]
['auxk', 'batch_topk', 'decoder_constraint']
>>> check_sae_ref(max_examples=3, only=["topk"]).ok
True
"""

from __future__ import annotations

from array_api_compat import array_namespace

from sae_ref import activations as A
from sae_ref.afa import top_afa
from sae_ref.backends import get_backend
from sae_ref.decoder import constrained_step, project_grad
from sae_ref.validation.checks_afa import check_top_afa
from sae_ref.validation.checks_auxk import check_auxk, sae_ref_auxk
from sae_ref.validation.checks_decoder import check_decoder_constraint
from sae_ref.validation.checks_fvu import check_fvu
from sae_ref.validation.checks_jumprelu import check_jumprelu
from sae_ref.validation.checks_sae import check_sae
from sae_ref.validation.checks_selection import check_batch_topk, check_threshold, check_topk
from sae_ref.validation.checks_theta import check_theta_estimator, sae_ref_theta_run
from sae_ref.validation.report import Report

CHECKS = {
    "batch_topk": check_batch_topk,
    "topk": check_topk,
    "threshold": check_threshold,
    "jumprelu": check_jumprelu,
    "top_afa": check_top_afa,
    "theta_estimator": check_theta_estimator,
    "auxk": check_auxk,
    "fvu": check_fvu,
    "decoder_constraint": check_decoder_constraint,
    "sae": check_sae,
}


def _gather(xp, a, code):
    h = code.shape[1]
    return xp.take(xp.reshape(a, (-1,)), code.rows * h + code.cols)


def jumprelu_vjp(pre, theta, bandwidth, g):
    """sae-ref's JumpReLU backward as ``vjp(pre, theta, bandwidth, g) -> (g_pre, g_theta)``:
    :func:`~sae_ref.activations.pass_through_backward` and
    :func:`~sae_ref.activations.jumprelu_theta_backward`."""
    xp = array_namespace(pre, theta, g)
    code = A.jumprelu(pre, theta)
    g_pre = A.pass_through_backward(code, _gather(xp, g, code)).to_dense()
    window = A.jumprelu_window(pre, theta, bandwidth)
    return g_pre, A.jumprelu_theta_backward(window, theta, bandwidth, _gather(xp, g, window))


def jumprelu_step_vjp(pre, theta, bandwidth, g):
    """sae-ref's L0-step pseudo-gradient for an upstream gradient ``g`` on H(z - theta):
    :math:`-\\frac1\\varepsilon \\sum_b g_{bj}` over the kernel's support
    (:func:`~sae_ref.activations.jumprelu_window`), as in :func:`sae_ref.losses.jumprelu_l0`."""
    xp = array_namespace(pre, theta, g)
    window = A.jumprelu_window(pre, theta, bandwidth)
    summed = get_backend(xp).segment_sum(window.cols, _gather(xp, g, window), pre.shape[1])
    return summed * (-1.0 / bandwidth)


def _sgd_after(W, g):
    return constrained_step(W, g, lambda w, grad: w - 0.1 * grad, order="after")


def sae_ref_implementations() -> dict[str, tuple]:
    """``{name: (positional callables, keyword arguments)}`` for every activation-level check,
    with sae-ref's own implementations."""
    from sae_ref.fvu import fvu

    return {
        "batch_topk": ((A.batch_topk,), {}),
        "topk": ((A.topk,), {}),
        "threshold": ((A.threshold,), {}),
        "jumprelu": ((A.jumprelu,), {"vjp": jumprelu_vjp, "step_vjp": jumprelu_step_vjp}),
        "top_afa": ((top_afa,), {}),
        "theta_estimator": ((sae_ref_theta_run("saelens_ema"),), {"kind": "saelens_ema"}),
        "auxk": ((sae_ref_auxk("authors"),), {"convention": "authors"}),
        "fvu": ((lambda x, x_hat: fvu(x, x_hat, "pooled"),), {"variant": "pooled"}),
        "decoder_constraint": ((project_grad,), {"step": _sgd_after}),
    }


def check_sae_ref(*, xp=None, device=None, dtype="float32", max_examples: int = 25, seed: int = 0,
                  only=None) -> Report:
    """Run every activation-level check on sae-ref's own implementations (``only``: a list of
    check names) with arrays of ``xp`` on ``device``."""
    impls = sae_ref_implementations()
    names = list(impls) if only is None else list(only)
    unknown = sorted(set(names) - set(impls))
    if unknown:
        raise ValueError(f"check_sae_ref: argument 'only' names unknown checks {unknown}; known: {sorted(impls)}")
    reports = []
    for name in names:
        args, kwargs = impls[name]
        reports.append(CHECKS[name](*args, **kwargs, xp=xp, device=device, dtype=dtype,
                                    max_examples=max_examples, seed=seed))
    return Report.combine("sae-ref", reports)
