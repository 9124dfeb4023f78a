r"""Fraction of variance unexplained (FVU) under every definition in use, each named.

With the residual :math:`r_b = x_b - \hat x_b` of the :math:`N` evaluated tokens
:math:`x_b \in \mathbb R^d`,

.. math:: \mathrm{FVU} = \frac{\text{unexplained}}{\text{total}}, \qquad
          \text{explained variance} = 1 - \mathrm{FVU}.

Libraries agree on that and on little else: the total is taken about the mean or about zero,
with the mean of all tokens or of each batch; the residual is centred or not; the ratio is
taken of sums (pooled) or token by token and then averaged. sae-ref names each one. Below
:math:`\mu` is the mean of all evaluated tokens, :math:`\mu_j` the mean of batch :math:`j`,
:math:`j(b)` the batch of token :math:`b` and :math:`\bar r` the mean residual.

.. list-table:: The definitions
   :header-rows: 1

   * - name
     - FVU
   * - ``pooled``
     - :math:`\sum_b \|r_b\|^2 \,/\, \sum_b \|x_b - \mu\|^2`
   * - ``about_zero``
     - :math:`\sum_b \|r_b\|^2 \,/\, \sum_b \|x_b\|^2` (the pooled NMSE)
   * - ``residual_centred``
     - :math:`\sum_b \|r_b - \bar r\|^2 \,/\, \sum_b \|x_b - \mu\|^2`
   * - ``batch_mean``
     - :math:`\sum_b \|r_b\|^2 \,/\, \sum_j \sum_{b \in j} \|x_b - \mu_j\|^2`
   * - ``per_token``
     - :math:`\frac1N \sum_b \|r_b\|^2 / \|x_b - m\|^2`, :math:`m` a mean given in advance
       (:math:`\mu` from a first pass)
   * - ``per_token_batch_mean``
     - :math:`\frac1N \sum_b \|r_b\|^2 / \|x_b - \mu_{j(b)}\|^2`
   * - ``per_token_about_zero``
     - :math:`\frac1N \sum_b \|r_b\|^2 / \|x_b\|^2`

``batch_mean`` and ``per_token_batch_mean`` depend on how the tokens were cut into batches:
:math:`\sum_j \sum_{b\in j} \|x_b-\mu_j\|^2 = \sum_b \|x_b-\mu\|^2 - \sum_j n_j \|\mu_j-\mu\|^2`,
so ``batch_mean`` :math:`\ge` ``pooled``, equal when every batch has the dataset's mean (one
batch of everything), and undefined (nan) with batches of one token.

.. list-table:: Who uses which (read in each library's source; versions differ)
   :header-rows: 1

   * - library, place
     - definition
   * - SAELens ``sae_lens/evals.py``, ``explained_variance`` (added in PR #443)
     - intended ``pooled``; until the fix of PR #665 (issue #659) the total was
       :math:`\mathbb E\|x\|^2` minus the squared element mean of :math:`x^2`, in effect
       ``about_zero`` (the issue reports about 0.98 against about 0.78 for the legacy value)
   * - SAELens ``evals.py`` and ``training/sae_trainer.py``, ``explained_variance_legacy``
     - ``per_token_batch_mean``
   * - SAELens ``training/sae_trainer.py``, the logged ``explained_variance``
     - ``batch_mean`` (one training batch)
   * - SAEBench ``sae_bench/evals/core/main.py``, ``explained_variance``
     - ``per_token_batch_mean``; the SAEBench paper's numbers used it (SAEBench issue #76)
   * - dictionary_learning ``evaluation.py`` ``evaluate`` and ``training.py`` ``get_stats``
     - ``residual_centred`` on one batch (``torch.var`` over the batch of :math:`x` and of
       :math:`x - \hat x`; the Bessel factors cancel); ``run_validation`` averages the
       per-batch values
   * - EleutherAI sparsify ``sparse_coder.py``, ``fvu`` (its training loss)
     - ``batch_mean`` (one training batch)
   * - OpenAI sparse_autoencoder ``loss.py``, ``normalized_mean_squared_error``
     - ``per_token_about_zero``
   * - OpenAI sparse_autoencoder ``train.py``, the scaled training MSE
     - ``pooled``, with :math:`\mu` and the total from a separate statistics sample
   * - OpenAI sparse_autoencoder ``kernels.py``, ``normalized_mse`` (its AuxK term)
     - ``batch_mean``
   * - sae-ref :func:`sae_ref.losses.nmse`
     - ``about_zero`` (``reduce="pooled"``), ``per_token_about_zero`` (``reduce="per_row"``)

A constant bias error :math:`\hat x_b = x_b + c` separates them in closed form. With
:math:`\sigma^2 = \frac1N\sum_b\|x_b-\mu\|^2` and :math:`\sigma_j^2` the same within batch
:math:`j` of :math:`n_j` tokens:

.. math::
    \texttt{pooled} = \frac{\|c\|^2}{\sigma^2}, \quad
    \texttt{about\_zero} = \frac{\|c\|^2}{\sigma^2 + \|\mu\|^2}, \quad
    \texttt{residual\_centred} = 0, \quad
    \texttt{batch\_mean} = \frac{N\|c\|^2}{\sum_j n_j \sigma_j^2},

.. math::
    \texttt{per\_token} = \frac1N\sum_b \frac{\|c\|^2}{\|x_b - m\|^2}, \quad
    \texttt{per\_token\_batch\_mean} = \frac1N\sum_b \frac{\|c\|^2}{\|x_b - \mu_{j(b)}\|^2},
    \quad \texttt{per\_token\_about\_zero} = \frac1N\sum_b \frac{\|c\|^2}{\|x_b\|^2}.

A large mean :math:`\mu` makes ``about_zero`` small whatever the error; ``residual_centred``
does not see a bias at all.

Streaming. Every quantity is a sum over tokens accumulated in float64 on the inputs' device;
means and centred sums of squares merge by Chan's pairwise rule
(:math:`M_2 = M_2^a + M_2^b + \|\delta\|^2 n_a n_b / n`, stable where
:math:`\sum\|x\|^2 - N\|\mu\|^2` cancels), so any cut into batches gives the one-shot value
of the batch-independent definitions.

Zero variance. A ratio whose total is zero is nan, never inf: a centred total counts as zero
when it is at most :data:`ZERO_RTOL` times the matching total about zero (the tokens agree
with their centre to about 12 significant digits), so rounding in the centring cannot turn
constant data into a huge finite value. A per-token mean is nan when any token's total is zero.

>>> import numpy as np
>>> from sae_ref import fvu
>>> x = np.array([[4., 4.], [3., 5.], [2., 4.], [3., 3.]])   # mean (3, 4), variance 1 per token
>>> s = fvu.init(2, xp=np, mean=np.array([3., 4.]))
>>> for batch in (x[:2], x[2:]):                               # batch means (3.5, 4.5), (2.5, 3.5)
...     s = fvu.update(s, batch, batch + np.array([1., 0.]))    # constant error c = (1, 0)
>>> {k: round(float(v), 4) for k, v in fvu.values(s).items()}
{'pooled': 1.0, 'about_zero': 0.0385, 'residual_centred': 0.0, 'batch_mean': 2.0, 'per_token': 1.0, 'per_token_batch_mean': 2.0, 'per_token_about_zero': 0.0416}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace, device as device_of

from sae_ref import _checks as C

#: The definitions, in the order :func:`values` reports them.
DEFINITIONS = ("pooled", "about_zero", "residual_centred", "batch_mean", "per_token",
               "per_token_batch_mean", "per_token_about_zero")

#: A centred total at most this times its total about zero counts as zero (the ratio is nan).
ZERO_RTOL = 1e-24


@dataclass(frozen=True)
class VarianceSums:
    """The float64 running sums behind every definition (0-D arrays unless a shape is given).

    n : tokens accumulated (a host integer: known from the shapes)
    mean_x, m2_x : running mean [d] of :math:`x` and :math:`\\sum_b \\|x_b - \\text{mean}\\|^2`
    mean_r, m2_r : the same for the residual :math:`r = x - \\hat x`
    sq_x, sq_r : :math:`\\sum_b \\|x_b\\|^2`, :math:`\\sum_b \\|r_b\\|^2`
    m2_batch : :math:`\\sum_j \\sum_{b \\in j} \\|x_b - \\mu_j\\|^2` (each batch about its mean)
    pt_batch, pt_zero, pt_ref : sums of the per-token ratios (about the batch mean, about
        zero, about ``ref_mean``; ``pt_ref`` None without a reference mean)
    ref_mean : the reference mean [d] of ``per_token``, or None
    """

    n: int
    mean_x: Any
    m2_x: Any
    mean_r: Any
    m2_r: Any
    sq_x: Any
    sq_r: Any
    m2_batch: Any
    pt_batch: Any
    pt_zero: Any
    pt_ref: Any = None
    ref_mean: Any = None

    @property
    def d(self) -> int:
        return int(self.mean_x.shape[0])


def _ratio(xp, num, den, scale):
    """``num / den``, nan where ``den <= ZERO_RTOL * scale`` (a zero total)."""
    ok = den > ZERO_RTOL * scale
    one = xp.ones_like(den)
    nan = xp.full_like(den, float("nan"))
    return xp.where(ok, num / xp.where(ok, den, one), nan)


def init(d: int, *, xp, device=None, mean=None) -> VarianceSums:
    r"""Empty sums for tokens of ``d`` features, on ``device`` of the namespace ``xp``.

    .. math:: n = 0, \quad \textstyle\sum(\cdot) = 0

    ``mean`` ([d], any real floating dtype, on ``device``) is the reference :math:`m` of
    ``per_token``; without it that definition is not reported.

    >>> import numpy as np
    >>> from sae_ref import fvu
    >>> fvu.init(3, xp=np).n
    0
    """
    d = C.integer_in("fvu.init", "d", d, 1, 2**40)
    xp = array_namespace(xp.zeros(1))
    if device is None:
        device = device_of(xp.zeros(1))
    z = xp.zeros((), dtype=xp.float64, device=device)
    zd = xp.zeros((d,), dtype=xp.float64, device=device)
    ref = pt_ref = None
    if mean is not None:
        xp_m = C.namespace("fvu.init", mean=mean)
        if xp_m is not xp and xp_m.__name__ != xp.__name__:
            raise TypeError(f"fvu.init: argument 'mean' must be an array of {xp.__name__}, "
                            f"got one of {xp_m.__name__}")
        C.floating("fvu.init", xp, "mean", mean, shape=(d,))
        C.finite("fvu.init", xp, "mean", mean)
        if device_of(mean) != device:
            raise ValueError(f"fvu.init: argument 'mean' is on {device_of(mean)}, the sums on {device}")
        ref, pt_ref = xp.astype(mean, xp.float64), z
    return VarianceSums(0, zd, z, zd, z, z, z, z, z, z, pt_ref, ref)


def _check_pair(op, sums, x, x_hat):
    if not isinstance(sums, VarianceSums):
        raise TypeError(f"{op}: argument 'sums' must be VarianceSums, got {type(sums).__name__}")
    xp = C.namespace(op, x=x, x_hat=x_hat, sums=sums.mean_x)
    C.floating(op, xp, "x", x, ndim=2, shape=(None, sums.d))
    C.floating(op, xp, "x_hat", x_hat, ndim=2, shape=tuple(x.shape))
    C.nonempty_batch(op, "x", x)
    C.finite(op, xp, "x", x)
    C.finite(op, xp, "x_hat", x_hat)
    return xp


def update(sums: VarianceSums, x, x_hat) -> VarianceSums:
    r"""The sums with one more batch: ``x`` and ``x_hat`` of shape [B, d], any real float dtype.

    .. math:: \textstyle\sum_b \to \sum_b + \sum_{b \in \text{batch}}, \quad
              M_2 \to M_2 + M_2^{batch} + \|\delta\|^2 n_a n_b / n

    Both are cast to float64 before anything is summed.

    >>> import numpy as np
    >>> from sae_ref import fvu
    >>> s = fvu.update(fvu.init(1, xp=np), np.array([[1.], [3.]]), np.array([[1.], [2.]]))
    >>> s.n, float(s.sq_r), float(s.m2_x)
    (2, 1.0, 2.0)
    """
    xp = _check_pair("fvu.update", sums, x, x_hat)
    return merge(sums, _batch_sums(xp, x, x_hat, sums.ref_mean))


def _batch_sums(xp, x, x_hat, ref) -> VarianceSums:
    x = xp.astype(x, xp.float64)
    r = x - xp.astype(x_hat, xp.float64)
    mean_x = xp.mean(x, axis=0)
    mean_r = xp.mean(r, axis=0)
    dx, dr = x - mean_x, r - mean_r
    xx = xp.sum(x * x, axis=1)
    rr = xp.sum(r * r, axis=1)
    dev = xp.sum(dx * dx, axis=1)
    m2_x = xp.sum(dev)
    pt_ref = None
    if ref is not None:
        dm = x - ref
        pt_ref = xp.sum(_ratio(xp, rr, xp.sum(dm * dm, axis=1), xx))
    return VarianceSums(
        int(x.shape[0]), mean_x, m2_x, mean_r, xp.sum(dr * dr), xp.sum(xx), xp.sum(rr), m2_x,
        xp.sum(_ratio(xp, rr, dev, xx)), xp.sum(_ratio(xp, rr, xx, xx)), pt_ref, ref,
    )


def merge(a: VarianceSums, b: VarianceSums) -> VarianceSums:
    r"""The sums of two disjoint sets of tokens (e.g. two shards evaluated apart).

    .. math:: \mu = \mu_a + \delta\,\frac{n_b}{n}, \quad
              M_2 = M_2^a + M_2^b + \|\delta\|^2 \frac{n_a n_b}{n}, \quad \delta = \mu_b - \mu_a

    Both must use the same reference mean (or none).

    >>> import numpy as np
    >>> from sae_ref import fvu
    >>> one = lambda v: fvu.update(fvu.init(1, xp=np), np.array([[v]]), np.array([[v]]))
    >>> float(fvu.merge(one(1.), one(3.)).m2_x)     # (1 - 2)^2 + (3 - 2)^2
    2.0
    """
    for name, s in (("a", a), ("b", b)):
        if not isinstance(s, VarianceSums):
            raise TypeError(f"fvu.merge: argument '{name}' must be VarianceSums, got {type(s).__name__}")
    xp = C.namespace("fvu.merge", a=a.mean_x, b=b.mean_x)
    if a.d != b.d:
        raise ValueError(f"fvu.merge: sums of d = {a.d} and d = {b.d} cannot be merged")
    _check_same_reference(xp, a.ref_mean, b.ref_mean)
    if a.n == 0 or b.n == 0:
        return b if a.n == 0 else a
    n = a.n + b.n
    mean_x, m2_x = _merge_moments(xp, a.n, a.mean_x, a.m2_x, b.n, b.mean_x, b.m2_x)
    mean_r, m2_r = _merge_moments(xp, a.n, a.mean_r, a.m2_r, b.n, b.mean_r, b.m2_r)
    pt_ref = None if a.pt_ref is None else a.pt_ref + b.pt_ref
    return VarianceSums(n, mean_x, m2_x, mean_r, m2_r, a.sq_x + b.sq_x, a.sq_r + b.sq_r,
                        a.m2_batch + b.m2_batch, a.pt_batch + b.pt_batch,
                        a.pt_zero + b.pt_zero, pt_ref, a.ref_mean)


def _merge_moments(xp, na, mean_a, m2_a, nb, mean_b, m2_b):
    n = na + nb
    delta = mean_b - mean_a
    return mean_a + delta * (nb / n), m2_a + m2_b + xp.sum(delta * delta) * (na * nb / n)


def _check_same_reference(xp, ra, rb):
    if (ra is None) != (rb is None):
        raise ValueError("fvu.merge: one of the sums has a reference mean and the other has none")
    if ra is not None and ra is not rb and not bool(xp.all(ra == rb)):
        raise ValueError("fvu.merge: the sums were made with different reference means")


def values(sums: VarianceSums) -> dict[str, Any]:
    r"""Every definition's FVU as a 0-D float64 array, keyed by name (see the module table).

    .. math:: \mathrm{FVU}_{name} = \text{unexplained}_{name} / \text{total}_{name}

    ``per_token`` is present only when the sums were made with a reference mean.

    >>> import numpy as np
    >>> from sae_ref import fvu
    >>> s = fvu.update(fvu.init(1, xp=np), np.array([[1.], [3.]]), np.array([[1.], [2.]]))
    >>> float(fvu.values(s)["pooled"])           # 1 / ((1 - 2)^2 + (3 - 2)^2)
    0.5
    """
    if not isinstance(sums, VarianceSums):
        raise TypeError(f"fvu.values: argument 'sums' must be VarianceSums, got {type(sums).__name__}")
    if sums.n == 0:
        raise ValueError("fvu.values: argument 'sums' holds no tokens (update it with a batch first)")
    xp = array_namespace(sums.mean_x)
    s = sums
    out = {
        "pooled": _ratio(xp, s.sq_r, s.m2_x, s.sq_x),
        "about_zero": _ratio(xp, s.sq_r, s.sq_x, s.sq_x),
        "residual_centred": _ratio(xp, s.m2_r, s.m2_x, s.sq_x),
        "batch_mean": _ratio(xp, s.sq_r, s.m2_batch, s.sq_x),
        "per_token": None if s.pt_ref is None else s.pt_ref / s.n,
        "per_token_batch_mean": s.pt_batch / s.n,
        "per_token_about_zero": s.pt_zero / s.n,
    }
    return {k: v for k, v in out.items() if v is not None}


def fvu(x, x_hat, definition: str = "pooled", *, mean=None):
    r"""One definition's FVU of one array of tokens, taken as a single batch.

    .. math:: \mathrm{FVU}_{pooled} = \frac{\sum_b \|x_b - \hat x_b\|^2}{\sum_b \|x_b - \mu\|^2}
              \quad \text{(and the others of the module table)}

    As one batch, ``batch_mean`` equals ``pooled`` and ``per_token_batch_mean`` equals
    ``per_token``, whose reference ``mean`` defaults to the tokens' own mean. Returns a 0-D
    float64 array on the input's device.

    >>> import numpy as np
    >>> from sae_ref.fvu import fvu
    >>> x = np.array([[0., 1.], [2., 3.]])
    >>> float(fvu(x, x + 1.0)), float(fvu(x, x + 1.0, "about_zero"))   # 4/4, 4/14
    (1.0, 0.2857142857142857)
    """
    C.choice("fvu", "definition", definition, DEFINITIONS)
    xp = C.namespace("fvu", x=x, x_hat=x_hat, mean=mean)
    C.floating("fvu", xp, "x", x, ndim=2)
    C.nonempty_batch("fvu", "x", x)
    if mean is None and definition == "per_token":
        mean = xp.mean(xp.astype(x, xp.float64), axis=0)
    sums = init(int(x.shape[1]), xp=xp, device=device_of(x), mean=mean)
    return values(update(sums, x, x_hat))[definition]


def explained_variance(x, x_hat, definition: str = "pooled", *, mean=None):
    r"""One minus :func:`fvu` under the named definition.

    .. math:: \mathrm{EV}_{name} = 1 - \mathrm{FVU}_{name}

    >>> import numpy as np
    >>> from sae_ref.fvu import explained_variance
    >>> x = np.array([[0., 1.], [2., 3.]])
    >>> float(explained_variance(x, x + 1.0, "about_zero"))           # 1 - 4/14
    0.7142857142857143
    """
    return 1.0 - fvu(x, x_hat, definition, mean=mean)
