r"""The sparse autoencoder: parameters, initialisation, encode, decode, forward and backward.

The model, in two equations (rows of ``x`` are samples):

.. math::
    z = (x - b_{dec})\, W_{enc} + b_{enc}, \qquad f = \sigma(z), \qquad
    \hat x = f\, W_{dec} + b_{dec},

with :math:`\sigma` one of the activations of :mod:`sae_ref.activations`.

Shapes: ``W_enc`` [d, h], ``b_enc`` [h], ``W_dec`` [h, d] (rows are the dictionary atoms),
``b_dec`` [d], ``theta`` [h] (JumpReLU only). ``x`` [B, d].

:func:`forward` returns what :func:`backward` needs; :func:`backward` maps gradients on
:math:`\hat x` (and optionally on the code values and on :math:`\theta`, e.g. from sparsity
penalties, and on extra pre-activation places, e.g. from AuxK) to gradients on every
parameter. Only kept latents carry gradient, so apart from the encoder GEMM
(O(B h d), forward only) all work is O(nnz d) or one pass over the B x h pre-activations.

>>> import numpy as np
>>> from sae_ref.sae import SAEConfig, init_params, forward
>>> params = init_params(8, 32, xp=np, seed=0)
>>> fwd = forward(params, np.ones((4, 8), dtype=np.float32), SAEConfig("batchtopk", k=2))
>>> fwd.x_hat.shape, fwd.code.nnz <= 4 * 2
((4, 8), True)
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device as device_of

from sae_ref import _checks as C
from sae_ref import activations as A
from sae_ref import profile as P
from sae_ref.backends import PRECISIONS, get_backend, group_size, is_sync_free, uniform
from sae_ref.sparse import ColumnBlock, SparseCode, values_at

ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu", "threshold", "top_afa")


@dataclass(frozen=True)
class SAEParams:
    """The parameters: a plain container of arrays of one namespace, device and dtype.

    Gradients are returned in the same container (``theta`` None when absent).
    """

    W_enc: Any  # [d, h]
    b_enc: Any  # [h]
    W_dec: Any  # [h, d]
    b_dec: Any  # [d]
    theta: Any = None  # [h], JumpReLU threshold

    @property
    def d(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def h(self) -> int:
        return int(self.W_enc.shape[1])

    def arrays(self) -> dict[str, Any]:
        """The parameters by name, absent ones left out."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def map(self, fn, *others: SAEParams) -> SAEParams:
        """``fn`` applied to each parameter (and the same-named ones of ``others``)."""
        out = {}
        for name, a in self.arrays().items():
            out[name] = fn(a, *(getattr(o, name) for o in others))
        return replace(self, **out)


@dataclass(frozen=True)
class SAEConfig:
    """Which activation the SAE uses and its hyperparameters.

    activation : "relu" | "topk" | "batchtopk" | "jumprelu" | "threshold" | "top_afa"
    k : target active latents per sample (topk, batchtopk)
    theta : the global inference threshold (threshold); JumpReLU's per-latent threshold is
        the parameter ``SAEParams.theta``
    bandwidth : JumpReLU kernel bandwidth :math:`\\varepsilon` (gradient only)
    standardize : centre each input row and divide by its std (BatchTopK authors); losses
        live in that space, :func:`reconstruct` maps outputs back
    afa_rule, afa_sentinel : top-AFA only (:func:`sae_ref.afa.top_afa`): "nearest" prefix
        norm (the authors) or "first_exceeding"; the authors' sentinel on the last prefix
    precision : the encoder product's precision, "highest" (the dtype's own), "tf32"
        (TensorFloat-32 units on a CUDA GPU; the float32 product elsewhere) or "bf16" (inputs
        rounded to bfloat16, float32 sums and pre-activations; torch only); see
        :meth:`sae_ref.backends.StandardBackend.matmul_at`
    """

    activation: str = "batchtopk"
    k: int | None = None
    theta: float | None = None
    bandwidth: float = 0.001
    standardize: bool = False
    afa_rule: str = "nearest"
    afa_sentinel: bool = False
    precision: str = "highest"

    def __post_init__(self):
        from sae_ref.afa import RULES

        C.choice("SAEConfig", "activation", self.activation, ACTIVATIONS)
        C.choice("SAEConfig", "precision", self.precision, PRECISIONS)
        C.choice("SAEConfig", "afa_rule", self.afa_rule, RULES)
        if self.activation in ("topk", "batchtopk"):
            C.integer_in("SAEConfig", "k", self.k, 1, 2**62, f" for activation {self.activation!r}")
        if self.activation == "threshold" and self.theta is None:
            raise ValueError("SAEConfig: argument 'theta' is required for activation 'threshold'")
        if self.theta is not None:
            C.finite_number("SAEConfig", "theta", self.theta)
        C.positive_number("SAEConfig", "bandwidth", self.bandwidth)


