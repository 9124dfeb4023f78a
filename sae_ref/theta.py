r"""The BatchTopK inference threshold :math:`\theta` and its estimators.

BatchTopK's code for one sample depends on the rest of its batch. For inference the paper
replaces the batch selection by one global threshold, the expected smallest activation the
batch selection keeps:

.. math:: \theta = \mathbb E_X\!\left[\min\{ f_{bj}(X) : f_{bj}(X) > 0 \}\right],

and encodes with :math:`f = \mathrm{relu}(z)\,\mathbb 1[z > \theta]` (strict; with
:math:`\theta` equal to a batch's smallest kept value, ``>=`` would reproduce that batch's
selection and ``>`` drops that one element).

Estimators (``kind=``), each updated once per training step from that step's smallest kept
value :math:`m_t`:

- ``"running_mean"`` (default, the paper's plain average): the mean of the last ``window``
  values :math:`m_t` (all of them while fewer than ``window`` steps have run; a batch with no
  positive activation contributes nothing).
- ``"saelens_ema"`` (SAELens): :math:`\theta \leftarrow (1 - r)\theta + r\, m_t` with
  :math:`r = 0.01`, starting from :math:`\theta = 0` at the first step. Biased low by
  :math:`(1-r)^t \mathbb E[m]` after :math:`t` steps: on short runs inference keeps too much.
- ``"dictionary_learning"``: :math:`\theta = -1` (every positive activation kept) until step
  ``start`` (1000); then the first observed :math:`m_t`, then
  :math:`\theta \leftarrow \beta\theta + (1-\beta) m_t` with :math:`\beta = 0.999`.

The state is a few arrays on the training device; an update reads nothing back to the host.

>>> import numpy as np
>>> from sae_ref.theta import theta_init, theta_update, theta_value
>>> s = theta_init("running_mean", xp=np, window=2)
>>> for m in (1.0, 2.0, 4.0):
...     s = theta_update(s, np.asarray(m, dtype=np.float32))
>>> float(theta_value(s))       # mean of the last two
3.0
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device as device_of

from sae_ref import _checks as C
from sae_ref.backends import get_backend

KINDS = ("running_mean", "saelens_ema", "dictionary_learning")


@dataclass(frozen=True)
class ThetaState:
    """An estimator's state.

    kind : one of :data:`KINDS`
    window : running_mean: how many recent steps are averaged
    n : how many updates so far (a host integer: updates happen once per step)
    buf : running_mean: the last ``window`` minima (ring buffer) [window];
        the moving averages: their current value [1]
    rate : the moving averages' rate (SAELens r = 0.01; dictionary_learning 1 - beta = 0.001)
    start : dictionary_learning: the step after which updates begin
    """

    kind: str
    window: int
    n: int
    buf: Any
    rate: float = 0.01
    start: int = 0


def theta_init(kind: str = "running_mean", *, xp=np, dtype=None, device=None,
               window: int = 1000, rate: float | None = None, start: int | None = None) -> ThetaState:
    """A fresh estimator of the named kind (defaults: window 1000 steps; SAELens rate 0.01;
    dictionary_learning rate 0.001 from step 1000)."""
    C.choice("theta_init", "kind", kind, KINDS)
    window = C.integer_in("theta_init", "window", window, 1, 2**40)
    xp = array_namespace(xp.zeros(1))
    dtype = xp.float32 if dtype is None else dtype
    if device is None:
        device = device_of(xp.zeros(1))
    if kind == "running_mean":
        return ThetaState(kind, window, 0, xp.full((window,), float("nan"), dtype=dtype, device=device))
    if kind == "saelens_ema":
        return ThetaState(kind, 1, 0, xp.zeros((1,), dtype=dtype, device=device),
                          rate=0.01 if rate is None else rate)
    return ThetaState(kind, 1, 0, xp.full((1,), -1.0, dtype=dtype, device=device),
                      rate=0.001 if rate is None else rate, start=1000 if start is None else start)


def batch_min_kept(values):
    """The smallest positive kept value :math:`m_t` of a batch's code values (0-D array);
    ``+inf`` if none is positive (the updates then leave the estimate unchanged)."""
    return get_backend(array_namespace(values)).min_positive(values)


def theta_update(state: ThetaState, m, *, step: int | None = None) -> ThetaState:
    """Fold one step's smallest kept value ``m`` (0-D array) into the estimate.

    ``step`` is the 1-based training step (only dictionary_learning's start depends on it;
    default: the number of updates so far plus one). A non-finite ``m`` (a batch with no
    positive activation) leaves the estimate as it was.
    """
    xp = array_namespace(state.buf)
    step = state.n + 1 if step is None else step
    ok = xp.isfinite(m)
    buf = state.buf
    if state.kind == "running_mean":
        return replace(state, n=state.n + 1, buf=_ring_put(xp, buf, m, state.n % state.window, ok))
    if state.kind == "saelens_ema":
        new = (1.0 - state.rate) * buf + state.rate * m
        return replace(state, n=state.n + 1, buf=xp.where(ok, new, buf))
    # dictionary_learning: counts steps from 0 and updates when step > start
    if step - 1 <= state.start:
        return replace(state, n=state.n + 1)
    first = buf < 0
    new = xp.where(first, m, (1.0 - state.rate) * buf + state.rate * m)
    return replace(state, n=state.n + 1, buf=xp.where(ok, new, buf))


def theta_value(state: ThetaState):
    """The current :math:`\\theta` (0-D array). A running mean with no update yet is an error."""
    xp = array_namespace(state.buf)
    if state.kind != "running_mean":
        return state.buf[0]
    if state.n == 0:
        raise ValueError("theta_value: the running mean has seen no batch yet")
    return _finite_mean(xp, state.buf)


def theta_step(state: ThetaState, m, *, step: int | None = None):
    """:func:`theta_update` then :func:`theta_value`: ``(new state, the estimate)``. A
    running mean's update and value are one backend call
    (:meth:`~sae_ref.backends.StandardBackend.running_mean_step`: one launch on a GPU)."""
    if state.kind != "running_mean":
        new = theta_update(state, m, step=step)
        return new, theta_value(new)
    buf, value = get_backend(array_namespace(state.buf)).running_mean_step(state.buf, m, state.n % state.window)
    return replace(state, n=state.n + 1, buf=buf), value


def _ring_put(xp, buf, m, slot: int, ok=None):
    """``buf`` with ``m`` at ``slot`` (NaN there when ``m`` is not finite), a new array."""
    ok = xp.isfinite(m) if ok is None else ok
    at = xp.arange(buf.shape[0], device=device_of(buf)) == slot
    nan = xp.full((), float("nan"), dtype=buf.dtype, device=device_of(buf))
    return xp.where(at, xp.where(ok, m, nan), buf)


def _finite_mean(xp, buf):
    """The mean of the finite entries of ``buf`` (0-D)."""
    seen = xp.isfinite(buf)  # slots not yet written, or from batches with no positive value
    total = xp.sum(xp.where(seen, buf, xp.zeros_like(buf)))
    return total / xp.astype(xp.count_nonzero(seen), buf.dtype)
