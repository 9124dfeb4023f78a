r"""Training as a pure function: ``step(state, batch) -> (state, metrics)``.

One step, for every architecture:

1. forward (standardise if configured, encode, select, decode from the sparse code);
2. the reconstruction loss and its gradient on :math:`\hat x` (``loss_unit``);
3. the sparsity term of the architecture (L1, sqrt-L1, JumpReLU L0; none for TopK/BatchTopK
   and top-AFA), its coefficient warmed up linearly over ``sparsity_warmup_steps``; the AFA
   loss :math:`\lambda_{afa}\,\mathrm{mean}_b (\|f_b\| - t_b)^2` on any architecture
   (``afa_coeff``; :mod:`sae_ref.afa`);
4. the dead-latent counters (tokens since each latent last fired, the current batch
   included) and AuxK over the dead latents;
5. the hand-written sparse backward (:func:`sae_ref.sae.backward`);
6. the decoder constraint (``decoder_order``: renormalise and project before the step, or
   project, step, renormalise), gradient clipping by global norm, Adam with warm-up and decay;
7. for BatchTopK, the inference threshold estimator (:mod:`sae_ref.theta`).

Every array of the state lives on the batch's backend and device. The metrics are 0-D arrays
left on the device: read them every N steps, not every step (each read is a host sync).
:func:`step` checks the batch for NaN/inf once (one host read) unless ``check=False``; the
training loop checks batches on the host before moving them and passes ``check=False``.

Presets (:data:`PRESETS`) reproduce named sources; :class:`TrainConfig`'s defaults are
sae-ref's own ("sae-ref"): the BatchTopK authors' recipe with a trained ``b_enc`` and the
running-mean :math:`\theta`.

>>> import numpy as np
>>> from sae_ref.train import TrainConfig, init_state, step
>>> cfg = TrainConfig(arch="batchtopk", h=32, k=2, k_aux=8)
>>> x = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
>>> state = init_state(cfg, x)
>>> state, metrics = step(state, x)
>>> state.t, float(metrics["l0"])
(1, 2.0)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from array_api_compat import array_namespace, device as device_of

from sae_ref import _checks as C
from sae_ref import afa as F
from sae_ref import dead_bound as DB
from sae_ref import graphs as G
from sae_ref import auxk as K
from sae_ref import decoder as D
from sae_ref import losses as L
from sae_ref import optim as O
from sae_ref import profile as P
from sae_ref import theta as T
from sae_ref.backends import PRECISIONS, get_backend, is_sync_free
from sae_ref.sae import (SAEConfig, SAEParams, _check_params, _decode_residual, _forward, _standardize, backward,
                         init_params)
from sae_ref.workspace import Workspace

#: The smallest JumpReLU threshold a linear (not log) parameterisation is clipped to.
THETA_MIN = 1e-6
ARCHS = ("batchtopk", "topk", "jumprelu", "relu-l1", "sqrt-l1", "top-afa")
_ACTIVATION = {"batchtopk": "batchtopk", "topk": "topk", "jumprelu": "jumprelu",
               "relu-l1": "relu", "sqrt-l1": "relu", "top-afa": "top_afa"}
#: The AFA loss target: ||x|| (the top-AFA authors' code) or ||x - b_dec|| (the norm top-AFA's
#: selection matches; the consistent choice), both in the loss space.
AFA_TARGETS = ("x", "x_minus_b_dec")


@dataclass(frozen=True)
class TrainConfig:
    """Every hyperparameter of a training run (JSON-serialisable; saved in checkpoints).

    Architecture: ``arch`` one of :data:`ARCHS`; ``h`` latents; ``k`` (TopK/BatchTopK).
    Loss: ``loss_unit`` "element" (mean over B d, the BatchTopK authors) or "sample" (sum over
    d, mean over B); ``standardize`` per-row standardisation of inputs; ``sparsity_coeff``
    :math:`\\lambda` of L1 / sqrt-L1 / L0 with a linear warm-up over ``sparsity_warmup_steps``;
    ``l1_decoder_norm`` weights L1 by the decoder row norms. JumpReLU: ``theta_init``,
    ``bandwidth``, ``log_theta`` (Adam on log theta, as the paper's code).
    AuxK: ``aux_convention`` "authors" | "normalized" | None (off), ``k_aux`` (None: d // 2),
    ``aux_coeff``, ``dead_after`` in ``dead_unit`` ("batches" or "tokens"), ``detach_residual``
    (None: the convention's default).
    Decoder: ``decoder_order`` "before" | "after" | "none". ``b_dec_init`` "zeros" | "mean" |
    "geometric_median" (of the first batch); ``freeze_b_enc``.
    Optimiser: Adam ``lr`` (None: :math:`2\\cdot10^{-4}/\\sqrt{h/2^{14}}`), ``betas``,
    ``adam_eps``, ``lr_warmup_steps``, ``lr_decay_steps`` (linear over the last steps of
    ``steps``; see :func:`sae_ref.optim.linear_warmup_decay`), ``max_grad_norm`` (None: no
    clipping), ``clip_first`` (clip the raw gradients before the decoder projection, as the
    BatchTopK authors; otherwise after it, as dictionary_learning).
    BatchTopK :math:`\\theta`: ``theta_estimator`` (see :mod:`sae_ref.theta`), ``theta_window``.
    AFA (:mod:`sae_ref.afa`): ``afa_coeff`` :math:`\\lambda_{afa}` of the AFA loss (0: off; any
    architecture), ``afa_target`` one of :data:`AFA_TARGETS`; top-AFA's ``afa_rule`` and
    ``afa_sentinel``.
    ``nonfinite``: "raise" or "skip" a batch with NaN/inf. ``seed`` of the initialisation.
    ``matmul_precision``: the encoder product's and AuxK's dense-block GEMMs', "highest",
    "tf32" or "bf16" (SAEConfig's ``precision``: TF32 units on a CUDA GPU; bfloat16 inputs
    with float32 sums, torch only); the rest of the step stays in the parameters' dtype.
    ``cuda_graphs``: replay the step's pass over the batch as a captured CUDA graph (torch on
    CUDA; None: whenever that is possible and bit-identical to the eager pass, checked at
    capture; False: never; :mod:`sae_ref.graphs`). A speed setting: resumes ignore it.
    """

    arch: str = "batchtopk"
    h: int = 16384
    k: int | None = 32
    steps: int = 10_000
    standardize: bool = True
    loss_unit: str = "element"
    sparsity_coeff: float = 0.0
    sparsity_warmup_steps: int = 0
    l1_decoder_norm: bool = False
    sqrt_eps: float = 1e-6
    theta_init: float = 0.001
    bandwidth: float = 0.001
    log_theta: bool = True
    aux_convention: str | None = "authors"
    k_aux: int | None = 512
    aux_coeff: float = 1 / 32
    dead_after: int = 5
    dead_unit: str = "batches"
    detach_residual: bool | None = None
    decoder_order: str = "before"
    b_dec_init: str = "zeros"
    freeze_b_enc: bool = False
    lr: float | None = 3e-4
    betas: tuple[float, float] = (0.9, 0.99)
    adam_eps: float = 1e-8
    lr_warmup_steps: int = 0
    lr_decay_steps: int = 0
    max_grad_norm: float | None = None
    clip_first: bool = False
    theta_estimator: str = "running_mean"
    theta_window: int = 1000
    afa_coeff: float = 0.0
    afa_target: str = "x_minus_b_dec"
    afa_rule: str = "nearest"
    afa_sentinel: bool = False
    nonfinite: str = "raise"
    seed: int = 0
    matmul_precision: str = "highest"
    cuda_graphs: bool | None = None
    preset: str = "sae-ref"

    def __post_init__(self):
        op = "TrainConfig"
        C.choice(op, "arch", self.arch, ARCHS)
        C.integer_in(op, "h", self.h, 1, 2**40)
        if self.arch in ("topk", "batchtopk"):
            C.integer_in(op, "k", self.k, 1, self.h, f" for arch {self.arch!r} (h = {self.h})")
        C.integer_in(op, "steps", self.steps, 1, 2**62)
        C.choice(op, "loss_unit", self.loss_unit, L.UNITS)
        C.choice(op, "aux_convention", self.aux_convention, (*K.CONVENTIONS, None))
        C.choice(op, "dead_unit", self.dead_unit, ("batches", "tokens"))
        C.choice(op, "decoder_order", self.decoder_order, (*D.ORDERS, "none"))
        C.choice(op, "b_dec_init", self.b_dec_init, ("zeros", "mean", "geometric_median"))
        C.choice(op, "theta_estimator", self.theta_estimator, T.KINDS)
        C.choice(op, "nonfinite", self.nonfinite, ("raise", "skip"))
        C.choice(op, "afa_target", self.afa_target, AFA_TARGETS)
        C.choice(op, "afa_rule", self.afa_rule, F.RULES)
        C.choice(op, "matmul_precision", self.matmul_precision, PRECISIONS)
        C.choice(op, "cuda_graphs", self.cuda_graphs, (None, True, False))
        if self.k_aux is not None:
            C.integer_in(op, "k_aux", self.k_aux, 1, 2**62)
        C.integer_in(op, "dead_after", self.dead_after, 1, 2**62)
        for name in ("sparsity_coeff", "aux_coeff", "afa_coeff"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{op}: argument '{name}' must be a finite number >= 0, got {getattr(self, name)!r}")
        if self.lr is not None:
            C.positive_number(op, "lr", self.lr)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"{op}: argument 'betas' must be two numbers in [0, 1), got {self.betas!r}")
        if self.max_grad_norm is not None:
            C.positive_number(op, "max_grad_norm", self.max_grad_norm)
        C.positive_number(op, "theta_init", self.theta_init)
        C.positive_number(op, "bandwidth", self.bandwidth)
        for name in ("sparsity_warmup_steps", "lr_warmup_steps", "lr_decay_steps"):
            C.integer_in(op, name, getattr(self, name), 0, 2**62)

    def sae_config(self) -> SAEConfig:
        """The :class:`~sae_ref.sae.SAEConfig` the forward pass uses."""
        return SAEConfig(_ACTIVATION[self.arch], k=self.k if self.arch in ("topk", "batchtopk") else None,
                         bandwidth=self.bandwidth, standardize=self.standardize,
                         afa_rule=self.afa_rule, afa_sentinel=self.afa_sentinel,
                         precision=self.matmul_precision)

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.h / 2**14)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"TrainConfig.from_dict: unknown keys {sorted(unknown)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


#: Named configurations reproducing a source's conventions; each is one name.
PRESETS: dict[str, dict[str, Any]] = {
    # sae-ref's default: the BatchTopK authors' recipe, b_enc trained, running-mean theta
    "sae-ref": {},
    # BatchTopK authors (Bussmann et al. 2024, their public code): b_enc exists but is never
    # read (frozen at zero), per-row standardisation, mean-over-elements loss, AuxK dead after
    # 5 batches, k_aux 512, 1/32, residual not detached, renormalise before the step, Adam 3e-4
    # (0.9, 0.99), no schedule, gradient clipping at 1e5 (their default max_grad_norm) applied
    # before the decoder projection
    "authors": dict(freeze_b_enc=True, max_grad_norm=100_000.0, clip_first=True,
                    detach_residual=False),
    # dictionary_learning's BatchTopK trainer: b_dec from the geometric median of the first
    # batch, sum-over-d loss, normalised AuxK (k_aux = d/2, detached residual) for latents dead
    # after 10M tokens, project -> clip at 1 -> Adam(0.9, 0.999) -> renormalise, lr
    # 2e-4/sqrt(h/2^14) with 1000 warm-up steps, theta: its moving average from step 1000
    "dictionary_learning": dict(
        standardize=False, loss_unit="sample", aux_convention="normalized", k_aux=None,
        dead_after=10_000_000, dead_unit="tokens", decoder_order="after",
        b_dec_init="geometric_median", lr=None, betas=(0.9, 0.999), lr_warmup_steps=1000,
        max_grad_norm=1.0, theta_estimator="dictionary_learning"),
    # OpenAI (Gao et al. 2024): as above for AuxK and the decoder, k_aux = 256, b_dec from the
    # first batch's geometric median, lr 2e-4/sqrt(h/2^14), Adam eps 6.25e-10, no theta of
    # their own (sae-ref's running mean)
    "openai": dict(
        standardize=False, loss_unit="sample", aux_convention="normalized", k_aux=256,
        dead_after=10_000_000, dead_unit="tokens", decoder_order="after", lr=None,
        b_dec_init="geometric_median", betas=(0.9, 0.999), adam_eps=6.25e-10, max_grad_norm=1.0),
    # SAELens' BatchTopK theta: the EMA from 0 (rate 0.01). The rest follows the
    # dictionary_learning conventions and is not checked against SAELens' own trainer.
    "saelens": dict(
        standardize=False, loss_unit="sample", aux_convention="normalized", k_aux=None,
        dead_after=10_000_000, dead_unit="tokens", decoder_order="after", betas=(0.9, 0.999),
        theta_estimator="saelens_ema"),
    # top-AFA authors (Lee et al. 2025, their public code, built on the BatchTopK authors'):
    # the "authors" recipe with the top-AFA activation (nearest prefix, their sentinel), AFA
    # loss against ||x|| of the standardised input. Their default afa_coeff is 0 and their
    # sweep {1/128, 1/64, 1/32, 1/24, 1/16}; the preset takes the middle, 1/32.
    "afa-authors": dict(arch="top-afa", freeze_b_enc=True, max_grad_norm=100_000.0,
                        clip_first=True, detach_residual=False, afa_coeff=1 / 32,
                        afa_target="x", afa_sentinel=True),
}


def preset(name: str, **overrides) -> TrainConfig:
    """The named preset's :class:`TrainConfig`, with ``overrides`` applied on top."""
    C.choice("preset", "name", name, tuple(PRESETS))
    return TrainConfig(**{**PRESETS[name], "preset": name, **overrides})


@dataclass(frozen=True)
class TrainState:
    """Everything a step reads and writes.

    config : TrainConfig (static)
    params : SAEParams (JumpReLU: ``theta`` is the threshold itself even with ``log_theta``)
    opt : Adam moments
    t : steps taken (host integer)
    since_fired : tokens since each latent last fired, int64 [h]
    theta : the BatchTopK inference-threshold estimator
    tokens : tokens trained on (host integer)
    skipped : batches skipped because they held NaN/inf (host integer)
    k_aux : the resolved AuxK k (``config.k_aux`` or d // 2)
    scratch : the :class:`~sae_ref.workspace.Workspace` of big temporaries the steps reuse
        (not state: never compared, printed or saved)
    dead_counts : on the GPU path, bounds on the coming steps' dead counts on their way to
        the host (:mod:`sae_ref.dead_bound`; not state either)
    graphs : the captured passes of the step (:mod:`sae_ref.graphs`; not state either)
    """

    config: TrainConfig
    params: SAEParams
    opt: O.AdamState
    t: int
    since_fired: Any
    theta: T.ThetaState
    tokens: int = 0
    skipped: int = 0
    k_aux: int = 1
    scratch: Workspace = field(default_factory=Workspace, compare=False, repr=False)
    dead_counts: tuple = field(default=(), compare=False, repr=False)
    graphs: G.StepGraphs = field(default_factory=G.StepGraphs, compare=False, repr=False)

    def __getstate__(self):  # the counts in flight read (they hold device events)
        return {**self.__dict__, "dead_counts": DB.settled(self.dead_counts)}


def geometric_median(x, *, iters: int = 100, tol: float = 1e-5):
    """The geometric median of the rows of ``x`` by Weiszfeld's iteration (fixed budget)."""
    xp = array_namespace(x)
    y = xp.mean(x, axis=0)
    for _ in range(iters):
        dist = xp.linalg.vector_norm(x - y, axis=1)
        w = 1.0 / xp.maximum(dist, xp.full_like(dist, 1e-12))
        y_new = xp.sum(w[:, None] * x, axis=0) / xp.sum(w)
        moved = float(xp.linalg.vector_norm(y_new - y))
        y = y_new
        if moved < tol * float(xp.linalg.vector_norm(y) + 1e-12):
            break
    return y


def init_state(config: TrainConfig, first_batch, *, stream: str = "host") -> TrainState:
    """A fresh state on ``first_batch``'s backend, device and dtype (the batch sets d and,
    for ``b_dec_init`` "mean"/"geometric_median", the decoder bias; no step is taken)."""
    xp = C.namespace("init_state", first_batch=first_batch)
    C.floating("init_state", xp, "first_batch", first_batch, ndim=2)
    C.nonempty_batch("init_state", "first_batch", first_batch)
    B, d = first_batch.shape
    dev, dtype = device_of(first_batch), first_batch.dtype
    try:
        get_backend(xp).check_precision(config.matmul_precision)
    except ValueError as e:
        raise ValueError(f"init_state: argument 'config.matmul_precision': {e}") from None
    theta = config.theta_init if config.arch == "jumprelu" else None
    params = init_params(d, config.h, xp=xp, dtype=dtype, device=dev, seed=config.seed,
                         theta=theta, stream=stream)
    if config.b_dec_init != "zeros":
        C.finite("init_state", xp, "first_batch", first_batch)
        x = first_batch
        if config.standardize:
            x, _ = _standardize(xp, x, 1e-5)
        b_dec = xp.mean(x, axis=0) if config.b_dec_init == "mean" else geometric_median(x)
        params = replace(params, b_dec=b_dec)
    est = T.theta_init(config.theta_estimator, xp=xp, dtype=dtype, device=dev, window=config.theta_window)
    k_aux = config.k_aux if config.k_aux is not None else max(d // 2, 1)
    since = xp.zeros((config.h,), dtype=xp.int64, device=dev)
    return TrainState(config, params, O.adam_init(params), 0, since, est, 0, 0, k_aux)


def _dead_after_tokens(config: TrainConfig, B: int) -> int:
    return config.dead_after * B if config.dead_unit == "batches" else config.dead_after


def _sparsity(xp, config, fwd, params, coeff, zero):
    """The architecture's sparsity term: (value, g_code, g_theta, g_W_dec), scaled by coeff
    (``zero``: a 0-D zero of the loss's dtype, the value where there is no term)."""
    a = config.arch
    if a in ("topk", "batchtopk", "top-afa"):
        return zero, None, None, None
    if a == "jumprelu":
        value, g_theta = L._jumprelu_l0(xp, fwd.pre, params.theta, fwd.bandwidth, fwd.window)
        return coeff * value, None, coeff * g_theta, None
    if fwd.code.nnz == 0:
        return zero, None, None, None
    if a == "sqrt-l1":
        value, g = L.sqrt_l1(fwd.code, eps=config.sqrt_eps)
        return coeff * value, coeff * g, None, None
    value, g, g_W = L.l1(fwd.code, params.W_dec if config.l1_decoder_norm else None)
    return coeff * value, coeff * g, None, None if g_W is None else coeff * g_W


def _afa(xp, config, fwd, params, g_code, zero):
    r"""The AFA loss term: (value, g_code with its gradient added, gradient on b_dec or None).

    With target :math:`t_b = \|x_b - b_{dec}\|`, :math:`\partial t_b / \partial b_{dec} =
    -(x_b - b_{dec}) / t_b` (0 where :math:`t_b = 0`); the target :math:`\|x_b\|` has no
    parameter in it. :math:`x` is the input in the loss space (standardised if configured).
    """
    if config.afa_coeff == 0:
        return zero, g_code, None
    c = config.afa_coeff
    centred = fwd.x - params.b_dec if config.afa_target == "x_minus_b_dec" else fwd.x
    target = xp.linalg.vector_norm(centred, axis=1)
    value, g_values, g_target = F._afa_loss(xp, fwd.code, target)
    g_values = c * g_values
    g_code = g_values if g_code is None else g_code + g_values
    g_b_dec = None
    if config.afa_target == "x_minus_b_dec":
        safe = xp.where(target > 0, target, xp.ones_like(target))
        w = xp.where(target > 0, c * g_target / safe, xp.zeros_like(target))
        g_b_dec = -xp.sum(w[:, None] * centred, axis=0)
    return c * value, g_code, g_b_dec


def _is_finite(xp, x) -> bool:
    return bool(xp.all(xp.isfinite(x)))


def step(state: TrainState, batch, *, check: bool = True, donate: bool = False,
         comm=None) -> tuple[TrainState, dict]:
    """One training step on ``batch`` [B, d]; returns the new state and the step's metrics.

    Metrics (0-D arrays on the device unless noted): ``loss`` (the total), ``mse`` (in
    ``loss_unit``), ``nmse`` (pooled, about zero), ``sparsity``, ``aux``, ``l0`` (mean kept
    per sample), ``dead_fraction``, ``grad_norm``, ``theta`` (BatchTopK: the current
    estimate), and the host numbers ``lr``, ``step``, ``tokens``, ``skipped``.

    With ``check=True`` a batch containing NaN/inf raises ValueError (``nonfinite="raise"``)
    or is skipped and counted (``"skip"``); the training loop checks on the host instead and
    passes ``check=False`` so the hot path reads nothing back.

    ``donate=True`` hands ``state`` over to the step: its arrays may be updated in place (no
    allocation of new parameters and moments), so ``state`` must not be used afterwards; the
    training loop donates. The result is the same either way.

    ``comm`` (a :class:`sae_ref.dist.Comm` of more than one rank): data-parallel training.
    ``batch`` is this rank's rows of the global batch (the ranks' batches concatenated in rank
    order); BatchTopK's cut is found over the global batch
    (:func:`sae_ref.dist.batch_topk_sharded`), the gradients (weighted by each rank's share of
    the rows), the latents' firing counts, the theta statistic and the metrics are all-reduced,
    so every rank takes the same step as one process on the global batch
    (:mod:`sae_ref.dist.data_parallel`).
    """
    config, params = state.config, state.params
    with C.no_checks():
        xp = _check_params("step", params, None)
    C.namespace("step", batch=batch, W_enc=params.W_enc)
    C.floating("step", xp, "batch", batch, ndim=2, shape=(None, params.d))
    C.same_dtype("step", batch=batch, W_enc=params.W_enc)
    C.nonempty_batch("step", "batch", batch)
    if check and not _is_finite(xp, batch):
        if config.nonfinite == "raise":
            raise ValueError(f"step: argument 'batch' contains NaN or inf (step {state.t + 1}); "
                             "set nonfinite='skip' to skip such batches and count them")
        return replace(state, skipped=state.skipped + 1), {"skipped": state.skipped + 1, "step": state.t}
    if comm is not None and comm.size > 1:
        from sae_ref.dist.data_parallel import Reducer

        dp = Reducer(comm, state.config, batch)
    else:
        dp = None
    be = get_backend(xp)
    cap, counts = None, ()
    B = batch.shape[0]
    if dp is None and is_sync_free(batch) and _aux_on(config, B):
        # AuxK's block is as wide as a bound on the dead count known without waiting
        bound, counts = DB.read(be, state.dead_counts, state.since_fired, state.t + 1, B,
                                _dead_after_tokens(config, B))
        cap = DB.capacity(bound, config.h)
    graphed = (dp is None and donate and is_sync_free(batch) and not P.measuring()
               and G.wanted(config.cuda_graphs, be, batch))
    with state.scratch.claim() as ws, be.scope():
        if graphed:
            new, metrics = _graphed_step(xp, be, state, batch, cap)
        else:
            new, metrics = _step(xp, state, batch, donate, dp, ws, cap)
    if cap is not None:
        issued = DB.issue(be, new.since_fired, new.t, B, _dead_after_tokens(config, B))
        new = replace(new, dead_counts=tuple(c for c in counts if c.through > new.t) + (issued,))
    elif new.dead_counts:  # a step that issued none (another mode or batch size): start afresh
        new = replace(new, dead_counts=())
    return new, metrics


def _aux_on(config: TrainConfig, B: int) -> bool:
    return config.aux_convention is not None and (config.aux_convention == "authors" or B >= 2)


def _step(xp, state: TrainState, x, donate: bool = False, dp=None, ws=None, aux_capacity=None):
    """One step; ``dp`` (a :class:`sae_ref.dist.data_parallel.Reducer`) makes it one rank's
    part of a data-parallel step: every batch-wide quantity goes through it. ``ws``: the
    workspace the big temporaries go into (None: fresh arrays). ``aux_capacity``: the width
    of AuxK's block on the GPU path (at least the dead count; :mod:`sae_ref.dead_bound`)."""
    coeff = _sparsity_coeff(state.config, state.t + 1)
    out = _grads(xp, state.config, state.params, state.since_fired, state.k_aux, x, coeff,
                 dp, ws, aux_capacity)
    return _finish(xp, state, out, x.shape[0] if dp is None else dp.B, donate, dp)


def _graphed_step(xp, be, state: TrainState, x, aux_capacity):
    """:func:`_step` (donated) with the pass over the batch through ``state.graphs``: the
    pass's inputs are the parameters, the counters and the batch; the counters and the
    metrics' parts are copied out of the graph's arrays (the next replay overwrites them),
    the gradients are used at once by the update."""
    config = state.config
    coeff = _sparsity_coeff(config, state.t + 1)
    names = list(state.params.arrays())
    k_aux = state.k_aux

    def pass_(*arrays):
        params = SAEParams(**dict(zip(names, arrays[:len(names)])))
        since, batch = arrays[len(names):]
        return _grads(xp, config, params, since, k_aux, batch, coeff, aux_capacity=aux_capacity).arrays()

    key = (config, k_aux, tuple(x.shape), str(x.dtype), aux_capacity, coeff)
    # the parameters stay where they are (Adam updates them in place); the counters and the
    # batch are copied into the graph's own arrays
    arrays = state.graphs.run(be, key, pass_, [*state.params.arrays().values(), state.since_fired, x],
                              keep=len(names))
    n = len(names)
    arrays = arrays[:n] + [xp.asarray(a, copy=True) for a in arrays[n:]]
    return _finish(xp, state, _Pass.from_arrays(names, arrays), x.shape[0], True)


def _sparsity_coeff(config: TrainConfig, t: int) -> float:
    return O.linear_warmup_decay(t, base=config.sparsity_coeff, warmup=config.sparsity_warmup_steps)


@dataclass(frozen=True)
class _Pass:
    """What a step's pass over the batch gives the update: the gradients, the new dead-latent
    counters, and the metrics' 0-D parts (``m_t``: BatchTopK's smallest kept value)."""

    grads: SAEParams
    since: Any
    dead_fraction: Any
    mse: Any
    nmse: Any
    sparsity: Any
    aux: Any
    afa: Any
    l0: Any
    m_t: Any = None

    def arrays(self) -> list:
        """Every array, in a fixed order (a captured graph's outputs)."""
        out = list(self.grads.arrays().values()) + [self.since, self.dead_fraction, self.mse, self.nmse,
                                                      self.sparsity, self.aux, self.afa, self.l0]
        return out if self.m_t is None else out + [self.m_t]

    @staticmethod
    def from_arrays(names: list, arrays: list) -> _Pass:
        """The pass from :meth:`arrays`' list (``names``: the gradients' parameters)."""
        grads = SAEParams(**dict(zip(names, arrays[:len(names)])))
        rest = arrays[len(names):]
        return _Pass(grads, *rest[:8], rest[8] if len(rest) > 8 else None)


def _grads(xp, config: TrainConfig, params: SAEParams, since_fired, k_aux: int, x, coeff: float,
           dp=None, ws=None, aux_capacity=None) -> _Pass:
    """The step's pass over the batch ``x``: forward, losses, dead-latent counters, AuxK and
    backward. It reads the parameters, the counters and host values that are fixed for a run
    (``config``, ``k_aux``, the batch size) or given (``coeff``, ``aux_capacity``), never the
    step number: on a GPU it is what a captured graph replays."""
    B = x.shape[0] if dp is None else dp.B
    fwd = _forward(xp, params, x, config.sae_config(), None if dp is None else dp.select, ws, exact=False,
                   decode=dp is not None)
    if dp is None:  # decoded with the loss: the residual x_hat - x, the gradient, the sum of squares
        n = L._mse_count(fwd.x, config.loss_unit)
        residual, g_xhat, ss, xx = _decode_residual(xp, params, fwd.code, fwd.x, 2.0 / n, ws)
        P.mark("decode", residual)
        mse = ss / n
    else:
        mse, g_xhat = L._mse(xp, fwd.x_hat, fwd.x, config.loss_unit)
    zero = xp.zeros((), dtype=x.dtype, device=device_of(x))  # the terms that are absent (one fill)
    sparsity, g_code, g_theta, g_W_sp = _sparsity(xp, config, fwd, params, coeff, zero)
    afa_value, g_code, g_b_dec_afa = _afa(xp, config, fwd, params, g_code, zero)
    P.mark("loss", g_xhat)
    # dead-latent counters: tokens since each latent last fired, the current batch included
    # (and the dead fraction and the L0, for the metrics)
    if dp is None:
        since, dead, dead_fraction, l0 = get_backend(xp).dead_counters(
            fwd.code.cols, fwd.code.values, since_fired, B, _dead_after_tokens(config, B), x.dtype)
    else:
        fired = dp.sum(fwd.code.latent_counts()) > 0
        since = xp.where(fired, xp.zeros_like(since_fired), since_fired + B)
        dead = since >= _dead_after_tokens(config, B)
    aux_value = zero
    g_pre_extra, g_W_extra, g_W_aux = None, g_W_sp, None
    if _aux_on(config, B):
        # the gradients come scaled by the coefficient, the [B, d] reconstruction in the
        # workspace, and -g_ehat (the residual's gradient, "authors") is not formed
        c = config.aux_coeff
        if dp is None:  # x_hat - x from the decoding
            negated = True
        else:
            residual, negated = fwd.x - fwd.x_hat, False
        aux = K._auxk(xp, fwd.pre, dead, residual, params.W_dec, k_aux,
                      config.aux_convention, _detach(config), want_g_W_dec=False, allow_block=True,
                      scale=c, lazy_residual=True, ws=ws, negated_residual=negated,
                      precision=config.matmul_precision, capacity=aux_capacity)
        aux_value = c * aux.value
        # the residual x - x_hat depends on the SAE too; g_xhat is this step's own array
        if aux.g_residual is not None:
            g_xhat -= aux.g_residual
        elif aux.g_residual_is_neg_ehat:
            g_xhat += aux.g_ehat
        if aux.block is not None:  # few dead latents: dense blocks of their columns
            a, g_pre_extra = aux.block
            g_W_aux = (a, aux.g_ehat)
        elif aux.code.nnz:
            g_pre_extra = aux.code.with_values(aux.g_values)
            g_W_aux = (aux.code, aux.g_ehat)
    P.mark("auxk", g_xhat)
    grads = backward(params, fwd, g_xhat, g_code=g_code, g_theta=g_theta,
                     g_pre_extra=g_pre_extra, g_W_dec_extra=g_W_extra, g_W_dec_sparse=g_W_aux, ws=ws)
    if g_b_dec_afa is not None:
        grads = replace(grads, b_dec=grads.b_dec + g_b_dec_afa)
    if dp is not None:  # this rank's share of the global mean, summed over the ranks
        grads = dp.gradients(grads)
    P.mark("backward", grads.W_enc)
    m_t = None
    if config.arch == "batchtopk":
        m_t = T.batch_min_kept(fwd.code.values)
        m_t = m_t if dp is None else dp.min(m_t)
    # pooled NMSE from the decoding's sums of squares (no second pass over x_hat - x)
    nmse = ss / xx if dp is None else dp.nmse(fwd.x_hat, fwd.x)
    if dp is not None:  # every rank reports the global batch's values
        mse, sparsity, aux_value, afa_value = dp.means(mse, sparsity, aux_value, afa_value)
    if dp is not None:  # the code's nonzero entries per row and the dead fraction
        l0 = dp.sum(xp.sum(xp.astype(fwd.code.values != 0, fwd.code.values.dtype))) / B
        dead_fraction = xp.astype(xp.count_nonzero(dead), x.dtype) / config.h
    P.mark("metrics", dead_fraction)
    return _Pass(grads, since, dead_fraction, mse, nmse, sparsity, aux_value, afa_value, l0, m_t)


def _finish(xp, state: TrainState, out: _Pass, B: int, donate: bool = False, dp=None):
    """The update from a pass: the decoder constraint, clipping, Adam, the theta estimate,
    the new state and the metrics."""
    config = state.config
    t = state.t + 1
    params, opt, grad_norm = _update(xp, state, state.params, out.grads, t, donate)
    est, theta = state.theta, None
    if config.arch == "batchtopk":
        est, theta = T.theta_step(est, out.m_t, step=t)
    P.mark("theta", est.buf)
    new = replace(state, params=params, opt=opt, t=t, since_fired=out.since, theta=est,
                  tokens=state.tokens + B)
    # the terms the configuration has (an absent one is an exact zero: adding it changes no bit)
    present = (config.arch not in ("topk", "batchtopk", "top-afa"), _aux_on(config, B), config.afa_coeff != 0)
    loss = out.mse
    for term, on in zip((out.sparsity, out.aux, out.afa), present):
        loss = loss + term if on else loss
    metrics = {
        "loss": loss, "mse": out.mse, "nmse": out.nmse,
        "sparsity": out.sparsity, "aux": out.aux, "afa": out.afa, "l0": out.l0,
        "dead_fraction": out.dead_fraction,
        "grad_norm": grad_norm, "lr": _lr(config, t), "step": t, "tokens": new.tokens,
        "skipped": state.skipped,
    }
    if config.arch == "batchtopk":
        metrics["theta"] = theta
    P.mark("metrics", metrics["loss"])
    return new, metrics


def _detach(config: TrainConfig) -> bool:
    if config.detach_residual is not None:
        return config.detach_residual
    return config.aux_convention == "normalized"


def _lr(config: TrainConfig, t: int) -> float:
    return O.linear_warmup_decay(t - 1, base=config.learning_rate(), warmup=config.lr_warmup_steps,
                                 decay=config.lr_decay_steps, total=config.steps)


def _update(xp, state, params, grads, t, donate=False):
    """Decoder constraint, clipping and Adam, in the configured order.

    Unless the gradients are clipped after the projection (which needs the projected norm
    first), the decoder's constraint and its Adam step are one backend call
    (:meth:`~sae_ref.backends.StandardBackend.decoder_adam`; NumPy fuses it row by row)."""
    config = state.config
    order = config.decoder_order
    frozen = ("b_enc",) if config.freeze_b_enc else ()
    if frozen:  # a frozen parameter has no gradient (it counts in no norm)
        grads = replace(grads, b_enc=xp.zeros_like(grads.b_enc))
    log_theta = config.arch == "jumprelu" and config.log_theta
    # unclipped, Adam reads the gradients as they are: the norm's sums come from its passes
    sums = {} if config.max_grad_norm is None and not log_theta else None
    grad_norm = O.global_norm(grads) if sums is None else None
    if config.max_grad_norm is not None and config.clip_first:
        grads, grad_norm = O.clip_by_global_norm(grads, config.max_grad_norm)
    fused = order != "none" and (config.max_grad_norm is None or config.clip_first)
    if order == "before" and not fused:  # rows unit-norm, gradient projected, then the step
        W = D._unit(xp, params.W_dec)
        params = replace(params, W_dec=W)
        grads = replace(grads, W_dec=D._project_unit(xp, W, grads.W_dec))
    elif order == "after" and not fused:
        grads = replace(grads, W_dec=D._project(xp, params.W_dec, grads.W_dec))
    P.mark("clip + decoder constraint", grads.W_dec)
    if log_theta:  # Adam on log(theta): d/dlog(theta) = theta * d/dtheta
        grads = replace(grads, theta=grads.theta * params.theta)
        params = replace(params, theta=xp.log(params.theta))
    if config.max_grad_norm is not None and not config.clip_first:
        grads, grad_norm = O.clip_by_global_norm(grads, config.max_grad_norm)
    lr = _lr(config, t)
    b1, b2 = config.betas
    opt = state.opt
    if fused:
        be = get_backend(xp)
        W, m, v, *ss = (be.decoder_adam if sums is None else be.decoder_adam_sums)(
            params.W_dec, grads.W_dec, opt.m.W_dec, opt.v.W_dec, lr=lr, b1=b1, b2=b2,
            eps=config.adam_eps, t=t, order=order, inplace=donate)
        if sums is not None:
            sums["W_dec"] = ss[0]
    params, opt = O.adam_update(params, grads, opt, lr=lr, t=t, betas=config.betas,
                                eps=config.adam_eps, frozen=frozen + (("W_dec",) if fused else ()),
                                inplace=donate, sums=sums)
    if sums is not None:  # global_norm's terms, in its order (a frozen gradient's zero left out)
        grad_norm = xp.sqrt(xp.sum(xp.concat([sums[name] for name in grads.arrays() if name in sums])))
    if fused:
        params = replace(params, W_dec=W)
        opt = O.AdamState(replace(opt.m, W_dec=m), replace(opt.v, W_dec=v))
    P.mark("adam", params.W_enc)
    if log_theta:
        params = replace(params, theta=xp.exp(params.theta))
    elif params.theta is not None:  # a linear threshold is kept positive (JumpReLU needs it)
        params = replace(params, theta=xp.maximum(params.theta, xp.full_like(params.theta, THETA_MIN)))
    if order == "after" and not fused:
        params = replace(params, W_dec=D._unit(xp, params.W_dec))
    P.mark("clip + decoder constraint", params.W_dec)
    return params, opt, grad_norm


# --- state <-> files --------------------------------------------------------------------------
def state_arrays(state: TrainState) -> tuple[dict, dict]:
    """The state as named NumPy arrays plus a JSON-serialisable dict (for checkpoints)."""
    import numpy as np

    from sae_ref.arrays import to_numpy

    arrays = {}
    for prefix, group in (("params", state.params), ("adam.m", state.opt.m), ("adam.v", state.opt.v)):
        for name, a in group.arrays().items():
            arrays[f"{prefix}.{name}"] = np.ascontiguousarray(to_numpy(a))
    arrays["since_fired"] = to_numpy(state.since_fired)
    arrays["theta.buf"] = to_numpy(state.theta.buf)
    est = state.theta
    meta = {"config": state.config.to_dict(), "t": state.t, "tokens": state.tokens,
            "skipped": state.skipped, "k_aux": state.k_aux,
            "theta": {"kind": est.kind, "window": est.window, "n": est.n, "rate": est.rate,
                      "start": est.start},
            "dead_counts": [[c.t, c.through, c.B, c.handle] for c in DB.settled(state.dead_counts)]}
    return arrays, meta


def state_from_arrays(arrays: dict, meta: dict, *, xp, device=None) -> TrainState:
    """Rebuild a :class:`TrainState` from :func:`state_arrays`' output on ``xp``/``device``."""
    xp = array_namespace(xp.zeros(1))

    def put(a):
        return xp.asarray(a, device=device) if device is not None else xp.asarray(a)

    be = get_backend(xp)

    def group(prefix):
        names = [f.name for f in fields(SAEParams)]
        got = {n: put(arrays[f"{prefix}.{n}"]) for n in names if f"{prefix}.{n}" in arrays}
        got["W_enc"] = be.latent_major(got["W_enc"])  # the layout init_params gives
        return SAEParams(**got)

    th = meta["theta"]
    est = T.ThetaState(th["kind"], th["window"], th["n"], put(arrays["theta.buf"]), th["rate"], th["start"])
    counts = tuple(DB.Count(*c) for c in meta.get("dead_counts", ()))  # older checkpoints: none
    return TrainState(TrainConfig.from_dict(meta["config"]), group("params"),
                      O.AdamState(group("adam.m"), group("adam.v")), meta["t"],
                      put(arrays["since_fired"]), est, meta["tokens"], meta["skipped"], meta["k_aux"],
                      dead_counts=counts)


def inference_config(state: TrainState) -> SAEConfig:
    """The SAE's inference configuration: BatchTopK becomes threshold inference with the
    estimated :math:`\\theta`; other architectures encode as they trained."""
    config = state.config
    if config.arch != "batchtopk":
        return config.sae_config()
    theta = float(T.theta_value(state.theta))
    if not math.isfinite(theta):
        raise ValueError("inference_config: the theta estimate is not finite (no positive "
                         "activation seen in the estimator's window)")
    return SAEConfig("threshold", theta=theta, standardize=config.standardize)