# --- initialisation ---------------------------------------------------------------------------
def init_params(d: int, h: int, *, xp=np, dtype=None, device=None, seed: int = 0,
                theta: float | None = None, stream: str = "host") -> SAEParams:
    r"""The BatchTopK authors' initialisation.

    :math:`W_{enc} \sim U(-\sqrt{6/h}, \sqrt{6/h})` (PyTorch's Kaiming-uniform rule on a
    (d, h) tensor: fan-in h, gain :math:`\sqrt2`), :math:`W_{dec} = W_{enc}^\top` with unit
    rows, :math:`b_{enc} = 0`, :math:`b_{dec} = 0`; ``theta`` (if given, for JumpReLU) fills
    :math:`\theta`.

    ``xp`` is the array library (``numpy``, ``torch``, ``cupy``, ``array_api_strict`` or
    their compat namespaces). ``dtype`` defaults to float32. With the default
    ``stream="host"`` the numbers are drawn by NumPy from ``seed`` and moved to ``device``, so
    every backend starts from the identical SAE.
    """
    d = C.integer_in("init_params", "d", d, 1, 2**40)
    h = C.integer_in("init_params", "h", h, 1, 2**40)
    xp = array_namespace(xp.zeros(1))
    dtype = xp.float32 if dtype is None else dtype
    if device is None:
        device = device_of(xp.zeros(1))
    bound = (6.0 / h) ** 0.5
    W_enc = uniform(xp, seed, (d, h), low=-bound, high=bound, dtype=dtype, device=device, stream=stream)
    W_dec = W_enc.T
    be = get_backend(xp)
    W_dec = be.contiguous(W_dec / xp.linalg.vector_norm(W_dec, axis=1, keepdims=True))
    W_enc = be.latent_major(W_enc)  # the layout of its gradient (see StandardBackend.latent_major)
    th = None if theta is None else xp.full((h,), theta, dtype=dtype, device=device)
    return SAEParams(
        W_enc, xp.zeros((h,), dtype=dtype, device=device), W_dec,
        xp.zeros((d,), dtype=dtype, device=device), th,
    )


# --- input standardisation -------------------------------------------------------------------
@dataclass(frozen=True)
class Standardization:
    """Per-row statistics: ``x_std = (x - mean) / scale``; both of shape [B, 1]."""

    mean: Any
    scale: Any


def standardize(x, *, eps: float = 1e-5):
    r"""Centre each row over its d features and divide by its unbiased std plus ``eps``.

    .. math:: x' = \frac{x - \mu}{s + \epsilon}, \quad \mu = \tfrac1d \sum_i x_i, \quad
              s = \sqrt{\tfrac{1}{d-1} \sum_i (x_i - \mu)^2}

    Returns ``(x_std, Standardization)``; :func:`unstandardize` inverts it. Requires d >= 2.
    """
    xp = C.namespace("standardize", x=x)
    C.floating("standardize", xp, "x", x, ndim=2)
    C.nonempty_batch("standardize", "x", x)
    C.finite("standardize", xp, "x", x)
    if x.shape[1] < 2:
        raise ValueError(f"standardize: argument 'x' needs at least 2 features, got shape {tuple(x.shape)}")
    return _standardize(xp, x, eps)


def _standardize(xp, x, eps):
    s, mean, scale, _ = get_backend(xp).standardize(x, None, eps)
    return s, Standardization(mean, scale)


def unstandardize(y, stats: Standardization):
    """Map ``y`` from the standardised space back: ``y * scale + mean``."""
    return y * stats.scale + stats.mean


