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
from array_api_compat import array_namespace

from sae_ref.arrays import to_numpy
from sae_ref.data.stream import BatchStream, check_int, on_gpu

#: Distributions of an active feature's magnitude: Exp(1), U(0, 1], or always 1.
MAGNITUDES = ("exponential", "uniform", "constant")

_STREAM, _SAMPLE, _DEVICE = 1, 2, 3  # the streams' and sample()'s draws never share a seed sequence
#: Where a stream draws its batches: NumPy on the host, or the backend's generator.
RNGS = ("host", "device")


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

    def _device_batch(self, xp, atoms, n: int, key, dtype, device):
        """A batch of ``n`` rows drawn on ``device`` with the backend's generator, with shapes
        known in advance (no host read): uniforms ``u`` of shape [n, n_features] choose the
        active features (``u < k / n_features``, independent Bernoulli draws as on the host);
        up to ``cap`` of them are listed in index order (``cap`` = the expected number plus
        ten standard deviations and 16: the chance of more is below 1e-20), their magnitudes
        come from a second draw, and the batch is their sparse product with the atoms (the
        backend's ``spmm``), plus the noise from a third draw."""
        from sae_ref.backends import get_backend

        be = get_backend(xp)
        nf = self.n_features
        s1, s2, s3 = (int(v) for v in np.random.SeedSequence(key).generate_state(3))
        u = be.uniform(xp, s1, (n, nf), low=0.0, high=1.0, dtype=xp.float32, device=device)
        mean = n * self.k
        cap = min(n * nf, int(mean + 10 * np.sqrt(mean) + 16))
        idx = be.compact(u < self.k / nf, cap)  # padded with n * nf past the actives
        del u
        valid = idx < n * nf
        idx = xp.where(valid, idx, xp.zeros_like(idx))
        m = be.uniform(xp, s2, (cap,), low=0.0, high=1.0, dtype=dtype, device=device)
        if self.magnitude == "exponential":
            m = -xp.log1p(-m)
        elif self.magnitude == "uniform":
            m = 1.0 - m  # in (0, 1]
        else:
            m = xp.ones_like(m)
        m = xp.where(valid, m, xp.zeros_like(m))
        x = be.spmm(idx // nf, idx % nf, m, atoms, n)
        if self.noise:
            x = x + self.noise * be.normal(xp, s3, (n, self.d), dtype=dtype, device=device)
        return x

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
               dtype=None, nonfinite: str = "raise", rows=None, rng: str | None = None) -> BatchStream:
        """Endless batches; batch ``i`` is drawn from ``default_rng([source seed, 1, seed, i])``.

        Any position is reproducible without replaying earlier batches; a stream with another
        ``seed`` is independent (held-out data). ``rows`` must be None: a synthetic source
        has no finite row range. See :class:`~sae_ref.data.stream.BatchStream` for the rest.

        ``rng``: ``"host"`` draws each batch with NumPy on the host (the same numbers on every
        backend); ``"device"`` draws it on the backend's device with its own generator
        (:meth:`_device_batch`), so a GPU trains at the speed of its step. The device stream is
        another sequence of batches (the same distribution), still a pure function of
        ``(seed, position)`` on one backend and device. Default: ``"device"`` on a GPU (torch
        CUDA, CuPy), ``"host"`` elsewhere.
        """
        op = "SyntheticSource.stream"
        B = check_int(op, "batch_size", batch_size, 1)
        seed = check_int(op, "seed", seed, 0)
        if rows is not None:
            raise ValueError(f"{op}: argument 'rows' must be None, got {rows!r} (a synthetic "
                             f"source has no finite row range; use another seed for held-out "
                             f"data)")
        if rng is None:
            rng = "device" if on_gpu(xp, device) else "host"
        if rng not in RNGS:
            raise ValueError(f"{op}: argument 'rng' must be one of {list(RNGS)}, got {rng!r}")

        def make(i):
            return self._draw(np.random.default_rng([self.seed, _STREAM, seed, i]), B)[0], None

        if rng == "device":
            from sae_ref.data.stream import resolve_dtype

            xp = array_namespace(np.zeros(0)) if xp is None else xp
            dt = resolve_dtype(op, xp, dtype)
            atoms = xp.asarray(self.atoms, dtype=dt, device=device)

            def make(i):  # noqa: F811
                return self._device_batch(xp, atoms, B, [self.seed, _DEVICE, seed, i], dt, device), None

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
