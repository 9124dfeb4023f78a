r"""Check of a fraction-of-variance-unexplained metric (ALGORITHMS.md section 7).

The implementation is ``fn(x, x_hat) -> fvu`` (a number) for a batch ``x`` [B, d] and its
reconstruction. The variance is taken **about the batch mean** :math:`\bar x`:

- ``variant="pooled"``: :math:`\mathrm{FVU} = \sum_b \|x_b - \hat x_b\|^2 \,/\, \sum_b \|x_b - \bar x\|^2`
  (one ratio of sums; what SAELens's ``explained_variance`` is one minus);
- ``variant="per_token_batch_mean"``: :math:`\frac1B \sum_b \|x_b - \hat x_b\|^2 / \|x_b - \bar x\|^2`
  (a mean of ratios; SAELens's ``explained_variance_legacy`` is one minus).

The names are those of :mod:`sae_ref.fvu`, whose ``fvu(x, x_hat, definition)`` is sae-ref's
implementation of these and more.

The definition about zero (:math:`\sum \|x\|^2` in the denominator) inflates the score when
the activations have a large mean; the invariants below catch it. :func:`fvu_reference` is
the check's own float64 oracle.

>>> import numpy as np
>>> from sae_ref.validation.checks_fvu import check_fvu, fvu_reference
>>> x = np.array([[1., 0.], [3., 0.]])
>>> float(fvu_reference(x, np.array([[2., 0.], [2., 0.]])))   # the mean predicts: 1
1.0
>>> check_fvu(fvu_reference, max_examples=5).ok
True
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sae_ref.validation._common import as_float64, check_callable, options, scalar_output
from sae_ref.validation.report import Report
from sae_ref.validation.runner import MAX_EXAMPLES, Finding, Invariant, run_invariants

VARIANTS = ("pooled", "per_token_batch_mean")


def fvu_reference(x, x_hat, variant: str = "pooled"):
    """FVU about the batch mean, in float64 NumPy (see the module docstring)."""
    if variant not in VARIANTS:
        raise ValueError(f"fvu_reference: argument 'variant' must be one of {list(VARIANTS)}, got {variant!r}")
    x, x_hat = as_float64(x), as_float64(x_hat)
    if x.ndim != 2 or x.shape != x_hat.shape or x.shape[0] < 2:
        raise ValueError(f"fvu_reference: arguments 'x' and 'x_hat' must have one shape [B >= 2, d], "
                         f"got {x.shape} and {x_hat.shape}")
    resid = np.sum((x - x_hat) ** 2, axis=1)
    total = np.sum((x - x.mean(axis=0)) ** 2, axis=1)
    if variant == "pooled":
        return resid.sum() / total.sum()
    return np.mean(resid / total)


def _spread(x, variant):
    total = np.sum((x - x.mean(axis=0)) ** 2, axis=1)
    return total.min() if variant == "per_token_batch_mean" else total.sum()


@st.composite
def _examples(draw, dtype, variant):
    B = draw(st.integers(2, 6), label="B")
    d = draw(st.integers(1, 5), label="d")
    x = draw(hnp.arrays(np.float64, (B, d), elements=st.floats(-4, 4, width=16)), label="x")
    offset = draw(hnp.arrays(np.float64, (d,), elements=st.sampled_from([0.0, 4.0, -4.0, 16.0])), label="offset")
    x = x + offset
    if _spread(x, variant) < 0.25:  # the metric needs variance about the mean (every row, per token)
        x = x + np.where(np.arange(B)[:, None] % 2 == 0, 1.0, -1.0) * (1 + np.arange(B)[:, None])
    how = draw(st.sampled_from(["noise", "free"]), label="x_hat kind")
    other = draw(hnp.arrays(np.float64, (B, d), elements=st.floats(-2, 2, width=16)), label="x_hat part")
    x_hat = x + other if how == "noise" else other + offset
    shift = draw(hnp.arrays(np.float64, (d,), elements=st.sampled_from([1.0, -8.0, 3.5, 16.0])), label="shift")
    a = draw(st.sampled_from([2.0, 0.5, 4.0]), label="scale")
    return {"x": x.astype(dtype), "x_hat": x_hat.astype(dtype), "shift": shift.astype(dtype), "a": a}


def check_fvu(fn, *, variant: str = "pooled", xp=None, device=None, to_user=None, from_user=None,
              dtype="float32", max_examples: int = MAX_EXAMPLES, seed: int = 0, shrink: bool = True) -> Report:
    """Check an FVU ``fn(x, x_hat) -> number`` (module docstring) against its invariants and
    :func:`fvu_reference`. For a metric of explained variance pass ``lambda x, y: 1 - ev(x, y)``.
    Other arguments as in :func:`~sae_ref.validation.checks_selection.check_batch_topk`."""
    op = "check_fvu"
    fn = check_callable(op, "fn", fn)
    if variant not in VARIANTS:
        raise ValueError(f"{op}: argument 'variant' must be one of {list(VARIANTS)}, got {variant!r}")
    o = options(op, xp=xp, device=device, to_user=to_user, from_user=from_user, dtype=dtype,
                max_examples=max_examples, seed=seed, shrink=shrink)
    examples = _examples(o.dtype, variant)

    def value(x, x_hat):
        return scalar_output(o, fn, x, x_hat, what="fvu")

    def tol(x, *values):
        """Rounding allowance: the input dtype's eps times the conditioning of the variance
        (sum of squares about zero over the sum about the mean)."""
        x = as_float64(x)
        cond = 1.0 + np.sum(x * x) / max(_spread(x, variant), 1e-300)
        return 64 * o.eps * cond * (1.0 + max(abs(v) for v in values))

    def ref(x, x_hat):
        return float(fvu_reference(x, x_hat, variant))

    def mismatch(got, want, x, what):
        if abs(got - want) > tol(x, got, want):
            return Finding(what, got=np.asarray(got), expected=np.asarray(want))
        return None

    def perfect(ex):
        v = value(ex["x"], ex["x"])
        return v if isinstance(v, Finding) else mismatch(v, 0.0, ex["x"], f"fvu(x, x) = {v:.8g}, not 0")

    def mean_is_one(ex):
        mean = np.broadcast_to(as_float64(ex["x"]).mean(axis=0), ex["x"].shape).astype(o.dtype)
        v = value(ex["x"], mean)
        if isinstance(v, Finding):
            return v
        return mismatch(v, ref(ex["x"], mean), ex["x"], f"predicting every row by the batch mean scores {v:.8g}, "
                        "not 1: the variance is not taken about the batch mean")

    def translation(ex):
        x2 = (as_float64(ex["x"]) + as_float64(ex["shift"])).astype(o.dtype)
        h2 = (as_float64(ex["x_hat"]) + as_float64(ex["shift"])).astype(o.dtype)
        a, b = value(ex["x"], ex["x_hat"]), value(x2, h2)
        for r in (a, b):
            if isinstance(r, Finding):
                return r
        if abs(a - b) > tol(x2, a, b) + tol(ex["x"], a, b):
            return Finding(f"adding the same vector (shift) to x and x_hat moved the FVU from {a:.8g} to {b:.8g}",
                           got=np.asarray([a, b]), expected=np.asarray([ref(ex["x"], ex["x_hat"]), ref(x2, h2)]))
        return None

    def scaling(ex):
        x2 = (as_float64(ex["x"]) * ex["a"]).astype(o.dtype)
        h2 = (as_float64(ex["x_hat"]) * ex["a"]).astype(o.dtype)
        a, b = value(ex["x"], ex["x_hat"]), value(x2, h2)
        for r in (a, b):
            if isinstance(r, Finding):
                return r
        if abs(a - b) > tol(ex["x"], a, b):
            return Finding(f"scaling x and x_hat by a = {ex['a']} moved the FVU from {a:.8g} to {b:.8g}",
                           got=np.asarray([a, b]), expected=np.asarray([ref(ex["x"], ex["x_hat"])] * 2))
        return None

    def reference(ex):
        v = value(ex["x"], ex["x_hat"])
        if isinstance(v, Finding):
            return v
        want = ref(ex["x"], ex["x_hat"])
        return mismatch(v, want, ex["x"], f"the FVU is {v:.8g}; about the batch mean ({variant}) it is {want:.8g}")

    s = "fvu"
    invariants = [
        Invariant(f"{s}.perfect_reconstruction_is_zero", "fvu(x, x) = 0.", examples, perfect),
        Invariant(f"{s}.mean_prediction_is_one", "The variance is taken about the batch mean: predicting every "
                  "row by the batch mean scores exactly 1.", examples, mean_is_one),
        Invariant(f"{s}.translation_invariant", "Adding one vector to both x and x_hat leaves the FVU unchanged.",
                  examples, translation),
        Invariant(f"{s}.scale_invariant", "Multiplying x and x_hat by one positive number leaves the FVU unchanged.",
                  examples, scaling),
        Invariant(f"{s}.matches_reference", f"The value equals the float64 FVU about the batch mean ({variant}).",
                  examples, reference),
    ]
    return run_invariants(s, invariants, **o.run_kw())