# --- encode / decode / forward ----------------------------------------------------------------
@dataclass(frozen=True)
class Forward:
    """What the forward pass computed and the backward pass needs.

    x : the input in the loss space (standardised if the config says so) [B, d]
    pre : pre-activations z [B, h]
    code : the kept activations f (SparseCode)
    x_hat : the reconstruction in the loss space [B, d]
    stats : Standardization or None
    window : JumpReLU only, the kernel's support (SparseCode)
    bandwidth : JumpReLU only, the kernel bandwidth the window was built with
    x_c : x - b_dec, the encoder's input [B, d] (None: the backward pass forms it)
    """

    x: Any
    pre: Any
    code: SparseCode
    x_hat: Any
    stats: Standardization | None = None
    window: SparseCode | None = None
    bandwidth: float | None = None
    x_c: Any = None

    def output(self):
        """The reconstruction in the input's own space."""
        return self.x_hat if self.stats is None else unstandardize(self.x_hat, self.stats)


def _check_params(op, params: SAEParams, x=None, config: SAEConfig | None = None):
    if not isinstance(params, SAEParams):
        raise TypeError(f"{op}: argument 'params' must be SAEParams, got {type(params).__name__}")
    xp = C.namespace(op, x=x, **params.arrays())
    C.floating(op, xp, "W_enc", params.W_enc, ndim=2)
    d, h = params.W_enc.shape
    C.floating(op, xp, "b_enc", params.b_enc, shape=(h,))
    C.floating(op, xp, "W_dec", params.W_dec, shape=(h, d))
    C.floating(op, xp, "b_dec", params.b_dec, shape=(d,))
    if params.theta is not None:
        C.floating(op, xp, "theta", params.theta, shape=(h,))
        C.finite(op, xp, "theta", params.theta)
    C.same_dtype(op, x=x, **params.arrays())
    if x is not None:
        C.floating(op, xp, "x", x, ndim=2, shape=(None, d))
        C.nonempty_batch(op, "x", x)
        C.finite(op, xp, "x", x)
    if config is not None:
        if not isinstance(config, SAEConfig):
            raise TypeError(f"{op}: argument 'config' must be SAEConfig, got {type(config).__name__}")
        if config.k is not None and config.activation in ("topk", "batchtopk"):
            C.integer_in(op, "config.k", config.k, 1, h, f" (h = {h})")
        if config.activation == "jumprelu":
            if params.theta is None:
                raise ValueError(f"{op}: activation 'jumprelu' needs params.theta (shape [{h}])")
            if not bool(xp.all(params.theta > 0)):
                raise ValueError(f"{op}: argument 'theta' must be positive for every latent")
    return xp


def _select(xp, pre, config: SAEConfig, params: SAEParams, x, maxima=None) -> SparseCode:
    """The kept activations of ``pre``; ``x`` (top-AFA's target) is the input in the loss
    space; ``maxima``: the group maxima of ``pre`` for the (Batch)TopK bracket, when
    :func:`_pre` computed them (:func:`_group`)."""
    a = config.activation
    theta = params.theta
    if a == "top_afa":  # target ||x - b_dec||, scores scaled by the decoder row norms
        from sae_ref.afa import _top_afa

        target = xp.linalg.vector_norm(x - params.b_dec, axis=1)
        scale = xp.linalg.vector_norm(params.W_dec, axis=1)
        return _top_afa(xp, pre, scale, target, config.afa_rule, config.afa_sentinel)
    if a == "batchtopk":
        return A._batch_topk(pre, config.k, maxima=maxima)
    if a == "topk":
        return A._topk(pre, config.k, maxima=maxima)
    if a == "relu":
        return SparseCode.from_mask(pre, pre > 0)
    if a == "jumprelu":
        return SparseCode.from_mask(pre, pre > theta)
    return A._above(pre, config.theta)


def _group(config: SAEConfig, x, h: int) -> int:
    """The column group of the selection's bracket (``backends.group_size``) for the batch
    ``x``: 1 when the activation is not a (Batch)TopK, the batch is too small for groups, or
    the selection is the sync-free one (which needs no bracket)."""
    B = x.shape[0]
    if is_sync_free(x):
        return 1
    if config.activation == "batchtopk":
        return group_size((B, h), B * config.k)
    if config.activation == "topk":
        return group_size((B, h), config.k, axis=-1)
    return 1


def matmul_at(be, a, b, precision: str, out=None):
    """``a @ b`` by the backend ``be`` at ``precision`` (the dtype's own for "highest")."""
    if precision == "highest":
        return be.matmul(a, b, out=out)
    return be.matmul_at(a, b, precision, out=out)


