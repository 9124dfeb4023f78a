r"""Sparsity-performance frontiers: the Hill curve and its rivals, fitted on any backend.

Each SAE of a family is one point of the plane :math:`x = 1/L_0` (sparsity),
:math:`y = 1 - \text{loss recovered}` (the performance hit, between 0 for the clean model and
1 for the ablation). Four curves through the origin are offered (``model=``):

==========  ==============================================  =========================
model       :math:`y(x)`                                    parameters
==========  ==============================================  =========================
``linear``  :math:`x / x_{1/2}`                             :math:`x_{1/2}`
``hill1``   :math:`x / (x + x_{1/2})`                       :math:`x_{1/2}`
``hill``    :math:`x^n / (x^n + x_{1/2}^n)`                 :math:`x_{1/2},\ n > 0`
``power``   :math:`a\, x^n`                                 :math:`a > 0,\ n`
==========  ==============================================  =========================

:math:`x_{1/2}` is where the Hill curves cross :math:`y = 1/2`; for ``power`` it is reported
as that crossing, :math:`x_{1/2} = (2a)^{-1/n}`. The ``linear`` model keeps the parameter as
ALGORITHMS.md writes it, :math:`y = x / x_{1/2}`: the slope at the origin of the Hill curve with
that :math:`x_{1/2}`, so a linear fit of points near the origin estimates the Hill
:math:`x_{1/2}`; the line itself reaches 1/2 at :math:`x_{1/2}/2` (and 1 at :math:`x_{1/2}`).
A family with a larger :math:`x_{1/2}` reaches the same performance hit at a smaller
:math:`L_0`; :func:`compare` reports the ratio of two families' :math:`x_{1/2}` (compare fits
of one model: the ratio does not depend on the convention then).

The fit (:func:`fit_frontier`) drops points with :math:`y \notin (0, 1)` or :math:`x \le 0`
with a :class:`FrontierWarning`, starts from a closed-form or linearised estimate, and refines
it by Levenberg-Marquardt on the residuals :math:`y - y(x)` in float64, with positive
parameters carried as logs. Uncertainties are :math:`s^2 (J^\top J)^{-1}`,
:math:`s^2 = \mathrm{RSS}/(n - p)`, with :math:`J` the Jacobian at the optimum; they are NaN
when :math:`n \le p`. Only Array API functions are used (``linalg.solve`` on a p x p system),
so the fit runs where the points live and agrees across backends.

:math:`x_{1/2}` is read off the fitted curve. When the curve reaches :math:`y = 1/2` outside
the range of the points' :math:`x` (all of them on one side of it, e.g. a family whose points
all lose less than half the performance), the number is the model's extrapolation, not a
property of the data: the fit warns (:class:`FrontierWarning`) and says so in its result
(:attr:`FrontierFit.extrapolated`, with the message in :attr:`FrontierFit.warnings`). Every
warning of a fit is kept in its result, so a saved fit still carries it.

>>> import numpy as np
>>> x = np.array([0.01, 0.02, 0.05, 0.1, 0.2])
>>> fit = fit_frontier(x, x / (x + 0.05), "hill1")
>>> round(fit.x_half, 9), round(float(fit.predict(0.05)), 9)
(0.05, 0.5)
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field

import numpy as np
from array_api_compat import array_namespace, device as device_of, is_array_api_obj

from sae_ref import _checks as C

MODELS = ("linear", "hill1", "hill", "power")

#: Natural parameter names of each model.
PARAMS = {"linear": ("x_half",), "hill1": ("x_half",), "hill": ("x_half", "n"), "power": ("a", "n")}


class FrontierWarning(UserWarning):
    """Points were left out of a frontier fit, the fit did not converge, or the fitted curve
    reaches 1/2 outside the points' x range (:math:`x_{1/2}` extrapolated)."""


# --- the models, in the internal (log) parameters ----------------------------------------------
def _sigmoid(xp, z):
    e = xp.exp(-xp.abs(z))
    return xp.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _curve(xp, model: str, x, u, theta):
    r"""Model values f and Jacobian :math:`\partial f/\partial\theta` ([n], [n, p]).

    Internal parameters: linear, hill1 :math:`c = \log x_{1/2}`; hill :math:`(c, \log n)`;
    power :math:`(\log a, n)`. With :math:`u = \log x`, hill is :math:`\sigma(n(u - c))`.
    """
    if model == "linear":
        f = x * xp.exp(-theta[0])
        return f, xp.stack([-f], axis=1)
    if model == "hill1":
        f = _sigmoid(xp, u - theta[0])
        return f, xp.stack([-f * (1.0 - f)], axis=1)
    if model == "hill":
        n = xp.exp(theta[1])
        f = _sigmoid(xp, n * (u - theta[0]))
        s = f * (1.0 - f)
        return f, xp.stack([-n * s, n * (u - theta[0]) * s], axis=1)
    f = xp.exp(theta[0] + theta[1] * u)
    return f, xp.stack([f, u * f], axis=1)


