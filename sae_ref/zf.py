r"""The ZF evaluation of a trained SAE (Lee et al. 2025): the norm of the input against the
norm of the features that rebuild its reconstruction.

Per token, the features are rescaled by the decoder row norms and :math:`\|b_{dec}\|` is
appended as one more coefficient (the bias as an extra atom):

.. math:: \tilde f = (f_1 \|d_1\|, \dots, f_h \|d_h\|, \|b_{dec}\|), \qquad
          \hat z = \sum_j \tilde f_j \frac{d_j}{\|d_j\|} + \|b_{dec}\| \frac{b_{dec}}{\|b_{dec}\|},

so :math:`\tilde f` holds the coefficients of :math:`\hat z` on unit atoms (:func:`f_tilde`).
For :math:`\varepsilon`-quasi-orthogonal unit atoms the AFA bound puts
:math:`\|\tilde f\|` between :math:`\|z\|/\sqrt{1 + \varepsilon(h-1)}` and
:math:`\|z\|/\sqrt{1 - \varepsilon(h-1)}` (:func:`sae_ref.afa.afa_bounds`). The ZF plot shows
:math:`\|z\|` (x) against :math:`\|\tilde f\|` (y): below :math:`y = x` a token is
under-activated, above it over-activated. Per token (:func:`token_stats`, streamed over
batches by :func:`zf_points`):

.. math:: \varepsilon_{LBO} = \frac{|\|z\|^2 - \|\tilde f\|^2|}{(h-1)\|\tilde f\|^2}, \qquad
          \mathrm{NMSE} = \frac{\|z - \hat z\|^2}{\|z\|^2},

the smallest :math:`\varepsilon` consistent with the bound (the bias atom is not counted in
:math:`h`, as in the authors' definition) and the per-token normalised error (not the pooled
one). A token lies inside the band :math:`c = \varepsilon(h-1)` exactly when
:math:`\varepsilon_{LBO}(h-1) \le c`.

**Which space.** :math:`z` is the SAE's input as the SAE sees it: with
``SAEConfig(standardize=True)`` (the BatchTopK authors' SAEs, SAELens ``layer_norm``) the
standardised input, and :math:`\hat z` the reconstruction in that space, since only there
does :math:`\tilde f` rebuild :math:`\hat z`. ``ZFPoints.space`` records which.

**Which tokens.** All of them, or (as the authors do) the last token of each sequence: pass
``ends``, one boolean mask per batch marking the rows that end a sequence (stored activations
are packed windows without sequence boundaries; :func:`sequence_ends` builds the mask from
sequence lengths). The SAE always runs on the whole batch and the rows are picked afterwards
(BatchTopK's selection depends on the batch). :func:`text_activations` gets a Hugging Face
model's hidden states per text, every non-special token or the last real one.

**Results.** Per-batch statistics stay on the batches' device; at the end they are moved once
to the host as NumPy float64 (:class:`ZFPoints`: five numbers per token, small host data for
summaries and figures). :func:`zf_summary` gives quantiles and means of
:math:`\varepsilon_{LBO}` and NMSE, the fractions below and above :math:`y = x` and outside
each band; :mod:`sae_ref.zf_plots` draws the figures.

>>> import numpy as np
>>> from sae_ref.sae import SAEConfig, SAEParams
>>> from sae_ref.zf import zf_points, zf_summary
>>> W = np.eye(3, 4)                      # orthonormal atoms, b_dec = 0: a lossless ReLU SAE
>>> params = SAEParams(W.T, np.zeros(3), W, np.zeros(4))
>>> x = np.array([[3.0, 4.0, 0.0, 0.0], [1.0, 2.0, 2.0, 0.0]])
>>> pts = zf_points(params, SAEConfig("relu"), [x])
>>> pts.z_norm.tolist(), pts.f_norm.tolist(), pts.eps_lbo.tolist()
([5.0, 3.0], [5.0, 3.0], [0.0, 0.0])
>>> zf_summary(pts)["frac_outside"]
{'0.25': 0.0, '0.5': 0.0, '1.0': 0.0}
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace, is_array_api_obj, is_torch_namespace
from array_api_compat import device as device_of

from sae_ref import _checks as C
from sae_ref.afa import eps_lbo, f_tilde_norm, quasi_orthogonality
from sae_ref.arrays import to_numpy
from sae_ref.sae import SAEConfig, SAEParams, _check_params, _forward
from sae_ref.sparse import SparseCode

#: The band levels c = eps (h - 1) of the ZF plot.
BANDS = (0.25, 0.5, 1.0)
#: Quantiles :func:`zf_summary` reports.
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
#: Token modes of :func:`text_activations`.
TOKEN_MODES = ("all", "last")
_STATS = ("z_norm", "f_norm", "eps_lbo", "nmse", "l0")


# --- f tilde ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FTilde:
    r"""The coefficients of :math:`\hat z` on unit atoms: ``values`` (a SparseCode at the
    code's places, :math:`f_{bj} \|d_j\|`) and ``bias`` (0-D, :math:`\|b_{dec}\|`, the
    coefficient of the atom :math:`b_{dec}/\|b_{dec}\|`, the same in every row)."""

    values: SparseCode
    bias: Any


def f_tilde(code: SparseCode, W_dec, b_dec) -> FTilde:
    r""":math:`\tilde f_{bj} = f_{bj}\|W^{dec}_j\|` and the bias coefficient :math:`\|b_{dec}\|`.

    With :math:`u_j = W^{dec}_j/\|W^{dec}_j\|` and :math:`u_b = b_{dec}/\|b_{dec}\|` (zero
    vectors where the norm is 0), :math:`\hat z_b = \sum_j \tilde f_{bj} u_j + \|b_{dec}\| u_b`
    exactly; :func:`sae_ref.afa.f_tilde_norm` is the norm of these coefficients per row.

    >>> import numpy as np
    >>> from sae_ref.sparse import SparseCode
    >>> code = SparseCode.from_mask(np.array([[2.0, 0.0]]), np.array([[True, False]]))
    >>> ft = f_tilde(code, np.array([[0.0, 3.0], [1.0, 0.0]]), np.array([0.0, 4.0]))
    >>> ft.values.values.tolist(), float(ft.bias)
    ([6.0], 4.0)
    """
    op = "f_tilde"
    if not isinstance(code, SparseCode):
        raise TypeError(f"{op}: argument 'code' must be a SparseCode, got {type(code).__name__}")
    xp = C.namespace(op, values=code.values, W_dec=W_dec, b_dec=b_dec)
    C.floating(op, xp, "W_dec", W_dec, ndim=2, shape=(code.shape[1], None))
    C.floating(op, xp, "b_dec", b_dec, shape=(W_dec.shape[1],))
    norms = xp.linalg.vector_norm(W_dec, axis=1)
    return FTilde(code.with_values(code.values * xp.take(norms, code.cols)),
                  xp.linalg.vector_norm(b_dec))


# --- per-token statistics on the backend ------------------------------------------------------------
@dataclass(frozen=True)
class TokenStats:
    """Per-token statistics of one batch, arrays [B] on the batch's backend and device:
    ``z_norm`` :math:`\\|z\\|`, ``f_norm`` :math:`\\|\\tilde f\\|`, ``eps_lbo``, ``nmse``
    (per token) and ``l0`` (active latents)."""

    z_norm: Any
    f_norm: Any
    eps_lbo: Any
    nmse: Any
    l0: Any

    def take(self, xp, index) -> TokenStats:
        """The rows at ``index`` (an integer array)."""
        return TokenStats(*(xp.take(getattr(self, n), index) for n in _STATS))


def token_stats(params: SAEParams, x, config: SAEConfig) -> TokenStats:
    r"""Run the SAE on ``x`` [B, d] and return the per-token ZF statistics.

    ``eps_lbo`` is :math:`+\infty` for a token with :math:`\tilde f = 0 \ne z` (it lies in no
    band) and 0 when both are 0 (the origin lies on :math:`y = x`); ``nmse`` is NaN where
    :math:`z = 0`. Needs h >= 2.

    >>> import numpy as np
    >>> from sae_ref.sae import SAEConfig, init_params
    >>> s = token_stats(init_params(4, 8, xp=np), np.ones((2, 4), np.float32), SAEConfig("topk", k=2))
    >>> s.l0.tolist()
    [2.0, 2.0]
    """
    xp = _check_params("token_stats", params, x, config)
    _check_h("token_stats", params)
    return _token_stats(xp, params, x, config)


def _check_h(op: str, params: SAEParams) -> None:
    if params.h < 2:
        raise ValueError(f"{op}: argument 'params' must have h >= 2 latents (epsLBO divides by "
                         f"h - 1), got h = {params.h}")


def _token_stats(xp, params: SAEParams, x, config: SAEConfig) -> TokenStats:
    fwd = _forward(xp, params, x, config)
    z, z_hat = fwd.x, fwd.x_hat
    z2 = xp.sum(z * z, axis=1)
    z_norm = xp.sqrt(z2)
    f_norm = f_tilde_norm(fwd.code, params.W_dec, params.b_dec)
    err = xp.sum((z - z_hat) ** 2, axis=1)
    nmse = xp.where(z2 > 0, err / xp.where(z2 > 0, z2, xp.ones_like(z2)), xp.full_like(z2, float("nan")))
    return TokenStats(z_norm, f_norm, _eps_lbo(xp, z_norm, f_norm, params.h), nmse, fwd.code.l0())


def _eps_lbo(xp, z_norm, f_norm, h: int):
    """:func:`sae_ref.afa.eps_lbo` with the tokens where :math:`\\tilde f = 0` set apart."""
    ok = f_norm > 0
    value = eps_lbo(z_norm, xp.where(ok, f_norm, xp.ones_like(f_norm)), h)
    degenerate = xp.where(z_norm > 0, xp.full_like(f_norm, float("inf")), xp.zeros_like(f_norm))
    return xp.where(ok, value, degenerate)


# --- streaming over batches ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ZFPoints:
    """The ZF statistics of one SAE on a set of tokens, as host data.

    Attributes
    ----------
    z_norm, f_norm, eps_lbo, nmse, l0 : np.ndarray, float64 [N]
        Per token (see :func:`token_stats`); ``nmse`` is per token, not pooled.
    h : int
        Number of latents.
    b_dec_norm : float
        :math:`\\|b_{dec}\\|`, the smallest possible :math:`\\|\\tilde f\\|`.
    eps_max_abs, eps_max_signed, eps_mean : float
        The decoder's quasi-orthogonality (:func:`sae_ref.afa.quasi_orthogonality`); NaN when
        not measured.
    tokens : {"all", "last"}
        All tokens of the batches, or the last token of each sequence.
    space : {"input", "standardized"}
        Where :math:`z` and :math:`\\hat z` live (see the module docs).
    """

    z_norm: np.ndarray
    f_norm: np.ndarray
    eps_lbo: np.ndarray
    nmse: np.ndarray
    l0: np.ndarray
    h: int
    b_dec_norm: float
    eps_max_abs: float = float("nan")
    eps_max_signed: float = float("nan")
    eps_mean: float = float("nan")
    tokens: str = "all"
    space: str = "input"

    def __len__(self) -> int:
        return int(self.z_norm.shape[0])


def zf_points(params: SAEParams, config: SAEConfig, batches, *, ends=None, tokens: str | None = None,
              measure_eps: bool = True, block: int = 2048) -> ZFPoints:
    """Stream ``batches`` through the SAE and collect the per-token ZF statistics.

    Parameters
    ----------
    params, config : SAEParams, SAEConfig
        Any trained SAE (:func:`sae_ref.io.saelens.load_saelens` reads SAELens files; or use
        :func:`zf_points_saelens`). Needs h >= 2.
    batches : iterable of arrays [B, d], or one array
        Activations of the parameters' namespace, device and dtype; a finite iterable (cut an
        endless stream with ``itertools.islice``).
    ends : iterable of bool arrays [B], or one array, optional
        One mask per batch (same namespace and device) marking the rows that end a sequence;
        only those rows are kept. Default: every row.
    tokens : {"all", "last"}, optional
        What ``ZFPoints.tokens`` records: by default "last" when ``ends`` is given, else
        "all"; pass "last" when the batches already hold one row per sequence
        (:func:`text_activations` with ``tokens="last"``).
    measure_eps : bool
        Also measure the decoder's quasi-orthogonality (O(h^2 d) work, ``block`` rows at a time).

    Row-wise activations (relu, topk, jumprelu, threshold) give the same statistics however
    the tokens are cut into batches; BatchTopK's selection depends on the batch (evaluate it
    with its threshold inference, ``SAEConfig("threshold", theta=...)``).

    Returns
    -------
    ZFPoints
        NumPy float64 host data, rows in batch order.
    """
    op = "zf_points"
    xp = _check_params(op, params, None, config)
    _check_h(op, params)
    tokens = _tokens_label(op, tokens, ends)
    block = C.integer_in(op, "block", block, 1, 2**40)
    if is_array_api_obj(batches):
        batches = [batches]
    if ends is not None and is_array_api_obj(ends):
        ends = [ends]
    if not isinstance(batches, Iterable):
        raise TypeError(f"{op}: argument 'batches' must be an iterable of arrays [B, {params.d}], "
                        f"got {type(batches).__name__}")
    if ends is not None and not isinstance(ends, Iterable):
        raise TypeError(f"{op}: argument 'ends' must be an iterable of boolean arrays, got {type(ends).__name__}")
    parts = _collect(op, xp, params, config, batches, None if ends is None else iter(ends))
    return _points(xp, params, config, parts, tokens, measure_eps, block)


def _tokens_label(op: str, tokens, ends) -> str:
    if tokens is None:
        return "all" if ends is None else "last"
    C.choice(op, "tokens", tokens, TOKEN_MODES)
    if tokens == "all" and ends is not None:
        raise ValueError(f"{op}: argument 'tokens' is 'all' but 'ends' keeps only sequence ends")
    return tokens


def _collect(op, xp, params, config, batches, ends: Iterator | None) -> list[TokenStats]:
    parts = []
    n = 0
    for i, x in enumerate(batches):
        _check_batch(op, xp, params, f"batches[{i}]", x)
        stats = _token_stats(xp, params, x, config)
        if ends is not None:
            mask = next(ends, None)
            if mask is None:
                raise ValueError(f"{op}: argument 'ends' has fewer masks than 'batches': "
                                 f"none for batches[{i}]")
            (index,) = xp.nonzero(_check_mask(op, xp, f"ends[{i}]", mask, x))
            stats = stats.take(xp, index)
        parts.append(stats)
        n += 1
    if n == 0:
        raise ValueError(f"{op}: argument 'batches' holds no batch")
    if ends is not None and next(ends, None) is not None:
        raise ValueError(f"{op}: argument 'ends' has more masks than 'batches' ({n})")
    return parts


def _check_batch(op, xp, params, name, x):
    C.namespace(op, **{name: x, "W_enc": params.W_enc})
    C.floating(op, xp, name, x, ndim=2, shape=(None, params.d))
    C.same_dtype(op, **{name: x, "W_enc": params.W_enc})
    C.nonempty_batch(op, name, x)
    C.finite(op, xp, name, x)


def _check_mask(op, xp, name, mask, x):
    C.namespace(op, **{name: mask, "batch": x})
    if mask.dtype != xp.bool or tuple(mask.shape) != (x.shape[0],):
        raise ValueError(f"{op}: argument '{name}' must be a boolean array of shape ({x.shape[0]},) "
                         f"(one flag per row of its batch), got {mask.dtype} of shape {tuple(mask.shape)}")
    return mask


def _points(xp, params, config, parts, tokens, measure_eps, block) -> ZFPoints:
    host = {n: to_numpy(xp.concat([getattr(p, n) for p in parts])).astype(np.float64) for n in _STATS}
    if host["z_norm"].shape[0] == 0:
        raise ValueError("zf_points: argument 'ends' marks no row of any batch: no token to evaluate")
    eps = {}
    if measure_eps:
        q = quasi_orthogonality(params.W_dec, block=block)
        eps = {"eps_max_abs": float(q.max_abs), "eps_max_signed": float(q.max_signed),
               "eps_mean": float(q.mean)}
    return ZFPoints(**host, h=params.h, b_dec_norm=float(xp.linalg.vector_norm(params.b_dec)),
                    tokens=tokens, space="standardized" if config.standardize else "input", **eps)


def zf_points_saelens(directory, batches, *, ends=None, tokens: str | None = None,
                      measure_eps: bool = True, block: int = 2048) -> ZFPoints:
    """:func:`zf_points` for a SAELens directory, loaded onto the namespace, device and dtype
    of the first batch (:func:`sae_ref.io.saelens.load_saelens`; its layer-norm
    normalisation becomes ``standardize``)."""
    from sae_ref.io.saelens import load_saelens

    op = "zf_points_saelens"
    if is_array_api_obj(batches):
        batches = [batches]
    it = iter(batches)
    first = next(it, None)
    if first is None:
        raise ValueError(f"{op}: argument 'batches' holds no batch")
    if not is_array_api_obj(first):
        raise TypeError(f"{op}: argument 'batches[0]' must be an array, got {type(first).__name__}")
    xp = array_namespace(first)
    params, config, _ = load_saelens(directory, xp=xp, device=device_of(first), dtype=first.dtype)
    return zf_points(params, config, itertools.chain([first], it), ends=ends, tokens=tokens,
                     measure_eps=measure_eps, block=block)


def sequence_ends(lengths, *, xp=None, device=None):
    """A boolean mask [sum(lengths)] that is True on the last row of each sequence of packed
    rows with the given ``lengths`` (positive integers), for ``ends``.

    >>> sequence_ends([2, 3, 1]).tolist()
    [False, True, False, False, True, True]
    """
    op = "sequence_ends"
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Iterable):
        raise TypeError(f"{op}: argument 'lengths' must be a sequence of positive integers, got {type(lengths).__name__}")
    if is_array_api_obj(lengths):
        lengths = to_numpy(lengths).tolist()
    lengths = [C.integer_in(op, f"lengths[{i}]", n, 1, 2**62) for i, n in enumerate(lengths)]
    mask = np.zeros(sum(lengths), dtype=bool)
    mask[np.cumsum(lengths, dtype=np.int64) - 1] = True
    xp = array_namespace(np.zeros(1)) if xp is None else array_namespace(xp.zeros(1))
    return xp.asarray(mask, dtype=xp.bool, device=device)


# --- summaries -------------------------------------------------------------------------------------------
def zf_summary(points: ZFPoints, *, bands: Sequence[float] = BANDS,
               quantiles: Sequence[float] = QUANTILES) -> dict:
    r"""The distributions of :math:`\varepsilon_{LBO}` and NMSE, and where the tokens lie.

    Returns a JSON-ready dict: ``n_tokens``, ``tokens``, ``space``, ``h``, ``b_dec_norm``,
    ``eps`` (the decoder's quasi-orthogonality and ``eps_h1`` = :math:`\varepsilon(h-1)`),
    ``eps_lbo`` and ``nmse`` (``mean``, ``q05`` ... over the finite values, ``n_nonfinite``),
    ``l0_mean``, ``frac_under`` (:math:`\|\tilde f\| < \|z\|`, below :math:`y = x`),
    ``frac_over`` (above) and ``frac_outside[str(c)]``, the fraction of tokens outside the
    band :math:`\|z\|/\sqrt{1+c} \le \|\tilde f\| \le \|z\|/\sqrt{1-c}` (no upper line when
    :math:`c \ge 1`), and ``ratio``, the distribution of :math:`\|\tilde f\|/\|z\|` (tokens
    with :math:`z \ne 0`; below 1: under-activated).
    """
    op = "zf_summary"
    if not isinstance(points, ZFPoints):
        raise TypeError(f"{op}: argument 'points' must be ZFPoints, got {type(points).__name__}")
    bands = [C.positive_number(op, f"bands[{i}]", c) for i, c in enumerate(bands)]
    for i, q in enumerate(quantiles):
        if C.finite_number(op, f"quantiles[{i}]", q) < 0 or q > 1:
            raise ValueError(f"{op}: argument 'quantiles[{i}]' must be in [0, 1], got {q!r}")
    z, f = points.z_norm, points.f_norm
    return {
        "n_tokens": len(points), "tokens": points.tokens, "space": points.space, "h": points.h,
        "b_dec_norm": points.b_dec_norm,
        "eps": {"max_abs": points.eps_max_abs, "max_signed": points.eps_max_signed,
                "mean": points.eps_mean, "eps_h1": points.eps_max_abs * (points.h - 1)},
        "eps_lbo": _describe(points.eps_lbo, quantiles),
        "nmse": _describe(points.nmse, quantiles),
        "l0_mean": float(np.mean(points.l0)),
        "frac_under": float(np.mean(f < z)), "frac_over": float(np.mean(f > z)),
        "frac_outside": {str(c): float(np.mean(outside_band(z, f, c))) for c in bands},
        "ratio": _describe(np.divide(f, z, out=np.full_like(f, np.nan), where=z > 0), quantiles),
    }


def outside_band(z_norm, f_norm, c: float) -> np.ndarray:
    r"""Whether each point lies outside the band :math:`c`: :math:`\|\tilde f\| < \|z\|/\sqrt{1+c}`
    or (for :math:`c < 1`) :math:`\|\tilde f\| > \|z\|/\sqrt{1-c}` (host NumPy arrays)."""
    z = np.asarray(z_norm, dtype=np.float64)
    f = np.asarray(f_norm, dtype=np.float64)
    out = f < z / np.sqrt(1.0 + c)
    if c < 1:
        out |= f > z / np.sqrt(1.0 - c)
    return out


def _describe(v: np.ndarray, quantiles) -> dict:
    ok = v[np.isfinite(v)]
    out = {"mean": float(ok.mean()) if ok.size else float("nan"), "n_nonfinite": int(v.size - ok.size)}
    for q in quantiles:
        out[f"q{round(100 * q):02d}"] = float(np.quantile(ok, q)) if ok.size else float("nan")
    return out


# --- activations of a Hugging Face model, per text ------------------------------------------------------
def text_activations(model, tokenizer, texts: Sequence[str], *, layer: int, tokens: str = "all",
                     max_length: int = 128, batch_size: int = 32, xp=None, device=None, dtype=None):
    """Hidden states at hook point ``layer`` (as :mod:`sae_ref.downstream` counts them) of
    ``texts``, ``batch_size`` texts at a time: an iterator of arrays [n, d] for :func:`zf_points`.

    ``tokens="all"``: every real, non-special token of each text (padding and [CLS]/[SEP]
    left out; :func:`sae_ref.downstream.tokenize`); ``"last"``: the last of those per text,
    one row per text in order (a text truncated at ``max_length`` tokens ends there). ``xp``,
    ``device``, ``dtype``: where the rows go (default NumPy, float32); torch rows are moved
    with ``.to``, others copied through the host. Arguments are checked at once; the model
    runs as the iterator is consumed. A chunk with no real token yields nothing; in "last"
    mode a text without one raises ValueError naming it.
    """
    from sae_ref import downstream as D
    from sae_ref.data.stream import resolve_dtype

    op = "text_activations"
    C.choice(op, "tokens", tokens, TOKEN_MODES)
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"{op}: argument 'texts' must be a list of strings")
    if len(texts) == 0:
        raise ValueError(f"{op}: argument 'texts' is empty")
    max_length = C.integer_in(op, "max_length", max_length, 1, 2**31)
    batch_size = C.integer_in(op, "batch_size", batch_size, 1, 2**31)
    n = len(D.find_blocks(model, op=op))
    layer = C.integer_in(op, "layer", layer, 0, n, f" (the model has {n} blocks)")
    xp = array_namespace(np.zeros(1)) if xp is None else array_namespace(xp.zeros(1))
    dtype = resolve_dtype(op, xp, dtype)
    return _text_rows(D, model, tokenizer, list(texts), layer, tokens, max_length, batch_size, xp, device, dtype)


def _text_rows(D, model, tokenizer, texts, layer, tokens, max_length, batch_size, xp, device, dtype):
    for s in range(0, len(texts), batch_size):
        batch = D.tokenize(tokenizer, texts[s:s + batch_size], max_length=max_length)
        pos = batch["positions_mask"]
        if tokens == "last":
            pos = _last_position(pos, s)
            batch["positions_mask"] = pos
        if not bool(pos.any()):
            continue
        yield _to_namespace(D.activations(model, batch, layer=layer), xp, device, dtype)


def _last_position(pos, offset: int):
    """The mask [B, T] with only each row's last True kept."""
    import torch

    has = pos.any(dim=1)
    if not bool(has.all()):
        r = int(torch.nonzero(~has)[0, 0])
        raise ValueError(f"text_activations: argument 'texts[{offset + r}]' has no token other "
                         f"than special tokens (or is empty): it has no last token")
    T = pos.shape[1]
    last = T - 1 - torch.argmax(torch.flip(pos, dims=[1]).to(torch.int8), dim=1)
    return torch.arange(T, device=pos.device)[None, :] == last[:, None]


def _to_namespace(h, xp, device, dtype):
    if is_torch_namespace(xp):
        return h.to(device=h.device if device is None else device, dtype=dtype)
    return xp.asarray(h.detach().to(dtype=_torch_float64()).cpu().numpy(), dtype=dtype, device=device)


def _torch_float64():
    import torch

    return torch.float64


__all__ = [
    "BANDS",
    "QUANTILES",
    "TOKEN_MODES",
    "FTilde",
    "TokenStats",
    "ZFPoints",
    "f_tilde",
    "outside_band",
    "sequence_ends",
    "text_activations",
    "token_stats",
    "zf_points",
    "zf_points_saelens",
    "zf_summary",
]