def _pre(xp, params, x, ws=None, g: int = 1, precision: str = "highest", x_c=None):
    """``(z, maxima)``: z = (x - b_dec) W_enc + b_enc, into the workspace's [B, h] buffer when
    given, and with ``g > 1`` its column-group maxima for the selection's bracket, taken in
    the pass that adds the bias (None otherwise). ``precision``: the product's
    (:class:`SAEConfig`); ``x_c``: ``x - b_dec`` when the caller has formed it."""
    be = get_backend(xp)
    x_c = x - params.b_dec if x_c is None else x_c
    buf = None if ws is None else ws.array("pre", xp, (x.shape[0], params.h), x.dtype, device_of(x))
    if g > 1:
        pre = matmul_at(be, x_c, params.W_enc, precision, out=buf)
        return be.add_and_group_max(pre, params.b_enc, g)
    # the bias in place, or in the product's own kernel: no second [B, h] array
    return be.matmul_add(x_c, params.W_enc, params.b_enc, precision, out=buf), None


def encode(params: SAEParams, x, config: SAEConfig) -> SparseCode:
    """The sparse code f of ``x`` (standardised first if the config says so)."""
    xp = _check_params("encode", params, x, config)
    if config.standardize:
        x, _ = _standardize(xp, x, 1e-5)
    pre, maxima = _pre(xp, params, x, g=_group(config, x, params.h), precision=config.precision)
    return _select(xp, pre, config, params, x, maxima).exact()


def decode(params: SAEParams, code: SparseCode):
    r""":math:`\hat x = f W_{dec} + b_{dec}`, in O(nnz d) from the sparse code."""
    xp = _check_params("decode", params)
    if not isinstance(code, SparseCode):
        raise TypeError(f"decode: argument 'code' must be a SparseCode, got {type(code).__name__}")
    if code.shape[1] != params.h:
        raise ValueError(f"decode: argument 'code' has {code.shape[1]} latents, params have h = {params.h}")
    C.namespace("decode", values=code.values, W_dec=params.W_dec)
    return _decode(xp, params, code)


def _x_hat_buffer(xp, params, B: int, ws):
    """The workspace's [B, d] reconstruction buffer, or None without a workspace."""
    return None if ws is None else ws.array("x_hat", xp, (B, params.d), params.W_dec.dtype, device_of(params.W_dec))


def _decode(xp, params, code, ws=None):
    be = get_backend(xp)
    B = code.shape[0]
    buf = _x_hat_buffer(xp, params, B, ws)
    x_hat = be.spmm(code.rows, code.cols, code.values, params.W_dec, B, out=buf)
    x_hat += params.b_dec  # a new array or the workspace's: ours to write
    return x_hat


def _decode_residual(xp, params, code, x, scale: float, ws=None):
    """``(r, scale * r, sum of r^2, sum of x^2)`` for the residual ``r = x_hat - x`` of the code's
    decoding (:meth:`~sae_ref.backends.StandardBackend.decode_residual`: on a GPU one pass
    over the rows); ``r`` in the workspace's reconstruction buffer when given. The code's
    rows ascend, as in every code :func:`_select` makes."""
    buf = _x_hat_buffer(xp, params, code.shape[0], ws)
    return get_backend(xp).decode_residual(code.rows, code.cols, code.values, params.W_dec, params.b_dec, x, scale,
                                           out=buf)


def forward(params: SAEParams, x, config: SAEConfig) -> Forward:
    """Encode and decode ``x``, keeping what :func:`backward` needs."""
    xp = _check_params("forward", params, x, config)
    return _forward(xp, params, x, config)


