r"""Check of the AuxK dead-latent loss (Gao et al. 2024; ALGORITHMS.md section 2).

The implementation is ``fn(pre, dead, residual, W_dec, b_dec, k_aux) -> loss`` (a number):
per row, the top :math:`\min(k_{aux}, n_{dead})` of :math:`\mathrm{relu}(z)` restricted to
the dead latents, decoded with the dead rows of ``W_dec`` and **no** ``b_dec``, fitted to the
residual :math:`e`:

.. math:: \hat e = \mathrm{TopK}_{k'}\!\big(\mathrm{relu}(z) \odot \mathbb 1_{dead}\big) W_{dec},
          \qquad L = \mathrm{reduce}\big((\hat e - e)^2\big).

``b_dec`` is passed only so that an implementation that wrongly adds it can be caught.
``convention``: ``"authors"`` (mean over the :math:`Bd` elements), ``"sample"`` (sum over d,
mean over B: d times "authors", the unit SAELens uses) or ``"normalized"`` (divided by
:math:`\sum (e - \bar e)^2`, OpenAI / dictionary_learning). The loss is unscaled (no
coefficient). ``k_aux`` is drawn per example unless fixed: an int, or ``k_aux(d, h) -> int``
for an implementation that derives it (SAELens: ``d // 2``).

>>> from sae_ref.validation.checks_auxk import check_auxk, sae_ref_auxk
>>> check_auxk(sae_ref_auxk("authors"), max_examples=5).ok
True
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sae_ref.auxk import auxk as _sr_auxk
from sae_ref.validation._common import as_float64, check_callable, options, scalar_output
from sae_ref.validation.report import Report
from sae_ref.validation.runner import MAX_EXAMPLES, Finding, Invariant, run_invariants
from sae_ref.validation.strategies import pre_activation_batches, unit_decoders

CONVENTIONS = ("authors", "sample", "normalized")


def sae_ref_auxk(convention: str = "authors"):
    """sae-ref's :func:`sae_ref.auxk.auxk` in the form the check takes (``"sample"`` is
    ``"authors"`` times d)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"sae_ref_auxk: argument 'convention' must be one of {list(CONVENTIONS)}, got {convention!r}")

    def fn(pre, dead, residual, W_dec, b_dec, k_aux):
        conv = "authors" if convention == "sample" else convention
        value = _sr_auxk(pre, dead, residual, W_dec, k_aux, convention=conv).value
        return value * residual.shape[1] if convention == "sample" else value

    return fn


def ref_auxk(ex, convention) -> float:
    conv = "authors" if convention == "sample" else convention
    r = _sr_auxk(as_float64(ex["pre"]), np.asarray(ex["dead"], dtype=bool), as_float64(ex["residual"]),
                 as_float64(ex["W_dec"]), ex["k_aux"], convention=conv)
    v = float(r.value)
    return v * ex["residual"].shape[1] if convention == "sample" else v


_SHIFT = st.sampled_from([1.0, -1.0, 0.5, 2.0, -2.0])


@st.composite
def _examples(draw, dtype, convention, k_aux):
    B = draw(st.integers(2 if convention == "normalized" else 1, 4), label="B")
    h = draw(st.integers(1, 8), label="h")
    d = draw(st.integers(2, 5), label="d")
    pre = draw(pre_activation_batches(dtype=dtype, shape=(B, h), scale=1.0), label="pre")
    dead = draw(hnp.arrays(np.bool_, (h,)), label="dead")
    residual = draw(hnp.arrays(np.float64, (B, d), elements=st.floats(-2, 2, width=16)), label="residual")
    if convention == "normalized" and not np.any(residual != residual[:1]):
        residual[0, 0] += 1.0  # the normalised loss needs a residual that varies over the batch
    W_dec = draw(unit_decoders(h, d), label="W_dec")
    b_dec = draw(hnp.arrays(np.float64, (d,), elements=st.floats(-1, 1, width=16)), label="b_dec")
    if k_aux is None:
        k = draw(st.integers(1, h), label="k_aux")
    else:
        k = int(k_aux(d, h)) if callable(k_aux) else int(k_aux)
    return {"pre": pre, "dead": dead, "residual": residual.astype(dtype), "W_dec": W_dec.astype(dtype),
            "b_dec": b_dec.astype(dtype), "k_aux": k}


@st.composite
def _with_shift(draw, dtype, convention, k_aux):
    ex = draw(_examples(dtype, convention, k_aux))
    d = ex["b_dec"].shape[0]
    ex["b_dec_shift"] = draw(hnp.arrays(np.float64, (d,), elements=_SHIFT), label="b_dec shift").astype(dtype)
    return ex


@st.composite
def _with_live_change(draw, dtype, convention, k_aux):
    ex = draw(_examples(dtype, convention, k_aux))
    other = draw(pre_activation_batches(dtype=dtype, shape=ex["pre"].shape, scale=1.0), label="new live values")
    ex["pre_live_changed"] = np.where(ex["dead"][None, :], ex["pre"], other).astype(dtype)
    return ex


@st.composite
def _with_lowered(draw, dtype, convention, k_aux):
    ex = draw(_examples(dtype, convention, k_aux))
    c = draw(st.sampled_from([0.5, 1.0, 3.0]), label="how much lower")
    lowered = np.where(ex["dead"][None, :] & (ex["pre"] <= 0), as_float64(ex["pre"]) - c, ex["pre"])
    ex["pre_lowered"] = lowered.astype(dtype)
    return ex