def _natural(model: str, theta: list[float]) -> tuple[list[float], list[float]]:
    """Natural parameters and d(natural)/d(internal) (a diagonal, as a list)."""
    if model in ("linear", "hill1"):
        xh = math.exp(theta[0])
        return [xh], [xh]
    if model == "hill":
        xh, n = math.exp(theta[0]), math.exp(theta[1])
        return [xh, n], [xh, n]
    a = math.exp(theta[0])
    return [a, theta[1]], [a, 1.0]


def _internal(op: str, model: str, start) -> list[float]:
    """A user's starting point (natural parameters) in the internal ones."""
    names = PARAMS[model]
    if not isinstance(start, dict) or set(start) != set(names):
        raise ValueError(f"{op}: argument 'start' must be a dict with keys {list(names)} for model "
                         f"{model!r}, got {start!r}")
    v = {k: C.finite_number(op, f"start[{k!r}]", start[k]) for k in names}
    for k in names:
        if (k != "n" or model == "hill") and v[k] <= 0:
            raise ValueError(f"{op}: argument 'start[{k!r}]' must be positive, got {v[k]}")
    if model == "power":
        return [math.log(v["a"]), v["n"]]
    return [math.log(v[k]) for k in names]


# --- starting points -----------------------------------------------------------------------------
def _line(xp, u, v):
    """Least-squares slope and intercept of v on u (host floats)."""
    um, vm = xp.mean(u), xp.mean(v)
    du = u - um
    slope = float(xp.sum(du * (v - vm)) / xp.sum(du * du))
    return slope, float(vm) - slope * float(um)


def _start(xp, model: str, x, u, y) -> list[float]:
    """Closed-form (linear, hill1) or linearised (hill, power) starting point, internal params."""
    if model == "linear":  # least squares through the origin of y on x: 1/x_half = sum xy / sum x^2
        return [-math.log(float(xp.sum(x * y) / xp.sum(x * x)))]
    w, v = 1.0 / x, 1.0 / y - 1.0
    c1 = math.log(float(xp.sum(v * w) / xp.sum(w * w)))  # 1/y - 1 = x_half / x through the origin
    if model == "hill1":
        return [c1]
    if model == "hill":  # logit y = n log x - n log x_half
        n, b = _line(xp, u, xp.log(y) - xp.log(1.0 - y))
        if not (n > 0 and math.isfinite(n)):
            return [c1, 0.0]
        return [-b / n, math.log(n)]
    n, b = _line(xp, u, xp.log(y))  # log y = log a + n log x
    return [b, n]


# --- Levenberg-Marquardt ------------------------------------------------------------------------
def _lm(xp, model, x, u, y, theta0, *, max_iter: int, dev):
    """Minimise :math:`\\|y - f(x;\\theta)\\|^2`; return (theta list, J at it, rss, converged, iters)."""
    theta = xp.asarray(theta0, dtype=xp.float64, device=dev)
    p = len(theta0)
    eye = xp.eye(p, dtype=xp.float64, device=dev)
    f, J = _curve(xp, model, x, u, theta)
    r = y - f
    S = float(xp.sum(r * r))
    lam = 1e-3
    for it in range(1, max_iter + 1):
        A = J.T @ J
        g = J.T @ r[:, None]
        D = A * eye + 1e-300 * eye
        while True:
            delta = xp.linalg.solve(A + lam * D, g)[:, 0]
            trial = theta + delta
            f2, J2 = _curve(xp, model, x, u, trial)
            r2 = y - f2
            S2 = float(xp.sum(r2 * r2))
            if math.isfinite(S2) and S2 <= S:
                break
            lam *= 10.0
            if lam > 1e20:  # no step lowers the RSS: a minimum to working precision
                return _done(theta, J, S, True, it)
        step = float(xp.max(xp.abs(delta)))
        size = float(xp.max(xp.abs(theta)))
        small = step <= 1e-12 * (1.0 + size) or S2 == 0.0
        theta, J, r, S = trial, J2, r2, S2
        lam = max(lam / 10.0, 1e-15)
        if small:
            return _done(theta, J, S, True, it)
    return _done(theta, J, S, False, max_iter)


def _done(theta, J, S, converged, it):
    return theta, J, S, converged, it


