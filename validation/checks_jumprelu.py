r"""Checks of JumpReLU: the forward and its threshold pseudo-gradients.

.. math:: f = z\,H(z - \theta), \qquad
          \frac{\partial f}{\partial z} = H(z - \theta), \qquad
          \frac{\eth f}{\eth \theta} = -\frac{\theta}{\varepsilon}
          K\!\left(\frac{z - \theta}{\varepsilon}\right), \qquad
          \frac{\eth}{\eth \theta} H(z - \theta) = -\frac{1}{\varepsilon} K(\cdot)

with the rectangle kernel :math:`K(u) = \mathbb 1[-\tfrac12 < u < \tfrac12]`
(Rajamanoharan et al. 2024; ALGORITHMS.md section 1). An implementation is given as up to
three callables, each optional:

- ``fn(pre, theta) -> f`` [B, h], the forward (``theta`` [h]);
- ``vjp(pre, param, bandwidth, g) -> (g_pre, g_param)``: the backward of the activation given
  the upstream gradient ``g`` on f [B, h];
- ``step_vjp(pre, param, bandwidth, g) -> g_param``: the backward of the L0 step
  :math:`H(z - \theta)` given the upstream gradient ``g`` on it [B, h].

``param`` is :math:`\theta` with ``parameterization="theta"`` and :math:`\log\theta` with
``"log_theta"``; then the gradient on it must carry the chain-rule factor
:math:`\partial\theta/\partial\log\theta = \theta`. :func:`sae_ref.validation.adapters.torch_vjp`
builds ``vjp`` / ``step_vjp`` from a torch autograd function.

Entries whose side of the kernel's edges could be decided by rounding in the input dtype get
a zero upstream gradient, and with ``log_theta`` the gradient on z is not compared where z is
within rounding of :math:`\exp(\log\theta)`, so every comparison is exact.

>>> from sae_ref.activations import jumprelu
>>> from sae_ref.validation.checks_jumprelu import check_jumprelu
>>> check_jumprelu(jumprelu, max_examples=5).ok
True
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sae_ref.activations import jumprelu as _sr_jumprelu
from sae_ref.activations import jumprelu_theta_backward, jumprelu_window
from sae_ref.validation._common import (
    as_float64, call, check_callable, dense_output, describe_difference, options, positions,
)
from sae_ref.validation.report import Report
from sae_ref.validation.runner import MAX_EXAMPLES, Finding, Invariant, call_user, run_invariants
from sae_ref.validation.strategies import latent_thresholds, pre_activation_batches

PARAMETERIZATIONS = ("theta", "log_theta")
#: Bandwidths drawn when none is given (the two defaults in use, and wide ones that reach
#: neighbouring grid values).
BANDWIDTHS = (0.05, 0.001, 0.5, 1.0)


@st.composite
def _examples(draw, dtype, parameterization, bandwidth):
    pre = draw(pre_activation_batches(dtype=dtype), label="pre")
    theta = draw(latent_thresholds(pre), label="theta")
    eps = bandwidth if bandwidth is not None else draw(st.sampled_from(BANDWIDTHS), label="bandwidth")
    g = draw(hnp.arrays(np.float64, pre.shape, elements=st.sampled_from([1.0, -1.0, 0.5, 2.0, -0.5, 0.0])),
             label="g")
    ex = {"pre": pre, "theta": theta, "bandwidth": float(eps)}
    th = as_float64(theta)
    if parameterization == "log_theta":
        ex["param"] = np.log(th).astype(dtype)
        th = np.exp(as_float64(ex["param"]))  # the threshold the implementation sees
    ex["g"] = np.where(_near_kernel_edge(as_float64(pre), th, eps, dtype), 0.0, g).astype(dtype)
    return ex


def _near_kernel_edge(z, th, eps, dtype):
    """Entries whose side of the kernel's edges |u| = 1/2 rounding in ``dtype`` could flip."""
    e = 8 * float(np.finfo(dtype).eps)
    u = (z - th) / eps
    return np.abs(np.abs(u) - 0.5) <= e * ((np.abs(z) + np.abs(th)) / eps + 1.0)


def _near_theta(ex, dtype):
    """With log theta the implementation's theta is exp(param) rounded in its dtype: entries
    within rounding of it may fall on either side of z > theta."""
    if "param" not in ex:
        return np.zeros(ex["pre"].shape, dtype=bool)
    th = _theta_eff(ex)
    return np.abs(as_float64(ex["pre"]) - th) <= 8 * float(np.finfo(dtype).eps) * np.abs(th)


def _theta_eff(ex):
    return np.exp(as_float64(ex["param"])) if "param" in ex else as_float64(ex["theta"])


