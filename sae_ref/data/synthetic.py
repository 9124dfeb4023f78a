r"""Synthetic activations with known ground truth: sparse features in superposition.

``n_features`` unit-norm atoms :math:`a_f \in \mathbb R^d` (more atoms than dimensions is
superposition); a sample is :math:`x = \sum_f c_f a_f + \varepsilon` where feature :math:`f`
is active independently with probability :math:`k / n_{features}` with a positive magnitude
:math:`c_f`, and :math:`\varepsilon` is optional Gaussian noise. An SAE trained on such data
should find decoder rows close to the atoms; :func:`mean_max_cosine` measures how close.

>>> from sae_ref.data.synthetic import SyntheticSource, mean_max_cosine
>>> src = SyntheticSource(8, 32, k=2.0, seed=0)
>>> x = next(src.stream(4))
>>> x.shape, str(x.dtype)
((4, 8), 'float32')
>>> round(mean_max_cosine(src.atoms, src.atoms), 6)
1.0
"""

from __future__ import annotations

import numpy as np

from sae_ref.arrays import to_numpy
from sae_ref.data.stream import BatchStream, check_int

#: Distributions of an active feature's magnitude: Exp(1), U(0, 1], or always 1.
MAGNITUDES = ("exponential", "uniform", "constant")

_STREAM, _SAMPLE = 1, 2  # the streams' and sample()'s draws never share a seed sequence


