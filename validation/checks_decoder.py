r"""Check of the unit-norm decoder constraint (ALGORITHMS.md section 2).

Two callables, either optional:

- ``project(W_dec, g) -> g'``: each row's gradient without its component along the row,
  :math:`g_j - (g_j \cdot \hat w_j)\hat w_j` with :math:`\hat w_j = W_j / \|W_j\|`;
- ``step(W_dec, g) -> W_new``: a whole constrained update in the "project, step, renormalise"
  order (SAELens, dictionary_learning), after which every row has norm 1.

The decoders drawn have rows of any norm (the projection must use the unit direction), with
norms between 1/16 and about 4.

>>> from sae_ref.decoder import project_grad
>>> from sae_ref.validation.checks_decoder import check_decoder_constraint
>>> check_decoder_constraint(project_grad, max_examples=5).ok
True
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sae_ref.decoder import project_grad as _sr_project
from sae_ref.validation._common import as_float64, check_callable, dense_output, options
from sae_ref.validation.report import Report
from sae_ref.validation.runner import MAX_EXAMPLES, Finding, Invariant, run_invariants


@st.composite
def _examples(draw, dtype):
    h = draw(st.integers(1, 6), label="h")
    d = draw(st.integers(1, 5), label="d")
    W = draw(hnp.arrays(np.float64, (h, d), elements=st.floats(-2, 2, width=16)), label="W_dec")
    for j in np.flatnonzero(np.linalg.norm(W, axis=1) < 1 / 16):  # rows need a direction
        W[j, j % d] = 1.0 / 16 if W[j, j % d] >= 0 else -1.0 / 16
    g = draw(hnp.arrays(np.float64, (h, d), elements=st.floats(-2, 2, width=16)), label="g")
    return {"W_dec": W.astype(dtype), "g": g.astype(dtype)}


def _unit(W):
    return W / np.linalg.norm(W, axis=1, keepdims=True)


def check_decoder_constraint(project=None, *, step=None, xp=None, device=None, to_user=None, from_user=None,
                             dtype="float32", max_examples: int = MAX_EXAMPLES, seed: int = 0,
                             shrink: bool = True) -> Report:
    """Check a gradient projection ``project(W_dec, g)`` and/or a constrained update
    ``step(W_dec, g)`` (module docstring). Other arguments as in
    :func:`~sae_ref.validation.checks_selection.check_batch_topk`."""
    op = "check_decoder_constraint"
    project = check_callable(op, "project", project, required=False)
    step = check_callable(op, "step", step, required=False)
    if project is None and step is None:
        raise ValueError(f"{op}: give at least one of 'project', 'step'")
    o = options(op, xp=xp, device=device, to_user=to_user, from_user=from_user, dtype=dtype,
                max_examples=max_examples, seed=seed, shrink=shrink)
    tol = 64 * o.eps
    examples = _examples(o.dtype)

    def proj(W, g):
        return dense_output(o, project, W.shape, W, g, what="project")

    def ref(ex):
        return as_float64(_sr_project(as_float64(ex["W_dec"]), as_float64(ex["g"])))

    def bound(ex):
        return tol * (np.linalg.norm(as_float64(ex["g"]), axis=1) + 1e-30)

    def orthogonal(ex):
        p = proj(ex["W_dec"], ex["g"])
        if isinstance(p, Finding):
            return p
        radial = np.abs(np.sum(p * _unit(as_float64(ex["W_dec"])), axis=1))
        bad = np.flatnonzero(radial > bound(ex))
        if bad.size:
            return Finding(f"rows {bad.tolist()} of the projected gradient still have a component along their "
                           f"decoder row ({radial[bad].tolist()})", got=p, expected=ref(ex))
        return None

    def tangent(ex):
        p = proj(ex["W_dec"], ex["g"])
        if isinstance(p, Finding):
            return p
        want = ref(ex)
        bad = np.flatnonzero(np.linalg.norm(p - want, axis=1) > bound(ex))
        if bad.size:
            return Finding(f"rows {bad.tolist()} differ from g - (g . w_hat) w_hat", got=p, expected=want)
        return None

    def idempotent(ex):
        p = proj(ex["W_dec"], ex["g"])
        if isinstance(p, Finding):
            return p
        q = proj(ex["W_dec"], p.astype(o.dtype))
        if isinstance(q, Finding):
            return q
        bad = np.flatnonzero(np.linalg.norm(q - p, axis=1) > bound(ex))
        if bad.size:
            return Finding(f"projecting twice changes rows {bad.tolist()}", got=q, expected=ref(ex))
        return None

    def unit_after(ex):
        W = dense_output(o, step, ex["W_dec"].shape, ex["W_dec"], ex["g"], what="step")
        if isinstance(W, Finding):
            return W
        norms = np.linalg.norm(W, axis=1)
        bad = np.flatnonzero(np.abs(norms - 1) > tol)
        if bad.size:
            return Finding(f"after the step, rows {bad.tolist()} have norms {norms[bad].tolist()}", got=W)
        return None

    def skip(given, name):
        return None if given is not None else f"no '{name}' callable was given"

    s = "decoder"
    invariants = [
        Invariant(f"{s}.projected_gradient_orthogonal_to_rows", "Each row of the projected gradient is "
                  "orthogonal to its decoder row.", examples, orthogonal, skip(project, "project")),
        Invariant(f"{s}.projection_removes_only_the_radial_part", "The projection is g - (g . w_hat) w_hat with "
                  "w_hat the unit row (sae-ref's project_grad).", examples, tangent, skip(project, "project")),
        Invariant(f"{s}.projection_is_idempotent", "Projecting an already projected gradient changes nothing.",
                  examples, idempotent, skip(project, "project")),
        Invariant(f"{s}.rows_unit_after_step", "After the constrained step every decoder row has norm 1.",
                  examples, unit_after, skip(step, "step")),
    ]
    return run_invariants(s, invariants, **o.run_kw())
