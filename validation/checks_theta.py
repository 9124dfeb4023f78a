r"""Check of a BatchTopK inference-threshold estimator (ALGORITHMS.md section 3).

The estimator under test is given as ``run(batches) -> thetas``: it starts fresh, folds in
each batch of BatchTopK activations (dense [B, h], non-negative, zero where nothing was kept)
in order, and returns :math:`\theta` after each one. Each batch contributes its smallest
**kept** value :math:`m_t = \min\{f_{bj} : f_{bj} > 0\}` -- zero entries are not kept
activations -- and a batch with nothing kept leaves the estimate as it was.

``kind`` names the estimator the sequence is compared with (:mod:`sae_ref.theta`):
``"saelens_ema"`` (:math:`\theta \leftarrow (1-r)\theta + r m_t` from 0), ``"running_mean"``
(mean of the last ``window`` minima) or ``"dictionary_learning"`` (-1 until step ``start``,
then the first minimum, then an EMA with rate ``rate``).

>>> import numpy as np
>>> from sae_ref.validation.checks_theta import check_theta_estimator, sae_ref_theta_run
>>> check_theta_estimator(sae_ref_theta_run("saelens_ema"), kind="saelens_ema", max_examples=5).ok
True
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from sae_ref.theta import KINDS, batch_min_kept, theta_init, theta_update, theta_value
from sae_ref.validation._common import as_float64, check_callable, describe_difference, options
from sae_ref.validation.report import Report
from sae_ref.validation.runner import MAX_EXAMPLES, Finding, Invariant, call_user, run_invariants
from sae_ref.validation.strategies import activation_batches


def sae_ref_theta_run(kind: str = "running_mean", *, window: int = 1000, rate: float | None = None,
                      start: int | None = None, xp=None):
    """sae-ref's own estimator in the ``run(batches) -> thetas`` form the check takes.

    The minimum of each batch is :func:`sae_ref.theta.batch_min_kept` of its values;
    ``xp`` is the batches' array namespace (default: found from the first batch).
    """
    from array_api_compat import array_namespace, device as device_of

    def run(batches):
        ns = array_namespace(batches[0]) if xp is None else xp
        b0 = batches[0]
        state = theta_init(kind, xp=ns, dtype=b0.dtype, device=device_of(b0), window=window, rate=rate, start=start)
        out = []
        with np.errstate(invalid="ignore"):  # a running mean that has seen nothing positive is NaN
            for b in batches:
                state = theta_update(state, batch_min_kept(ns.reshape(b, (-1,))))
                out.append(float(theta_value(state)))
        return out

    return run


def ref_thetas(batches, kind, window, rate, start):
    """sae-ref's sequence in float64 for the given batches (NumPy)."""
    state = theta_init(kind, xp=np, dtype=np.float64, window=window, rate=rate, start=start)
    out = []
    with np.errstate(invalid="ignore"):  # a running mean that has seen nothing positive is NaN
        for b in batches:
            state = theta_update(state, batch_min_kept(as_float64(b).reshape(-1)))
            out.append(float(theta_value(state)))
    return np.array(out)


@st.composite
def _batches(draw, dtype, min_len=1, max_len=6):
    h = draw(st.integers(1, 6), label="h")
    n = draw(st.integers(min_len, max_len), label="number of batches")
    return {"batches": [draw(activation_batches(h=h, max_batch=4, dtype=dtype), label=f"batch {i}") for i in range(n)]}


@st.composite
def _with_empty(draw, dtype):
    ex = draw(_batches(dtype, max_len=5))
    i = draw(st.integers(1, len(ex["batches"])), label="where the empty batch goes")
    B = draw(st.integers(1, 3), label="its rows")
    h = ex["batches"][0].shape[1]
    ex["empty_at"] = i
    ex["batches"] = ex["batches"][:i] + [np.zeros((B, h), dtype=dtype)] + ex["batches"][i:]
    return ex