def _param(ex):
    return ex["param"] if "param" in ex else ex["theta"]


def _kernel_terms(ex):
    """(K [B, h], theta_eff [h]) in float64."""
    th = _theta_eff(ex)
    u = (as_float64(ex["pre"]) - th) / ex["bandwidth"]
    return ((u > -0.5) & (u < 0.5)).astype(np.float64), th


def ref_theta_grad(ex, parameterization):
    """sae-ref's gradient on the parameter: :func:`~sae_ref.activations.jumprelu_theta_backward`
    at the kernel's support, times theta for the log parameterisation."""
    th = _theta_eff(ex)
    pre = as_float64(ex["pre"])
    w = jumprelu_window(pre, th, ex["bandwidth"])
    g_w = as_float64(ex["g"])[np.asarray(w.rows), np.asarray(w.cols)]
    grad = as_float64(jumprelu_theta_backward(w, th, ex["bandwidth"], g_w))
    return grad * th if parameterization == "log_theta" else grad


def ref_step_grad(ex, parameterization):
    """:math:`-\\frac1\\varepsilon \\sum_b g_{bj} K` at sae-ref's kernel support (times theta
    for the log parameterisation)."""
    th = _theta_eff(ex)
    w = jumprelu_window(as_float64(ex["pre"]), th, ex["bandwidth"])
    grad = np.zeros(th.shape)
    np.add.at(grad, np.asarray(w.cols), as_float64(ex["g"])[np.asarray(w.rows), np.asarray(w.cols)])
    grad *= -1.0 / ex["bandwidth"]
    return grad * th if parameterization == "log_theta" else grad


def _column_tol(terms, eps):
    B = terms.shape[0]
    return 8 * eps * (B + 2) * np.abs(terms).sum(axis=0) + 1e-300


def _grad_finding(got, want, tol, th, parameterization, what):
    bad = np.abs(got - want) > tol
    if not np.any(bad):
        return None
    hint = ""
    if parameterization == "log_theta":
        if np.allclose(got * th, want, rtol=1e-4, atol=1e-12):
            hint = " (it equals the gradient on theta: the chain-rule factor theta is missing)"
    elif np.allclose(got, want * th, rtol=1e-4, atol=1e-12) and not np.allclose(th, 1):
        hint = " (it equals theta times the gradient on theta: a log-parameterisation factor applied twice?)"
    return Finding(f"{what} differs at latents {np.flatnonzero(bad).tolist()}{hint}", got=got, expected=want,
                   difference=describe_difference(got, want))