def _forward(xp, params: SAEParams, x, config: SAEConfig, select=None, ws=None,
             exact: bool = True, decode: bool = True) -> Forward:
    """:func:`forward` without the argument checks (training loops check once). ``select``,
    if given, replaces the selection (``select(pre) -> SparseCode``: data-parallel BatchTopK
    finds its cut across ranks); ``ws`` (a :class:`~sae_ref.workspace.Workspace`) holds the
    pre-activations, which then live only until the workspace's next use. ``exact=False``
    (the training step) keeps a padded code as it is (no host read); otherwise the code is
    the exact one (:meth:`SparseCode.exact`). ``decode=False``: no decoding (``x_hat`` is
    None; the training step decodes with its loss, :func:`_decode_residual`)."""
    stats = None
    if config.standardize:  # with x - b_dec, kept for the backward pass (not formed twice)
        x, mean, scale, x_c = get_backend(xp).standardize(x, params.b_dec, 1e-5)
        stats = Standardization(mean, scale)
    else:
        x_c = x - params.b_dec
    P.mark("standardize", x)
    g = _group(config, x, params.h) if select is None else 1
    pre, maxima = _pre(xp, params, x, ws, g, config.precision, x_c=x_c)
    P.mark("encoder gemm", pre)
    code = _select(xp, pre, config, params, x, maxima) if select is None else select(pre)
    if exact:
        code = code.exact()
    window = bandwidth = None
    if config.activation == "jumprelu":
        bandwidth = config.bandwidth
        window = A._window(xp, pre, params.theta, bandwidth)
    P.mark("select", code.values)
    x_hat = None
    if decode:
        x_hat = _decode(xp, params, code, ws)
        P.mark("decode", x_hat)
    return Forward(x, pre, code, x_hat, stats, window, bandwidth, x_c)


def reconstruct(params: SAEParams, x, config: SAEConfig):
    """The SAE's output for ``x`` in ``x``'s own space."""
    return forward(params, x, config).output()


# --- backward ---------------------------------------------------------------------------------
def backward(params: SAEParams, fwd: Forward, g_xhat, *, g_code=None, g_theta=None,
             g_pre_extra: SparseCode | None = None, g_W_dec_extra=None, g_W_dec_sparse=None,
             ws=None) -> SAEParams:
    r"""Gradients of a loss on every parameter, given its gradient on :math:`\hat x`.

    Parameters
    ----------
    g_xhat : [B, d], :math:`\partial L / \partial \hat x`
    g_code : [nnz], optional extra :math:`\partial L / \partial f` at the code's places
        (sparsity penalties)
    g_theta : [h], optional extra gradient on :math:`\theta` (the JumpReLU L0 penalty)
    g_pre_extra : SparseCode or ColumnBlock, optional extra gradient on :math:`z` at other
        places (AuxK)
    g_W_dec_extra : [h, d], optional extra gradient on :math:`W_{dec}`
    g_W_dec_sparse : (SparseCode or ColumnBlock, [B, d] array), optional: an extra gradient
        on :math:`W_{dec}` given as the product ``code^T G`` (AuxK's), added without an [h, d]
        temporary
    ws : Workspace, optional: the [h, d] gradients are written into its buffers (they are
        valid until the workspace's next use)

    The chain, with :math:`x_c = x - b_{dec}` and :math:`G = \partial L/\partial \hat x`:

    .. math::
        \frac{\partial L}{\partial f_{bj}} = G_b \cdot W^{dec}_j \text{ (kept places only)},
        \quad \frac{\partial L}{\partial W^{dec}} = f^\top G, \quad
        \frac{\partial L}{\partial z} = \frac{\partial L}{\partial f} \odot \mathbb{1}_{kept},

    .. math::
        \frac{\partial L}{\partial W^{enc}} = x_c^\top \frac{\partial L}{\partial z}, \quad
        \frac{\partial L}{\partial b^{enc}} = \textstyle\sum_b \frac{\partial L}{\partial z_b},
        \quad \frac{\partial L}{\partial b^{dec}} = \textstyle\sum_b G_b
        - W^{enc} \frac{\partial L}{\partial b^{enc}}.

    Every product is sparse: :math:`f^\top G` and :math:`x_c^\top \partial_z L` touch only the
    nnz kept places (``spmm``), :math:`\partial_f L` is sampled at them (``sddmm``).
    """
    xp = _check_params("backward", params)
    B, h = fwd.code.shape
    C.namespace("backward", g_xhat=g_xhat, W_dec=params.W_dec, g_code=g_code,
                g_theta=g_theta, g_W_dec_extra=g_W_dec_extra)
    C.floating("backward", xp, "g_xhat", g_xhat, shape=(B, params.d))
    C.same_dtype("backward", g_xhat=g_xhat, W_dec=params.W_dec, g_code=g_code, g_theta=g_theta,
                 g_W_dec_extra=g_W_dec_extra)
    if g_pre_extra is not None:
        C.same_dtype("backward", g_pre_extra=g_pre_extra.values, W_dec=params.W_dec)
    if g_W_dec_sparse is not None:
        C.floating("backward", xp, "g_W_dec_sparse", g_W_dec_sparse[1],
                   shape=(g_W_dec_sparse[0].shape[0], params.d))
        C.same_dtype("backward", g_W_dec_sparse=g_W_dec_sparse[0].values, W_dec=params.W_dec)
    be = get_backend(xp)
    code = fwd.code
    if g_code is not None:
        C.floating("backward", xp, "g_code", g_code, shape=(code.nnz,))
    dev = device_of(g_xhat)

    def buf(name):
        return None if ws is None else ws.array(name, xp, (h, params.d), g_xhat.dtype, dev)

    # decoder (x_hat = f W_dec + b_dec): g_f = G W_dec^T at the kept places, g_W_dec = f^T G;
    # activation: pass-through at the kept places (JumpReLU: H(z - theta) = 1 there), so
    # g_z = g_f there; encoder (z = x_c W_enc + b_enc): g_W_enc^T = g_z^T x_c
    x_c = fwd.x - params.b_dec if fwd.x_c is None else fwd.x_c
    # a padded code's entries of value 0 are listed but not kept: no gradient there
    # (the gradient on z is g_f at the kept places, A.pass_through_backward: the encoder
    # bias's gradient is its column sums)
    g_f, g_W_dec, g_W_enc, g_b_enc = be.backward_products(
        code.rows, code.cols, code.values, g_xhat, params.W_dec, x_c, g_code, padded=code.padded,
        with_sums=True, out_W=buf("g_W_dec"), out_X=buf("g_W_enc"))
    if g_W_dec_extra is not None:
        g_W_dec += g_W_dec_extra  # a new array or the workspace's: ours to write
    if g_W_dec_sparse is not None:
        extra, G = g_W_dec_sparse
        g_W_dec = _add_transposed_product(xp, be, extra, G, g_W_dec)
    if g_pre_extra is not None:  # its own product: its entries may fill a dense block (AuxK)
        g_W_enc = _add_transposed_product(xp, be, g_pre_extra, x_c, g_W_enc)
        g_b_enc = _add_column_sums(xp, be, g_pre_extra, g_b_enc)
    g_W_enc = g_W_enc.T
    g_b_dec = xp.sum(g_xhat, axis=0) - params.W_enc @ g_b_enc
    g_th = None
    if params.theta is not None:
        g_th = _theta_grad(xp, be, params, fwd, g_xhat, g_code)
        if g_theta is not None:
            g_th = g_th + g_theta
    return SAEParams(g_W_enc, g_b_enc, g_W_dec, g_b_dec, g_th)