def check_theta_estimator(run, *, kind: str = "saelens_ema", window: int = 1000, rate: float | None = None,
                          start: int | None = None, rtol: float | None = None, xp=None, device=None,
                          to_user=None, from_user=None, dtype="float32", max_examples: int = MAX_EXAMPLES,
                          seed: int = 0, shrink: bool = True) -> Report:
    """Check an estimator ``run(batches) -> thetas`` (module docstring) against sae-ref's
    estimator ``kind`` with the same ``window`` / ``rate`` / ``start``.

    ``rtol``: tolerance of the comparison (default 1e-5 for float32 inputs, 1e-12 for
    float64). Other arguments as in
    :func:`~sae_ref.validation.checks_selection.check_batch_topk`.
    """
    op = "check_theta_estimator"
    run = check_callable(op, "run", run)
    if kind not in KINDS:
        raise ValueError(f"{op}: argument 'kind' must be one of {list(KINDS)}, got {kind!r}")
    o = options(op, xp=xp, device=device, to_user=to_user, from_user=from_user, dtype=dtype,
                max_examples=max_examples, seed=seed, shrink=shrink)
    theta_init(kind, window=window, rate=rate, start=start)  # argument errors now, named
    tol = rtol if rtol is not None else (1e-5 if o.dtype == np.float32 else 1e-12)

    def thetas(batches):
        out = call_user(run, [o.io.to_user(b) for b in batches], what="the estimator")
        seq = as_float64([float(np.reshape(call_user(o.io.from_user, t, what="converting a theta"), ()))
                          for t in out])
        if seq.shape != (len(batches),):
            return Finding(f"the estimator returned {seq.size} values for {len(batches)} batches", got=seq)
        return seq

    def close(a, b):
        both_nan = np.isnan(a) & np.isnan(b)
        return bool(np.all(both_nan | (np.abs(a - b) <= tol * np.maximum(np.abs(b), 1e-30) + 1e-300)))

    def positive_only(ex):
        seq = thetas(ex["batches"])
        if isinstance(seq, Finding):
            return seq
        padded = [np.concatenate([b, np.zeros_like(b[:1])]) for b in ex["batches"]]
        seq2 = thetas(padded)
        if isinstance(seq2, Finding):
            return seq2
        if not close(seq2, seq):
            return Finding("adding an all-zero row to every batch changed theta: zeros are counted as kept "
                           f"activations (a '>= 0' where '> 0' belongs); without the rows: {seq.tolist()}",
                           got=seq2, expected=ref_thetas(padded, kind, window, rate, start))
        return None

    def empty_batch(ex):
        seq = thetas(ex["batches"])
        if isinstance(seq, Finding):
            return seq
        i = ex["empty_at"]
        if i >= 1 and not close(seq[i:i + 1], seq[i - 1:i]):
            return Finding(f"batch {i} has no positive entry, yet theta moved from {seq[i - 1]:g} to {seq[i]:g}",
                           got=seq, expected=ref_thetas(ex["batches"], kind, window, rate, start))
        return None

    def reference(ex):
        seq = thetas(ex["batches"])
        if isinstance(seq, Finding):
            return seq
        want = ref_thetas(ex["batches"], kind, window, rate, start)
        if not close(seq, want):
            return Finding(f"the sequence of theta differs from sae-ref's {kind!r} estimator", got=seq, expected=want,
                           difference=describe_difference(seq, want))
        return None

    s = "theta"
    empty_applies = None if kind != "running_mean" else (
        "a running mean over a window of batches moves when a batch without positive entries takes a slot")
    invariants = [
        Invariant(f"{s}.kept_means_strictly_positive", "Only entries > 0 count as kept: appending an all-zero "
                  "row to every batch leaves the sequence of theta unchanged.", _batches(o.dtype), positive_only),
        Invariant(f"{s}.batch_with_nothing_kept_leaves_theta", "A batch with no positive entry leaves theta "
                  "unchanged.", _with_empty(o.dtype), empty_batch, empty_applies),
        Invariant(f"{s}.matches_reference", f"After each batch, theta equals sae-ref's {kind!r} estimator fed "
                  "the same batches.", _batches(o.dtype), reference),
    ]
    return run_invariants(s, invariants, **o.run_kw())