def check_jumprelu(fn=None, *, vjp=None, step_vjp=None, parameterization: str = "theta",
                   bandwidth: float | None = None, xp=None, device=None, to_user=None, from_user=None,
                   dtype="float32", max_examples: int = MAX_EXAMPLES, seed: int = 0,
                   shrink: bool = True) -> Report:
    """Check a JumpReLU forward ``fn``, its backward ``vjp`` and the L0 step's backward
    ``step_vjp`` (see the module docstring; give at least one) against sae-ref.

    ``parameterization``: ``"theta"`` or ``"log_theta"`` (what ``vjp`` / ``step_vjp`` receive
    and differentiate). ``bandwidth``: the kernel bandwidth passed to them (default: drawn from
    :data:`BANDWIDTHS`). Other arguments as in
    :func:`~sae_ref.validation.checks_selection.check_batch_topk`. Invariants of a callable
    not given are reported as skipped.
    """
    op = "check_jumprelu"
    fn = check_callable(op, "fn", fn, required=False)
    vjp = check_callable(op, "vjp", vjp, required=False)
    step_vjp = check_callable(op, "step_vjp", step_vjp, required=False)
    if fn is None and vjp is None and step_vjp is None:
        raise ValueError(f"{op}: give at least one of 'fn', 'vjp', 'step_vjp'")
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"{op}: argument 'parameterization' must be one of {list(PARAMETERIZATIONS)}, "
                         f"got {parameterization!r}")
    if bandwidth is not None and not (isinstance(bandwidth, (int, float)) and 0 < bandwidth < float("inf")):
        raise ValueError(f"{op}: argument 'bandwidth' must be a positive number, got {bandwidth!r}")
    o = options(op, xp=xp, device=device, to_user=to_user, from_user=from_user, dtype=dtype,
                max_examples=max_examples, seed=seed, shrink=shrink)
    log = parameterization == "log_theta"
    examples = _examples(o.dtype, parameterization, bandwidth)

    def forward(ex):
        return dense_output(o, fn, ex["pre"].shape, ex["pre"], ex["theta"], what="jumprelu")

    def strict(ex):
        f = forward(ex)
        if isinstance(f, Finding):
            return f
        bad = (f != 0) & (as_float64(ex["pre"]) == as_float64(ex["theta"]))
        if np.any(bad):
            return Finding(f"entries with z equal to theta are kept at {positions(bad)} (H(0) must be 0)", got=f,
                           expected=as_float64(_sr_jumprelu(as_float64(ex["pre"]), as_float64(ex["theta"])).to_dense()))
        return None

    def reference(ex):
        f = forward(ex)
        if isinstance(f, Finding):
            return f
        want = as_float64(_sr_jumprelu(as_float64(ex["pre"]), as_float64(ex["theta"])).to_dense())
        if not np.array_equal(f, want):
            return Finding("the output differs from z * H(z - theta)", got=f, expected=want)
        return None

    def backward(ex):
        """The pair (g_pre [B, h], g_param [h]) as float64, or a Finding."""
        user = [o.io.to_user(a) for a in (ex["pre"], _param(ex))]
        out = call_user(vjp, user[0], user[1], ex["bandwidth"], o.io.to_user(ex["g"]), what="vjp")
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            return Finding(f"vjp must return (g_pre, g_param), got {type(out).__name__}")
        g_pre, g_par = (as_float64(call_user(o.io.from_user, a, what="converting vjp's output")) for a in out)
        B, h = ex["pre"].shape
        if g_pre.shape != (B, h) or g_par.shape != (h,):
            return Finding(f"vjp returned shapes {g_pre.shape} and {g_par.shape}, expected {(B, h)} and {(h,)}")
        return g_pre, g_par

    def grad_pre(ex):
        r = backward(ex)
        if isinstance(r, Finding):
            return r
        want = as_float64(ex["g"]) * (as_float64(ex["pre"]) > _theta_eff(ex))
        decided = ~_near_theta(ex, o.dtype)
        if not np.array_equal(r[0][decided], want[decided]):
            return Finding("the gradient on z is not g * H(z - theta)", got=r[0], expected=want)
        return None

    def grad_param(ex):
        r = backward(ex)
        if isinstance(r, Finding):
            return r
        K, th = _kernel_terms(ex)
        terms = as_float64(ex["g"]) * K * th / ex["bandwidth"] * (th if log else 1.0)
        return _grad_finding(r[1], ref_theta_grad(ex, parameterization), _column_tol(terms, o.eps), th,
                             parameterization, "the gradient on " + ("log theta" if log else "theta"))

    def grad_step(ex):
        out = call(o, step_vjp, ex["pre"], _param(ex), ex["bandwidth"], ex["g"], what="step_vjp")
        got = as_float64(out)
        h = ex["pre"].shape[1]
        if got.shape != (h,):
            return Finding(f"step_vjp returned shape {got.shape}, expected {(h,)}", got=got)
        K, th = _kernel_terms(ex)
        terms = as_float64(ex["g"]) * K / ex["bandwidth"] * (th if log else 1.0)
        return _grad_finding(got, ref_step_grad(ex, parameterization), _column_tol(terms, o.eps), th,
                             parameterization, "the L0 step's gradient on " + ("log theta" if log else "theta"))

    def skip(given, name):
        return None if given is not None else f"no '{name}' callable was given"

    p = "log_theta_chain_rule" if log else "theta_rectangle_kernel"
    factor = "theta * " if log else ""
    wrt = "log theta" if log else "theta"
    s = "jumprelu"
    invariants = [
        Invariant(f"{s}.forward_strict_at_theta", "An entry with z equal to its latent's theta is dropped "
                  "(H(0) = 0: JumpReLU keeps z > theta).", examples, strict, skip(fn, "fn")),
        Invariant(f"{s}.forward_matches_reference", "The output equals z * H(z - theta) (sae-ref's jumprelu) "
                  "exactly.", examples, reference, skip(fn, "fn")),
        Invariant(f"{s}.grad_pre_is_heaviside", "The gradient on z is the upstream gradient where z > theta "
                  "and zero elsewhere (df/dz = H(z - theta)).", examples, grad_pre, skip(vjp, "vjp")),
        Invariant(f"{s}.grad_{p}", f"The gradient on {wrt} is {factor}(-theta/eps) * sum_b g K((z - theta)/eps) "
                  "with the rectangle kernel K(u) = 1 for -1/2 < u < 1/2.", examples, grad_param, skip(vjp, "vjp")),
        Invariant(f"{s}.l0_grad_{p}", f"The L0 step H(z - theta) has gradient {factor}(-1/eps) * sum_b g "
                  f"K((z - theta)/eps) on {wrt}.", examples, grad_step, skip(step_vjp, "step_vjp")),
    ]
    return run_invariants(s, invariants, **o.run_kw())