# --- the result ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FrontierFit:
    """A fitted frontier curve (host floats).

    model : one of :data:`MODELS`
    params, stderr : natural parameters by name (:data:`PARAMS`) and their standard errors
    cov : covariance of the natural parameters, as nested tuples (NaN when n_used <= p)
    x_half, x_half_stderr : :math:`x_{1/2}` and its standard error: where the curve crosses
        1/2 (hill1, hill, power); for linear the parameter of :math:`y = x / x_{1/2}`
    rss : residual sum of squares on the points used
    n_used, n_dropped : points fitted, points left out (y outside (0, 1) or x <= 0)
    converged, n_iter : Levenberg-Marquardt's outcome (a fit that did not converge warns and
        reports NaN uncertainties)
    x_range : (smallest, largest) x of the points used
    extrapolated : the curve reaches y = 1/2 outside ``x_range`` (at :math:`x_{1/2}`; for
        linear at :math:`x_{1/2}/2`), so :math:`x_{1/2}` is the model's extrapolation beyond
        the points; the fit warned
    warnings : the messages of every :class:`FrontierWarning` the fit issued, in order
    """

    model: str
    params: dict = field(hash=False)
    stderr: dict = field(hash=False)
    cov: tuple
    x_half: float
    x_half_stderr: float
    rss: float
    n_used: int
    n_dropped: int
    converged: bool
    n_iter: int
    x_range: tuple = (math.nan, math.nan)
    extrapolated: bool = False
    warnings: tuple = ()

    @property
    def x_at_half(self) -> float:
        """Where the curve reaches y = 1/2: :math:`x_{1/2}`, or :math:`x_{1/2}/2` for linear."""
        return self.x_half / 2 if self.model == "linear" else self.x_half

    def predict(self, x):
        """The curve at ``x``: a number, a sequence (NumPy float64 out) or any backend's array
        (computed in its namespace, dtype and device)."""
        if is_array_api_obj(x):
            xp = array_namespace(x)
            C.floating("predict", xp, "x", x)
        else:
            xp = array_namespace(np.zeros(1))
            scalar = isinstance(x, numbers.Real)
            out = self.predict(np.asarray(x, dtype=np.float64))
            return float(out) if scalar else out
        p = self.params
        if self.model == "linear":
            return x / p["x_half"]
        if self.model == "hill1":
            return x / (x + p["x_half"])
        if self.model == "hill":
            # (x/x_half)^n / (1 + (x/x_half)^n), written as a logistic in log x to stay finite
            z = p["n"] * (xp.log(x) - math.log(p["x_half"]))
            return _sigmoid(xp, z)
        return p["a"] * x ** p["n"]

    def as_dict(self) -> dict:
        """Plain JSON-able fields (cov as nested lists)."""
        out = dict(self.__dict__)
        out["cov"] = [list(r) for r in self.cov]
        out["params"], out["stderr"] = dict(self.params), dict(self.stderr)
        out["x_range"], out["warnings"] = list(self.x_range), list(self.warnings)
        return out