def _add_transposed_product(xp, be, M, dense, out):
    """``out + M^T dense`` for a (B, h) ``M`` given as a SparseCode or a ColumnBlock, into
    ``out`` ([h, d]) where the backend can."""
    h = out.shape[0]
    if isinstance(M, ColumnBlock):  # a GEMM on the block, its rows added at the columns
        prod = matmul_at(be, xp.matrix_transpose(M.values), dense, M.precision)
        if M.every:  # every column, in order
            out += prod
            return out
        return be.add_rows_at(out, M.cols, prod)
    return be.spmm(M.cols, M.rows, M.values, dense, h, out=out, accumulate=True)


def _add_column_sums(xp, be, M, out):
    """``out`` ([h]) plus each column's sum of a (B, h) SparseCode or ColumnBlock (a block's
    sums added at its columns alone, as its rows are in :func:`_add_transposed_product`)."""
    if isinstance(M, ColumnBlock):
        sums = xp.sum(M.values, axis=0) if M.sums is None else M.sums
        if M.every:
            return out + sums
        h, n = out.shape[0], sums.shape[0]
        return xp.reshape(be.add_rows_at(xp.reshape(out, (h, 1)), M.cols, xp.reshape(sums, (n, 1))), (h,))
    return out + be.segment_sum(M.cols, M.values, M.shape[1])


def _theta_grad(xp, be, params, fwd, g_xhat, g_code):
    """JumpReLU: the straight-through gradient on theta from the upstream gradient on f."""
    if fwd.window is None:
        return xp.zeros_like(params.theta)
    w = fwd.window
    g_w = be.sddmm(g_xhat, params.W_dec, w.rows, w.cols)
    if g_code is not None:
        g_w = g_w + values_at(fwd.code.with_values(g_code), w)
    return A.jumprelu_theta_backward(w, params.theta, fwd.bandwidth, g_w)