class SyntheticSource:
    """An endless source of ``x = codes @ atoms + noise`` with known atoms.

    Parameters
    ----------
    d : int
        Features per row (the dimension of the atoms).
    n_features : int
        Number of true atoms; ``n_features > d`` puts them in superposition.
    k : float
        Expected number of active features per sample: each is active with probability
        ``k / n_features``.
    seed : int
        Seeds the atoms (``default_rng(seed)``: Gaussian, then normalised rows) and, with the
        stream's own seed, every batch.
    magnitude : {"exponential", "uniform", "constant"}
        Distribution of an active feature's coefficient: Exp(1), U(0, 1] or 1.
    noise : float
        Standard deviation of isotropic Gaussian noise added to each sample.

    Attributes
    ----------
    atoms : numpy.ndarray
        ``[n_features, d]`` float64, unit-norm rows.
    d, n_features : int
    """

    def __init__(self, d: int, n_features: int, *, k: float = 4.0, seed: int = 0,
                 magnitude: str = "exponential", noise: float = 0.0):
        op = "SyntheticSource"
        self.d = check_int(op, "d", d, 1)
        self.n_features = check_int(op, "n_features", n_features, 1)
        self.seed = check_int(op, "seed", seed, 0)
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= n_features:
            raise ValueError(f"{op}: argument 'k' must be a number in (0, n_features="
                             f"{n_features}], got {k!r}")
        if magnitude not in MAGNITUDES:
            raise ValueError(f"{op}: argument 'magnitude' must be one of {list(MAGNITUDES)}, "
                             f"got {magnitude!r}")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise < np.inf:
            raise ValueError(f"{op}: argument 'noise' must be a finite number >= 0, got {noise!r}")
        self.k, self.magnitude, self.noise = float(k), magnitude, float(noise)
        atoms = np.random.default_rng(self.seed).standard_normal((self.n_features, self.d))
        self.atoms = atoms / np.linalg.norm(atoms, axis=1, keepdims=True)

    def __repr__(self) -> str:
        return (f"SyntheticSource(d={self.d}, n_features={self.n_features}, k={self.k}, "
                f"seed={self.seed}, magnitude={self.magnitude!r}, noise={self.noise})")

    def _draw(self, rng: np.random.Generator, n: int):
        """``n`` samples as (x [n, d], flat active indices, their magnitudes), float64."""
        nf = self.n_features
        m = rng.binomial(n * nf, self.k / nf)
        flat = np.sort(rng.choice(n * nf, size=m, replace=False))  # i.i.d. Bernoulli actives
        if self.magnitude == "exponential":
            mags = rng.exponential(1.0, size=m)
        elif self.magnitude == "uniform":
            mags = 1.0 - rng.random(m)  # in (0, 1]: an active feature is never zero
        else:
            mags = np.ones(m)
        x = np.zeros((n, self.d))
        if m:
            self._mix(x, flat, mags)
        if self.noise:
            x += self.noise * rng.standard_normal((n, self.d))
        return x, flat, mags

    def _mix(self, x: np.ndarray, flat: np.ndarray, mags: np.ndarray) -> None:
        """``x += codes @ atoms`` for the codes at sorted flat indices ``flat``.

        The s-th active feature of every row is added in one vectorised step (rows are
        distinct within a step): O(nnz d) work without an [nnz, d] temporary.
        """
        rows, cols = np.divmod(flat, self.n_features)
        first = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        slot = np.arange(len(flat)) - np.repeat(first, np.diff(np.r_[first, len(flat)]))
        order = np.argsort(slot, kind="stable")
        bounds = np.r_[0, np.cumsum(np.bincount(slot))]
        for s in range(len(bounds) - 1):
            sel = order[bounds[s]:bounds[s + 1]]
            term = self.atoms[cols[sel]]
            term *= mags[sel, None]
            x[rows[sel]] += term

    def sample(self, n: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``n`` samples and their codes: ``(x [n, d], codes [n, n_features])``, NumPy float64.

        ``x == codes @ atoms`` (plus the noise, if any). Independent of every stream's draws.
        """
        n = check_int("SyntheticSource.sample", "n", n, 1)
        seed = check_int("SyntheticSource.sample", "seed", seed, 0)
        x, flat, mags = self._draw(np.random.default_rng([self.seed, _SAMPLE, seed]), n)
        codes = np.zeros(n * self.n_features)
        codes[flat] = mags
        return x, codes.reshape(n, self.n_features)

    def stream(self, batch_size: int, *, seed: int = 0, position: int = 0, xp=None, device=None,
               dtype=None, nonfinite: str = "raise", rows=None) -> BatchStream:
        """Endless batches; batch ``i`` is drawn from ``default_rng([source seed, 1, seed, i])``.

        Any position is reproducible without replaying earlier batches; a stream with another
        ``seed`` is independent (held-out data). ``rows`` must be None: a synthetic source
        has no finite row range. See :class:`~sae_ref.data.stream.BatchStream` for the rest.
        """
        op = "SyntheticSource.stream"
        B = check_int(op, "batch_size", batch_size, 1)
        seed = check_int(op, "seed", seed, 0)
        if rows is not None:
            raise ValueError(f"{op}: argument 'rows' must be None, got {rows!r} (a synthetic "
                             f"source has no finite row range; use another seed for held-out "
                             f"data)")

        def make(i):
            return self._draw(np.random.default_rng([self.seed, _STREAM, seed, i]), B)[0], None

        s = BatchStream(repr(self), make, lambda batch, info: "", position=position, xp=xp,
                        device=device, dtype=dtype, nonfinite=nonfinite)
        s.batch_size, s.seed = B, seed
        return s


def mean_max_cosine(W_dec, atoms) -> float:
    r"""For each true atom, its best cosine similarity with a learned atom, averaged.

    .. math:: \frac{1}{n} \sum_{f=1}^{n} \max_{j} \cos(a_f, W_{dec, j})

    Parameters
    ----------
    W_dec : array, [h, d]
        Learned dictionary, one atom per row (any backend; copied to the host).
    atoms : array, [n, d]
        The true atoms.

    Returns
    -------
    float
        1.0 when every true atom is found exactly (up to scale). A dictionary of ``h``
        random directions scores far lower: about 0.41 for ``h = 384, d = 48`` and 0.49 for
        ``h = 256, d = 32`` (each true atom's best match among ``h`` random cosines of spread
        :math:`1/\sqrt d`), so
        a score is meaningful only well above that. A zero row of ``W_dec`` scores 0.
    """
    W = np.asarray(to_numpy(W_dec), dtype=np.float64)
    A = np.asarray(to_numpy(atoms), dtype=np.float64)
    if W.ndim != 2 or A.ndim != 2 or W.shape[1] != A.shape[1] or 0 in W.shape or 0 in A.shape:
        raise ValueError(f"mean_max_cosine: arguments 'W_dec' [h, d] and 'atoms' [n, d] must be "
                         f"non-empty 2-D arrays with one d, got shapes {W.shape} and {A.shape}")
    if not (np.isfinite(W).all() and np.isfinite(A).all()):
        raise ValueError("mean_max_cosine: arguments 'W_dec' and 'atoms' must be finite")
    W = W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), np.finfo(np.float64).tiny)
    A = A / np.maximum(np.linalg.norm(A, axis=1, keepdims=True), np.finfo(np.float64).tiny)
    best = np.concatenate([np.max(A[s:s + 1024] @ W.T, axis=1) for s in range(0, len(A), 1024)])
    return float(np.mean(best))