def _inputs(op: str, x, y, xp, names=("x", "y")):
    nx, ny = names
    if is_array_api_obj(x) or is_array_api_obj(y):
        xp = C.namespace(op, **{nx: x, ny: y})
    else:
        xp = array_namespace(np.zeros(1)) if xp is None else array_namespace(xp.zeros(1))
        try:
            x = xp.asarray(np.asarray(x, dtype=np.float64).tolist(), dtype=xp.float64)
            y = xp.asarray(np.asarray(y, dtype=np.float64).tolist(), dtype=xp.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{op}: arguments '{nx}' and '{ny}' must be arrays or sequences of numbers") from None
    for name, a in ((nx, x), (ny, y)):
        if not xp.isdtype(a.dtype, ("real floating", "integral")):
            raise TypeError(f"{op}: argument '{name}' must be real numbers, got {a.dtype}")
        if a.ndim != 1:
            raise ValueError(f"{op}: argument '{name}' must be 1-D, got shape {tuple(a.shape)}")
    if x.shape != y.shape:
        raise ValueError(f"{op}: arguments '{nx}' and '{ny}' must have one shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    x, y = xp.astype(x, xp.float64), xp.astype(y, xp.float64)
    for name, a in ((nx, x), (ny, y)):
        if not bool(xp.all(xp.isfinite(a))):
            raise ValueError(f"{op}: argument '{name}' contains NaN or infinity")
    return xp, x, y


def fit_frontier(x, y, model: str = "hill1", *, xp=None, start: dict | None = None,
                 max_iter: int = 200) -> FrontierFit:
    r"""Fit one frontier curve to the points :math:`(x_i, y_i)`.

    Parameters
    ----------
    x : array [n] or sequence
        Sparsity :math:`1/L_0` of each SAE.
    y : array [n] or sequence
        Performance hit :math:`1 - \text{loss recovered}` of each SAE.
    model : "linear" | "hill1" | "hill" | "power"
    xp : array namespace used when ``x`` and ``y`` are plain sequences (default NumPy)
    start : dict, optional
        Starting point, natural parameters by name (e.g. ``{"x_half": 0.1, "n": 1.0}``);
        default the closed-form or linearised estimate below.
    max_iter : Levenberg-Marquardt iterations at most

    Points with :math:`y \notin (0, 1)` or :math:`x \le 0` are dropped with a
    :class:`FrontierWarning` saying how many. A curve that reaches :math:`y = 1/2` outside the
    x range of the points used warns too, and the result says so (``extrapolated``). Starting points: ``linear`` closed form,
    :math:`1/x_{1/2} = \sum x y / \sum x^2`; ``hill1``: least squares through the origin of
    :math:`1/y - 1` on :math:`1/x` (slope :math:`x_{1/2}`); ``hill``: the line of
    :math:`\mathrm{logit}\, y` on :math:`\log x` (slope n, intercept :math:`-n \log x_{1/2}`;
    the ``hill1`` start with n = 1 if the slope is not positive); ``power``: the line of
    :math:`\log y` on :math:`\log x`. Then Levenberg-Marquardt (Marquardt's diagonal damping).

    Raises ValueError for mismatched shapes, non-finite values, fewer usable points than
    parameters, or (two-parameter models) fewer than two distinct ``x``.

    >>> import numpy as np
    >>> x = np.array([0.01, 0.02, 0.05, 0.1, 0.2])
    >>> y = x**1.5 / (x**1.5 + 0.04**1.5)
    >>> fit = fit_frontier(x, y, "hill")
    >>> round(fit.params["x_half"], 9), round(fit.params["n"], 9)
    (0.04, 1.5)
    """
    op = "fit_frontier"
    C.choice(op, "model", model, MODELS)
    max_iter = C.integer_in(op, "max_iter", max_iter, 1, 10**6)
    xp, x, y = _inputs(op, x, y, xp)
    n_all = int(x.shape[0])
    (keep,) = xp.nonzero((y > 0) & (y < 1) & (x > 0))
    x, y = xp.take(x, keep), xp.take(y, keep)
    n, p = int(x.shape[0]), len(PARAMS[model])
    said = []

    def warn(message):
        said.append(message)
        warnings.warn(message, FrontierWarning, stacklevel=3)

    if n < n_all:
        warn(f"{op}: dropped {n_all - n} of {n_all} points with y outside (0, 1) or x <= 0")
    if n < p:
        raise ValueError(f"{op}: model {model!r} needs at least {p} point(s) with 0 < y < 1 and x > 0, "
                         f"got {n}")
    if p == 2 and not bool(xp.max(x) > xp.min(x)):
        raise ValueError(f"{op}: model {model!r} needs at least two distinct values of 'x'")
    dev = device_of(x)
    u = xp.log(x)
    theta0 = _start(xp, model, x, u, y) if start is None else _internal(op, model, start)
    theta, J, rss, ok, it = _lm(xp, model, x, u, y, theta0, max_iter=max_iter, dev=dev)
    if not ok:
        warn(f"{op}: Levenberg-Marquardt did not converge in {max_iter} iterations (model {model!r})")
    th = [float(theta[i]) for i in range(p)]
    cov_int = _covariance(xp, J, rss, n, p) if ok else [[math.nan] * p for _ in range(p)]
    nat, scale = _natural(model, th)
    cov = tuple(tuple(cov_int[i][j] * scale[i] * scale[j] for j in range(p)) for i in range(p))
    names = PARAMS[model]
    params = dict(zip(names, nat))
    stderr = {k: math.sqrt(cov[i][i]) if cov[i][i] >= 0 else math.nan for i, k in enumerate(names)}
    x_half, x_half_se = _x_half(model, th, nat, cov_int, stderr)
    lo, hi = float(xp.min(x)), float(xp.max(x))
    at_half = x_half / 2 if model == "linear" else x_half
    outside = math.isfinite(at_half) and not lo <= at_half <= hi
    if outside:
        where = "beyond the largest" if at_half > hi else "below the smallest"
        warn(f"{op}: the {model} curve reaches y = 1/2 at x = {at_half:.4g}, {where} x of the "
             f"points ([{lo:.4g}, {hi:.4g}]): x_half = {x_half:.4g} is extrapolated by the model")
    return FrontierFit(model, params, stderr, cov, x_half, x_half_se, rss, n, n_all - n, ok, it,
                       (lo, hi), outside, tuple(said))


def _covariance(xp, J, rss: float, n: int, p: int) -> list[list[float]]:
    """:math:`s^2 (J^\\top J)^{-1}` in the internal parameters (NaN when n <= p or singular)."""
    if n <= p:
        return [[math.nan] * p for _ in range(p)]
    s2 = rss / (n - p)
    A = J.T @ J
    eye = xp.eye(p, dtype=A.dtype, device=device_of(A))
    try:
        inv = xp.linalg.solve(A, eye)
    except Exception:  # a singular J^T J (LinAlgError, RuntimeError, ... by library)
        return [[math.nan] * p for _ in range(p)]
    return [[s2 * float(inv[i, j]) for j in range(p)] for i in range(p)]


def _x_half(model, th, nat, cov_int, stderr):
    if model != "power":
        return nat[0], stderr["x_half"]
    a_log, n = th
    if n == 0:
        return math.nan, math.nan
    xh = math.exp(-(math.log(2.0) + a_log) / n)
    g = [-1.0 / n, (math.log(2.0) + a_log) / n**2]  # gradient of log x_half in (log a, n)
    var = sum(g[i] * cov_int[i][j] * g[j] for i in range(2) for j in range(2))
    return xh, xh * math.sqrt(var) if var >= 0 else math.nan


# --- comparing two families ----------------------------------------------------------------------
@dataclass(frozen=True)
class FrontierComparison:
    r"""The ratio :math:`x_{1/2}^{(a)} / x_{1/2}^{(b)}` and its delta-method standard error.

    :math:`\mathrm{se}(r) = r \sqrt{(\mathrm{se}_a / x_a)^2 + (\mathrm{se}_b / x_b)^2}`,
    treating the two fits as independent; NaN when either :math:`x_{1/2}` is not a positive
    finite number (a degenerate fit).
    """

    ratio: float
    stderr: float
    x_half_a: float
    x_half_b: float
    model_a: str
    model_b: str


def compare(fit_a: FrontierFit, fit_b: FrontierFit) -> FrontierComparison:
    """How many times larger family a's :math:`x_{1/2}` is than family b's (> 1: a is better).

    >>> import numpy as np
    >>> x = np.array([0.01, 0.02, 0.05, 0.1, 0.2])
    >>> a, b = fit_frontier(x, x / (x + 0.1), "hill1"), fit_frontier(x, x / (x + 0.04), "hill1")
    >>> round(compare(a, b).ratio, 9)
    2.5
    """
    for name, f in (("fit_a", fit_a), ("fit_b", fit_b)):
        if not isinstance(f, FrontierFit):
            raise TypeError(f"compare: argument '{name}' must be a FrontierFit, got {type(f).__name__}")
    xa, xb = fit_a.x_half, fit_b.x_half
    if not all(v > 0 and math.isfinite(v) for v in (xa, xb)):  # a degenerate fit
        return FrontierComparison(xa / xb if xb != 0 else math.nan, math.nan, xa, xb,
                                  fit_a.model, fit_b.model)
    r = xa / xb
    se = r * math.sqrt((fit_a.x_half_stderr / xa) ** 2 + (fit_b.x_half_stderr / xb) ** 2)
    return FrontierComparison(r, se, xa, xb, fit_a.model, fit_b.model)


def hit_plane(l0, recovered):
    r"""The frontier plane's coordinates: :math:`x = 1/L_0`, :math:`y = 1 - \text{recovered}`.

    ``recovered`` is loss recovered, (L_abl - L_sae) / (L_abl - L_clean), so
    :math:`y = (L_{sae} - L_{clean}) / (L_{abl} - L_{clean})`, the performance hit. Arrays stay
    in their namespace and device (as float64); sequences become NumPy float64 arrays.

    >>> x, y = hit_plane([10.0, 40.0], [0.9, 0.6])
    >>> x.tolist(), [round(v, 12) for v in y.tolist()]
    ([0.1, 0.025], [0.1, 0.4])
    """
    xp, l0, rec = _inputs("hit_plane", l0, recovered, None, ("l0", "recovered"))
    if not bool(xp.all(l0 > 0)):
        raise ValueError("hit_plane: argument 'l0' must be positive")
    return 1.0 / l0, 1.0 - rec


__all__ = ["MODELS", "PARAMS", "FrontierComparison", "FrontierFit", "FrontierWarning",
           "compare", "fit_frontier", "hit_plane"]
