r"""Check of the top-AFA activation (Lee et al. 2025; ALGORITHMS.md section 4).

The implementation is ``fn(pre, scale, target) -> activations [B, h]``: per row, scores
:math:`s_i = (\mathrm{relu}(z_i)\,\|d_i\|)^2` (``scale`` holds the decoder row norms
:math:`\|d_i\|`), prefix norms :math:`c_j = \sqrt{\sum_{r \le j} s_{(r)}}` in descending
score order, :math:`k = 1 + \arg\min_j |c_j - t|` (``rule="nearest"``, ties to the smaller j)
or the first :math:`c_j \ge t` (``"first_exceeding"``), and the top-k latents by score are
kept. With ``sentinel`` (the authors' code) the last prefix norm is replaced by a large number.

Inputs are float16-representable and the scales powers of two, so the scores are exact in
float32 and equal scores tie exactly; a choice of k that rounding of the prefix norms could
flip (two prefixes within rounding of the same distance) accepts either answer.

>>> from sae_ref.afa import top_afa
>>> from sae_ref.validation.checks_afa import check_top_afa
>>> check_top_afa(top_afa, max_examples=5).ok
True
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sae_ref.afa import RULES, SENTINEL, top_afa as _sr_top_afa
from sae_ref.validation._common import as_float64, check_callable, dense_output, describe_difference, options
from sae_ref.validation.report import Report
from sae_ref.validation.runner import MAX_EXAMPLES, Finding, Invariant, run_invariants
from sae_ref.validation.strategies import pre_activation_batches


@st.composite
def _examples(draw, dtype):
    pre = draw(pre_activation_batches(dtype=dtype, min_h=2, scale=1.0), label="pre")
    B, h = pre.shape
    scale = draw(hnp.arrays(np.float64, (h,), elements=st.sampled_from([1.0, 0.5, 2.0, 4.0])), label="scale")
    s = (np.maximum(as_float64(pre), 0) * scale) ** 2
    c = np.sqrt(np.cumsum(-np.sort(-s, axis=1), axis=1))
    target = np.empty(B)
    for b in range(B):
        how = draw(st.sampled_from(["free", "prefix", "between"]), label=f"target[{b}] kind")
        j = draw(st.integers(0, h - 1), label=f"target[{b}] prefix")
        if how == "prefix":
            target[b] = c[b, j]
        elif how == "between" and j + 1 < h:
            target[b] = 0.5 * (c[b, j] + c[b, j + 1])
        else:
            target[b] = draw(st.floats(0, 16, width=16), label=f"target[{b}]")
    return {"pre": pre, "scale": scale.astype(dtype), "target": target.astype(dtype)}


def _scores(ex):
    s = (np.maximum(as_float64(ex["pre"]), 0) * as_float64(ex["scale"])) ** 2
    order = np.argsort(-s, axis=1, kind="stable")
    return s, order


def _allowed_counts(ex, rule, sentinel, eps):
    """Per row, the set of kept counts consistent with the rule up to rounding of the prefix
    norms in the input dtype."""
    s, order = _scores(ex)
    B, h = s.shape
    t = as_float64(ex["target"])
    out = []
    for b in range(B):
        ss = s[b, order[b]]
        c = np.sqrt(np.cumsum(ss))
        if sentinel:
            c[-1] = SENTINEL
        npos = int(np.count_nonzero(ss > 0))
        tol = 64 * eps * (c + abs(t[b]) + 1e-30)
        if rule == "nearest":
            dist = np.abs(c - t[b])
            ks = np.flatnonzero(dist <= dist.min() + tol + tol[np.argmin(dist)]) + 1
        else:
            reached = c >= t[b] - tol
            surely = c >= t[b] + tol
            first_maybe = int(np.argmax(reached)) + 1 if reached.any() else h
            first_sure = int(np.argmax(surely)) + 1 if surely.any() else h
            ks = np.arange(first_maybe, first_sure + 1)
        out.append({min(int(k), npos) for k in ks})
    return out


def check_top_afa(fn, *, rule: str = "nearest", sentinel: bool = True, xp=None, device=None, to_user=None,
                  from_user=None, dtype="float32", max_examples: int = MAX_EXAMPLES, seed: int = 0,
                  shrink: bool = True) -> Report:
    """Check a top-AFA implementation ``fn(pre, scale, target) -> activations [B, h]``
    (module docstring) against its invariants and :func:`sae_ref.afa.top_afa` with the same
    ``rule`` and ``sentinel``. Other arguments as in
    :func:`~sae_ref.validation.checks_selection.check_batch_topk`."""
    op = "check_top_afa"
    fn = check_callable(op, "fn", fn)
    if rule not in RULES:
        raise ValueError(f"{op}: argument 'rule' must be one of {list(RULES)}, got {rule!r}")
    if not isinstance(sentinel, bool):
        raise TypeError(f"{op}: argument 'sentinel' must be True or False, got {sentinel!r}")
    o = options(op, xp=xp, device=device, to_user=to_user, from_user=from_user, dtype=dtype,
                max_examples=max_examples, seed=seed, shrink=shrink)
    examples = _examples(o.dtype)

    def out(ex):
        return dense_output(o, fn, ex["pre"].shape, ex["pre"], ex["scale"], ex["target"], what="top_afa")

    def ref(ex):
        code = _sr_top_afa(as_float64(ex["pre"]), as_float64(ex["scale"]), as_float64(ex["target"]),
                           rule=rule, sentinel=sentinel)
        return as_float64(code.to_dense())

    def values(ex):
        f = out(ex)
        if isinstance(f, Finding):
            return f
        pre = as_float64(ex["pre"])
        bad = (f != 0) & ((f != pre) | (pre <= 0))
        if np.any(bad):
            return Finding("some nonzero entries are not the (positive) input value there", got=f, expected=ref(ex))
        return None

    def highest(ex):
        f = out(ex)
        if isinstance(f, Finding):
            return f
        _, order = _scores(ex)
        for b in range(f.shape[0]):
            n = int(np.count_nonzero(f[b]))
            want = np.zeros(f.shape[1], dtype=bool)
            want[order[b, :n]] = True
            if not np.array_equal(f[b] != 0, want):
                return Finding(f"row {b} keeps {n} latents but not the {n} highest scores (equal scores: "
                               "lower column first)", got=f, expected=ref(ex))
        return None

    def nearest(ex):
        f = out(ex)
        if isinstance(f, Finding):
            return f
        allowed = _allowed_counts(ex, rule, sentinel, o.eps)
        for b in range(f.shape[0]):
            n = int(np.count_nonzero(f[b]))
            if n not in allowed[b]:
                what = "nearest to" if rule == "nearest" else "first reaching"
                return Finding(f"row {b} keeps {n} latents; the prefix norm {what} the target "
                               f"{float(ex['target'][b]):g} gives {sorted(allowed[b])}", got=f, expected=ref(ex))
        return None

    def independent(ex):
        f = out(ex)
        if isinstance(f, Finding):
            return f
        for b in range(f.shape[0]):
            one = {"pre": ex["pre"][b:b + 1], "scale": ex["scale"], "target": ex["target"][b:b + 1]}
            g = out(one)
            if isinstance(g, Finding):
                return g
            if not np.array_equal(g[0], f[b]):
                return Finding(f"row {b} alone (got) gives another output than within the batch: {f[b].tolist()}",
                               got=g[0], expected=ref(one)[0])
        return None

    def reference(ex):
        f = out(ex)
        if isinstance(f, Finding):
            return f
        want = ref(ex)
        if np.array_equal(f, want):
            return None
        allowed = _allowed_counts(ex, rule, sentinel, o.eps)
        rows = [b for b in range(f.shape[0]) if not np.array_equal(f[b], want[b])]
        if all(len(allowed[b]) > 1 for b in rows):
            return None  # only rows whose k rounding can decide
        return Finding("the output differs from sae-ref's top_afa", got=f, expected=want,
                       difference=describe_difference(f, want))

    s = "top_afa"
    rule_text = ("k = 1 + argmin_j |c_j - t| (nearest prefix norm, ties to the smaller j)" if rule == "nearest"
                 else "k = the first j with c_j >= t")
    invariants = [
        Invariant(f"{s}.values_pass_through", "The output has the input's shape; every nonzero entry is "
                  "positive and equals the input there.", examples, values),
        Invariant(f"{s}.keeps_the_highest_scores", "Each row keeps its n highest scores (relu(z) * ||d||)^2, "
                  "equal scores going to the lower column.", examples, highest),
        Invariant(f"{s}.{rule}_prefix_norm", f"Each row keeps min(k, its positive scores) latents with {rule_text}"
                  + (", the last prefix norm replaced by the sentinel" if sentinel else "") + ".", examples, nearest),
        Invariant(f"{s}.rows_are_independent", "Each row's output is the output for that row alone (no k is "
                  "shared across the batch).", examples, independent),
        Invariant(f"{s}.matches_reference", "The output equals sae-ref's top_afa (up to a k that rounding of "
                  "the prefix norms decides).", examples, reference),
    ]
    return run_invariants(s, invariants, **o.run_kw())
