r"""Checks of the selections: BatchTopK, TopK and threshold inference.

Each check takes the implementation as a callable returning the dense activations
(shape [B, h], zeros where nothing is kept; sae-ref's :class:`~sae_ref.sparse.SparseCode` is
accepted too):

- ``batch_topk(pre, k)`` keeps the :math:`Bk` largest entries of :math:`\mathrm{relu}(z)` over
  the whole batch;
- ``topk(pre, k)`` keeps the k largest of each row;
- ``threshold(pre, theta)`` keeps :math:`z > \theta` (and :math:`z > 0`), one global
  :math:`\theta` (a Python float).

The invariants are those of ALGORITHMS.md section 1 and 3; the tie rule is sae-ref's (among
equal values the lower row-major index wins; in a row, the lower column).

>>> from sae_ref.activations import batch_topk
>>> from sae_ref.validation.checks_selection import check_batch_topk
>>> check_batch_topk(batch_topk, max_examples=5).ok
True
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from sae_ref.activations import batch_topk as _sr_batch_topk
from sae_ref.activations import threshold as _sr_threshold
from sae_ref.activations import topk as _sr_topk
from sae_ref.validation._common import (
    as_float64, check_callable, dense_output, describe_difference, options, positions,
)
from sae_ref.validation.report import Report
from sae_ref.validation.runner import MAX_EXAMPLES, Finding, Invariant, run_invariants
from sae_ref.validation.strategies import pre_activation_batches


# --- sae-ref's answers (float64 NumPy; the inputs are exact in float64) ----------------------
def ref_batch_topk(pre, k):
    return as_float64(_sr_batch_topk(as_float64(pre), k).to_dense())


def ref_topk(pre, k):
    return as_float64(_sr_topk(as_float64(pre), k).to_dense())


def ref_threshold(pre, theta):
    return as_float64(_sr_threshold(as_float64(pre), float(theta)).to_dense())


# --- strategies -------------------------------------------------------------------------------
@st.composite
def _pre_k(draw, dtype, *, ties=None, shape=None, min_h=1, k_below_h=False):
    pre = draw(pre_activation_batches(dtype=dtype, ties=ties, shape=shape, min_h=min_h), label="pre")
    h = pre.shape[1]
    k = draw(st.integers(1, h - 1 if k_below_h else h), label="k")
    return {"pre": pre, "k": k}


@st.composite
def _pre_k_perm(draw, dtype):
    ex = draw(_pre_k(dtype, ties=False))
    ex["perm"] = np.array(draw(st.permutations(range(ex["pre"].shape[0])), label="perm"), dtype=np.int64)
    return ex


@st.composite
def _pre_theta(draw, dtype):
    pre = draw(pre_activation_batches(dtype=dtype), label="pre")
    positive = pre[pre > 0]
    how = draw(st.sampled_from(["copy", "grid", "negative", "zero"]), label="theta kind")
    if how == "copy" and positive.size:
        theta = float(positive[draw(st.integers(0, positive.size - 1), label="which entry")])
    elif how == "negative":
        theta = -draw(st.sampled_from([0.5, 1.0, 1e3]), label="theta")
    elif how == "zero":
        theta = 0.0
    else:
        theta = draw(st.sampled_from([0.25, 0.5, 1.0, 2.0]), label="theta")
    return {"pre": pre, "theta": theta}


# --- invariants shared by the two top-k selections --------------------------------------------
def _kept(out):
    return out != 0


def _values_pass_through(out, pre):
    pre = as_float64(pre)
    bad = _kept(out) & ((out != pre) | (pre <= 0))
    if np.any(bad):
        return Finding(f"entries at {positions(bad)} are nonzero but not the (positive) input value there",
                       got=out)
    return None


def _tie_prefix(values, kept):
    """Among the entries equal to the smallest kept value (in index order), the kept ones must
    come first. Returns (value, candidate indices, kept flags) when the rule is broken."""
    if not np.any(kept):
        return None
    v = values[kept].min()
    cand = np.flatnonzero(values == v)
    flags = kept[cand]
    if np.array_equal(flags, np.arange(cand.size) < flags.sum()):
        return None
    return v, cand, flags


def _matches(out, expected):
    if np.array_equal(out, expected):
        return None
    return Finding("the output differs from sae-ref's", got=out, expected=expected,
                   difference=describe_difference(out, expected))


# --- BatchTopK --------------------------------------------------------------------------------
def check_batch_topk(fn, *, xp=None, device=None, to_user=None, from_user=None, dtype="float32",
                     max_examples: int = MAX_EXAMPLES, seed: int = 0, shrink: bool = True) -> Report:
    """Check a BatchTopK implementation ``fn(pre, k) -> activations [B, h]`` against the
    invariants of ALGORITHMS.md section 1 and against :func:`sae_ref.activations.batch_topk`.

    Parameters
    ----------
    fn : callable
        ``fn(pre, k)`` with ``pre`` [B, h] in the implementation's array type and ``k`` an int.
    xp, device : optional
        The implementation's array library and device (default NumPy); or give
        ``to_user`` / ``from_user`` conversions (see :mod:`sae_ref.validation.interface`).
    dtype : {"float32", "float64"}
        The dtype of the inputs drawn.
    max_examples, seed, shrink
        Hypothesis's budget per invariant, its seed (a check is reproducible), and whether
        to shrink a failure to a minimal example.

    Returns
    -------
    Report
    """
    op = "check_batch_topk"
    fn = check_callable(op, "fn", fn)
    o = options(op, xp=xp, device=device, to_user=to_user, from_user=from_user, dtype=dtype,
                max_examples=max_examples, seed=seed, shrink=shrink)
    dt = o.dtype

    def out(pre, k):
        return dense_output(o, fn, pre.shape, pre, k, what="batch_topk")

    def values(ex):
        f = out(ex["pre"], ex["k"])
        return f if isinstance(f, Finding) else _values_pass_through(f, ex["pre"])

    def count(ex):
        f = out(ex["pre"], ex["k"])
        if isinstance(f, Finding):
            return f
        B = ex["pre"].shape[0]
        want = min(B * ex["k"], int(np.count_nonzero(ex["pre"] > 0)))
        got = int(np.count_nonzero(f))
        if got != want:
            return Finding(f"{got} entries kept; B*k = {B * ex['k']} and {int(np.count_nonzero(ex['pre'] > 0))} "
                           f"inputs are positive, so {want} must be", got=f, expected=ref_batch_topk(ex["pre"], ex["k"]))
        return None

    def largest(ex):
        f = out(ex["pre"], ex["k"])
        if isinstance(f, Finding):
            return f
        pre = as_float64(ex["pre"])
        kept, dropped = _kept(f), ~_kept(f) & (pre > 0)
        if np.any(kept) and np.any(dropped) and pre[kept].min() < pre[dropped].max():
            lo = np.argwhere(kept & (pre == pre[kept].min()))[0]
            hi = np.argwhere(dropped & (pre == pre[dropped].max()))[0]
            return Finding(f"kept {pre[tuple(lo)]:g} at {tuple(int(i) for i in lo)} but dropped the larger "
                           f"{pre[tuple(hi)]:g} at {tuple(int(i) for i in hi)}", got=f,
                           expected=ref_batch_topk(ex["pre"], ex["k"]))
        return None

    def ties(ex):
        f = out(ex["pre"], ex["k"])
        if isinstance(f, Finding):
            return f
        broken = _tie_prefix(as_float64(ex["pre"]).ravel(), _kept(f).ravel())
        if broken is None:
            return None
        v, cand, flags = broken
        return Finding(f"the entries equal to the cut value {v:g} sit at flat indices {cand.tolist()}; "
                       f"kept {cand[flags].tolist()}, the tie rule keeps {cand[:int(flags.sum())].tolist()}",
                       got=f, expected=ref_batch_topk(ex["pre"], ex["k"]))

    def permute(ex):
        f = out(ex["pre"], ex["k"])
        if isinstance(f, Finding):
            return f
        p = ex["perm"]
        g = out(ex["pre"][p], ex["k"])
        if isinstance(g, Finding):
            return g
        if not np.array_equal(g, f[p]):
            return Finding("the output for the permuted batch (got) is not the permuted output; rows differ at "
                           f"{positions(np.any(g != f[p], axis=1))}", got=g,
                           expected=ref_batch_topk(ex["pre"][p], ex["k"]))
        return None

    def one_row(ex):
        f = out(ex["pre"], ex["k"])
        if isinstance(f, Finding):
            return f
        want = ref_topk(ex["pre"], ex["k"])
        if not np.array_equal(f, want):
            return Finding("a one-row batch does not give TopK of the row", got=f, expected=want,
                           difference=describe_difference(f, want))
        return None

    def nested(ex):
        f = out(ex["pre"], ex["k"])
        g = out(ex["pre"], ex["k"] + 1)
        for r in (f, g):
            if isinstance(r, Finding):
                return r
        extra = _kept(f) & ~_kept(g)
        if np.any(extra):
            return Finding(f"entries at {positions(extra)} are kept for k = {ex['k']} but not for k = {ex['k'] + 1}",
                           got=[f, g])
        return None

    def reference(ex):
        f = out(ex["pre"], ex["k"])
        return f if isinstance(f, Finding) else _matches(f, ref_batch_topk(ex["pre"], ex["k"]))

    s = "batch_topk"
    invariants = [
        Invariant(f"{s}.values_pass_through", "The output has the input's shape; every nonzero entry "
                  "is positive and equals the input there.", _pre_k(dt), values),
        Invariant(f"{s}.keeps_min_Bk_and_positives", "Exactly min(B*k, number of positive inputs) entries "
                  "are kept: B*k when enough are positive (mean L0 exactly k), every positive one otherwise.",
                  _pre_k(dt), count),
        Invariant(f"{s}.keeps_the_largest_of_the_batch", "Every kept entry is at least as large as every "
                  "dropped positive entry anywhere in the batch (one selection over all B*h entries, "
                  "not row by row).", _pre_k(dt), largest),
        Invariant(f"{s}.ties_to_lower_flat_index", "Among the entries equal to the smallest kept value, "
                  "those with the lowest row-major (flat) index are kept.", _pre_k(dt, ties=True), ties),
        Invariant(f"{s}.rows_permute_with_the_input", "Permuting the rows of a batch without ties permutes "
                  "the rows of the output.", _pre_k_perm(dt), permute),
        Invariant(f"{s}.one_row_is_topk", "A batch of one row gives TopK of that row.",
                  _one_row(dt), one_row),
        Invariant(f"{s}.nested_in_k", "The entries kept for k are among those kept for k + 1.",
                  _pre_k(dt, min_h=2, k_below_h=True), nested),
        Invariant(f"{s}.matches_reference", "The output equals sae-ref's batch_topk exactly.",
                  _pre_k(dt), reference),
    ]
    return run_invariants(s, invariants, **o.run_kw())


@st.composite
def _one_row(draw, dtype):
    h = draw(st.integers(1, 10), label="h")
    return draw(_pre_k(dtype, shape=(1, h)))


# --- TopK -------------------------------------------------------------------------------------
def check_topk(fn, *, xp=None, device=None, to_user=None, from_user=None, dtype="float32",
               max_examples: int = MAX_EXAMPLES, seed: int = 0, shrink: bool = True) -> Report:
    """Check a TopK implementation ``fn(pre, k) -> activations [B, h]`` (per row, after ReLU)
    against its invariants and :func:`sae_ref.activations.topk`. Arguments as in
    :func:`check_batch_topk`."""
    op = "check_topk"
    fn = check_callable(op, "fn", fn)
    o = options(op, xp=xp, device=device, to_user=to_user, from_user=from_user, dtype=dtype,
                max_examples=max_examples, seed=seed, shrink=shrink)
    dt = o.dtype

    def out(pre, k):
        return dense_output(o, fn, pre.shape, pre, k, what="topk")

    def values(ex):
        f = out(ex["pre"], ex["k"])
        return f if isinstance(f, Finding) else _values_pass_through(f, ex["pre"])

    def count(ex):
        f = out(ex["pre"], ex["k"])
        if isinstance(f, Finding):
            return f
        want = np.minimum(ex["k"], np.count_nonzero(ex["pre"] > 0, axis=1))
        got = np.count_nonzero(f, axis=1)
        bad = np.flatnonzero(got != want)
        if bad.size:
            b = int(bad[0])
            return Finding(f"row {b} keeps {int(got[b])} entries; it has {int(np.count_nonzero(ex['pre'][b] > 0))} "
                           f"positive inputs and k = {ex['k']}, so {int(want[b])} must be kept "
                           f"(kept per row: {got.tolist()}, expected {want.tolist()})",
                           got=f, expected=ref_topk(ex["pre"], ex["k"]))
        return None

    def largest(ex):
        f = out(ex["pre"], ex["k"])
        if isinstance(f, Finding):
            return f
        pre = as_float64(ex["pre"])
        for b in range(pre.shape[0]):
            kept, dropped = _kept(f[b]), ~_kept(f[b]) & (pre[b] > 0)
            if np.any(kept) and np.any(dropped) and pre[b][kept].min() < pre[b][dropped].max():
                return Finding(f"row {b} keeps {pre[b][kept].min():g} but drops the larger {pre[b][dropped].max():g}",
                               got=f, expected=ref_topk(ex["pre"], ex["k"]))
        return None

    def ties(ex):
        f = out(ex["pre"], ex["k"])
        if isinstance(f, Finding):
            return f
        pre = as_float64(ex["pre"])
        for b in range(pre.shape[0]):
            broken = _tie_prefix(pre[b], _kept(f[b]))
            if broken is not None:
                v, cand, flags = broken
                return Finding(f"row {b}: the entries equal to the cut value {v:g} are in columns {cand.tolist()}; "
                               f"kept {cand[flags].tolist()}, the tie rule keeps {cand[:int(flags.sum())].tolist()}",
                               got=f, expected=ref_topk(ex["pre"], ex["k"]))
        return None

    def independent(ex):
        f = out(ex["pre"], ex["k"])
        if isinstance(f, Finding):
            return f
        for b in range(ex["pre"].shape[0]):
            g = out(ex["pre"][b:b + 1], ex["k"])
            if isinstance(g, Finding):
                return g
            if not np.array_equal(g[0], f[b]):
                return Finding(f"row {b} alone (got) gives another output than within the batch: {f[b].tolist()}",
                               got=g[0], expected=ref_topk(ex["pre"][b:b + 1], ex["k"])[0])
        return None

    def nested(ex):
        f, g = out(ex["pre"], ex["k"]), out(ex["pre"], ex["k"] + 1)
        for r in (f, g):
            if isinstance(r, Finding):
                return r
        extra = _kept(f) & ~_kept(g)
        if np.any(extra):
            return Finding(f"entries at {positions(extra)} are kept for k = {ex['k']} but not for k = {ex['k'] + 1}",
                           got=[f, g])
        return None

    def reference(ex):
        f = out(ex["pre"], ex["k"])
        return f if isinstance(f, Finding) else _matches(f, ref_topk(ex["pre"], ex["k"]))

    s = "topk"
    invariants = [
        Invariant(f"{s}.values_pass_through", "The output has the input's shape; every nonzero entry "
                  "is positive and equals the input there.", _pre_k(dt), values),
        Invariant(f"{s}.keeps_min_k_per_row", "Each row keeps min(k, its number of positive inputs) entries.",
                  _pre_k(dt), count),
        Invariant(f"{s}.keeps_each_rows_largest", "In each row, every kept entry is at least as large as "
                  "every dropped positive entry of that row.", _pre_k(dt), largest),
        Invariant(f"{s}.ties_to_lower_column", "Among a row's entries equal to its smallest kept value, those "
                  "in the lowest columns are kept.", _pre_k(dt, ties=True), ties),
        Invariant(f"{s}.rows_are_independent", "Each row's output is the output for that row alone.",
                  _pre_k(dt), independent),
        Invariant(f"{s}.nested_in_k", "The entries kept for k are among those kept for k + 1.",
                  _pre_k(dt, min_h=2, k_below_h=True), nested),
        Invariant(f"{s}.matches_reference", "The output equals sae-ref's topk exactly.", _pre_k(dt), reference),
    ]
    return run_invariants(s, invariants, **o.run_kw())


# --- threshold inference ----------------------------------------------------------------------
def check_threshold(fn, *, xp=None, device=None, to_user=None, from_user=None, dtype="float32",
                    max_examples: int = MAX_EXAMPLES, seed: int = 0, shrink: bool = True) -> Report:
    r"""Check a fixed-threshold inference ``fn(pre, theta) -> activations [B, h]``
    (:math:`f = \mathrm{relu}(z)\,\mathbb 1[z > \theta]`, ``theta`` a Python float) against
    its invariants, against BatchTopK's selection at :math:`\theta` = the smallest kept value,
    and against :func:`sae_ref.activations.threshold`. Arguments as in :func:`check_batch_topk`."""
    op = "check_threshold"
    fn = check_callable(op, "fn", fn)
    o = options(op, xp=xp, device=device, to_user=to_user, from_user=from_user, dtype=dtype,
                max_examples=max_examples, seed=seed, shrink=shrink)
    dt = o.dtype

    def out(pre, theta):
        return dense_output(o, fn, pre.shape, pre, theta, what="threshold")

    def values(ex):
        f = out(ex["pre"], ex["theta"])
        return f if isinstance(f, Finding) else _values_pass_through(f, ex["pre"])

    def strict(ex):
        f = out(ex["pre"], ex["theta"])
        if isinstance(f, Finding):
            return f
        bad = _kept(f) & (as_float64(ex["pre"]) == ex["theta"])
        if np.any(bad):
            return Finding(f"entries equal to theta = {ex['theta']:g} are kept at {positions(bad)} "
                           "(z >= theta instead of z > theta)", got=f, expected=ref_threshold(ex["pre"], ex["theta"]))
        return None

    def exact(ex):
        f = out(ex["pre"], ex["theta"])
        if isinstance(f, Finding):
            return f
        pre = as_float64(ex["pre"])
        want = (pre > ex["theta"]) & (pre > 0)
        bad = _kept(f) != want
        if np.any(bad):
            return Finding(f"kept set differs from z > theta and z > 0 at {positions(bad)}", got=f,
                           expected=ref_threshold(ex["pre"], ex["theta"]),
                           difference=describe_difference(f, ref_threshold(ex["pre"], ex["theta"])))
        return None

    def at_batch_min(ex):
        batch = ref_batch_topk(ex["pre"], ex["k"])
        if not np.any(batch):
            return None
        m = float(batch[batch != 0].min())
        f = out(ex["pre"], m)
        if isinstance(f, Finding):
            return f
        want = (batch != 0) & (as_float64(ex["pre"]) > m)
        bad = _kept(f) != want
        if np.any(bad):
            return Finding(f"with theta = {m:g}, the smallest value BatchTopK(k = {ex['k']}) keeps, the kept set "
                           f"should be BatchTopK's minus the entries equal to theta; it differs at {positions(bad)}",
                           got=f, expected=np.where(want, as_float64(ex["pre"]), 0.0))
        return None

    def reference(ex):
        f = out(ex["pre"], ex["theta"])
        return f if isinstance(f, Finding) else _matches(f, ref_threshold(ex["pre"], ex["theta"]))

    s = "threshold"
    invariants = [
        Invariant(f"{s}.values_pass_through", "The output has the input's shape; every nonzero entry "
                  "is positive and equals the input there.", _pre_theta(dt), values),
        Invariant(f"{s}.strict_at_theta", "An entry equal to theta is dropped: inference keeps z > theta, "
                  "not z >= theta.", _pre_theta(dt), strict),
        Invariant(f"{s}.keeps_exactly_above_theta", "An entry is kept if and only if z > theta and z > 0 "
                  "(a negative theta keeps every positive entry).", _pre_theta(dt), exact),
        Invariant(f"{s}.at_batch_minimum_drops_only_the_minimum", "With theta equal to the smallest value "
                  "BatchTopK keeps on a batch, the kept set is BatchTopK's minus the entries equal to theta.",
                  _pre_k(dt), at_batch_min),
        Invariant(f"{s}.matches_reference", "The output equals sae-ref's threshold exactly.",
                  _pre_theta(dt), reference),
    ]
    return run_invariants(s, invariants, **o.run_kw())