def check_auxk(fn, *, convention: str = "authors", k_aux=None, rtol: float | None = None, xp=None,
               device=None, to_user=None, from_user=None, dtype="float32",
               max_examples: int = MAX_EXAMPLES, seed: int = 0, shrink: bool = True) -> Report:
    """Check an AuxK loss ``fn(pre, dead, residual, W_dec, b_dec, k_aux) -> loss`` (module
    docstring) against its invariants and :func:`sae_ref.auxk.auxk` in ``convention``.

    ``rtol``: relative tolerance of value comparisons (default 1e-4 for float32, 1e-10 for
    float64). Other arguments as in
    :func:`~sae_ref.validation.checks_selection.check_batch_topk`.
    """
    op = "check_auxk"
    fn = check_callable(op, "fn", fn)
    if convention not in CONVENTIONS:
        raise ValueError(f"{op}: argument 'convention' must be one of {list(CONVENTIONS)}, got {convention!r}")
    if k_aux is not None and not callable(k_aux) and (isinstance(k_aux, bool) or not isinstance(k_aux, int) or k_aux < 1):
        raise ValueError(f"{op}: argument 'k_aux' must be None, a positive integer or a callable (d, h) -> int, got {k_aux!r}")
    o = options(op, xp=xp, device=device, to_user=to_user, from_user=from_user, dtype=dtype,
                max_examples=max_examples, seed=seed, shrink=shrink)
    tol = rtol if rtol is not None else (1e-4 if o.dtype == np.float32 else 1e-10)
    args = (o.dtype, convention, k_aux)

    def loss(ex, pre=None, b_dec=None):
        pre = ex["pre"] if pre is None else pre
        b_dec = ex["b_dec"] if b_dec is None else b_dec
        return scalar_output(o, fn, pre, ex["dead"], ex["residual"], ex["W_dec"], b_dec, ex["k_aux"], what="auxk")

    def scale(ex, *values):
        e2 = float(np.mean(as_float64(ex["residual"]) ** 2)) * (ex["residual"].shape[1] if convention == "sample" else 1)
        return tol * max([abs(v) for v in values] + [e2, 1e-30])

    def same(a, b, ex):
        return abs(a - b) <= scale(ex, a, b)

    def no_b_dec(ex):
        a = loss(ex)
        if isinstance(a, Finding):
            return a
        b = loss(ex, b_dec=(as_float64(ex["b_dec"]) + as_float64(ex["b_dec_shift"])).astype(o.dtype))
        if isinstance(b, Finding):
            return b
        if not same(a, b, ex):
            return Finding(f"moving b_dec by b_dec_shift changed the loss from {a:.8g} to {b:.8g}: the residual's "
                           "reconstruction includes b_dec", got=np.asarray([a, b]),
                           expected=np.asarray([ref_auxk(ex, convention)] * 2))
        return None

    def none_dead(ex):
        dead = np.zeros_like(ex["dead"])
        ex0 = dict(ex, dead=dead)
        a = loss(ex0)
        if isinstance(a, Finding):
            return a
        if abs(a) > scale(ex, a):
            return Finding(f"with no dead latent the loss is {a:.8g}, not 0", got=np.asarray(a), expected=np.asarray(0.0))
        return None

    def live_ignored(ex):
        a, b = loss(ex), loss(ex, pre=ex["pre_live_changed"])
        for r in (a, b):
            if isinstance(r, Finding):
                return r
        if not same(a, b, ex):
            return Finding(f"changing the pre-activations of live latents (to pre_live_changed) moved the loss "
                           f"from {a:.8g} to {b:.8g}", got=np.asarray([a, b]),
                           expected=np.asarray([ref_auxk(ex, convention)] * 2))
        return None

    def relu(ex):
        a, b = loss(ex), loss(ex, pre=ex["pre_lowered"])
        for r in (a, b):
            if isinstance(r, Finding):
                return r
        if not same(a, b, ex):
            return Finding(f"lowering non-positive pre-activations of dead latents (pre_lowered) moved the loss "
                           f"from {a:.8g} to {b:.8g}: dead latents enter through z, not relu(z)",
                           got=np.asarray([a, b]), expected=np.asarray([ref_auxk(ex, convention)] * 2))
        return None

    def reference(ex):
        a = loss(ex)
        if isinstance(a, Finding):
            return a
        want = ref_auxk(ex, convention)
        if not same(a, want, ex):
            return Finding(f"the loss is {a:.8g}; sae-ref's {convention!r} AuxK gives {want:.8g}",
                           got=np.asarray(a), expected=np.asarray(want))
        return None

    s = "auxk"
    invariants = [
        Invariant(f"{s}.excludes_b_dec", "The residual's reconstruction is f_aux @ W_dec with no b_dec: the loss "
                  "does not change with b_dec.", _with_shift(*args), no_b_dec),
        Invariant(f"{s}.zero_without_dead_latents", "With no dead latent the loss is 0.", _examples(*args), none_dead),
        Invariant(f"{s}.ignores_live_latents", "Only dead latents enter: changing the pre-activations of live "
                  "latents leaves the loss unchanged.", _with_live_change(*args), live_ignored),
        Invariant(f"{s}.dead_latents_enter_through_relu", "Dead latents are selected from relu(z): lowering a "
                  "dead latent's non-positive pre-activation leaves the loss unchanged.", _with_lowered(*args), relu),
        Invariant(f"{s}.matches_reference", f"The loss equals sae-ref's AuxK ({convention!r} convention).",
                  _examples(*args), reference),
    ]
    return run_invariants(s, invariants, **o.run_kw())
