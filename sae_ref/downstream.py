r"""The downstream metric: splice a reconstruction into a transformer and measure the damage.

A replacement of the hidden states at one hook point of a Hugging Face ``transformers``
(torch) model is spliced into its forward pass, and the change in the model's output is
measured. The hook point ``layer`` is what ``output_hidden_states[layer]`` reports: ``0`` is
the input of the first block (the embeddings' output), ``l`` the output of block ``l - 1``,
and the last one, ``n_blocks``, the final hidden state (after the final norm on models that
have one, e.g. GPT-2's ``ln_f`` or Llama's ``norm``, as ``transformers`` reports it).

Two losses, one code path:

- ``kind="embedding"`` (encoder models without a language-model head, e.g. all-MiniLM-L6-v2):
  the sentence embedding is the final hidden state mean-pooled over the attention mask, and
  the loss of a sequence is :math:`1 - \cos(e_{clean}, e_{spliced})` (0 for the clean model).
  Sequences are averaged with equal weight.
- ``kind="ce"`` (causal language models): next-token cross-entropy of the spliced model over
  every target token whose position and predecessor are real (attention mask 1); the clean
  model's CE is the reference. Tokens are averaged with equal weight (a sequence weighs by its
  number of predicted tokens).

Which positions are replaced: a batch is a mapping, typically a tokenizer's output. Its
``positions_mask`` (bool [B, T]) when given; else ``attention_mask & ~special_tokens_mask``
when the tokenizer was asked for ``return_special_tokens_mask=True`` (so [CLS]/[SEP] keep
their clean values; :func:`tokenize` asks for it); else the attention mask. Padding is never
replaced.

:func:`loss_recovered` runs the clean model, zero ablation, mean ablation and the SAE splice
over the same batches and reports loss recovered as the BatchTopK authors log it,

.. math::
    \mathrm{recovered} = \frac{L_{abl} - L_{sae}}{L_{abl} - L_{clean}},

against zero ablation and against mean ablation (1 is the clean model, 0 the ablation;
1 - recovered is the "performance hit" of the frontier plots). :func:`sae_replace` turns SAE
parameters of any backend into the ``replace`` function.

``torch`` and ``transformers`` are imported when first needed (the ``data`` extra).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import device as device_of

from sae_ref import _checks as C
from sae_ref.sae import SAEConfig, SAEParams, reconstruct

KINDS = ("auto", "embedding", "ce")

#: Where the list of transformer blocks lives, tried in order on the model and on its
#: ``base_model``; then any one ``ModuleList`` of ``config.num_hidden_layers`` modules.
BLOCK_PATHS = (
    "encoder.layer",          # BERT, RoBERTa, MiniLM
    "transformer.h",          # GPT-2, GPT-J, Bloom
    "model.layers",           # Llama, Mistral, Qwen, Gemma
    "gpt_neox.layers",        # Pythia
    "model.decoder.layers",   # OPT
    "transformer.layer",      # DistilBERT
    "transformer.blocks",     # MPT
    "layers",
    "h",
)

#: Names of the final norm (a direct child of the base model) that ``transformers`` applies
#: before it reports the last hidden state.
FINAL_NORMS = ("ln_f", "norm", "final_layer_norm", "final_layernorm", "ln_final", "norm_f")


# --- the model's structure ---------------------------------------------------------------------
def _torch():
    import torch

    return torch


def _check_model(op: str, model):
    torch = _torch()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{op}: argument 'model' must be a torch.nn.Module (a transformers model), "
                        f"got {type(model).__name__}")


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_blocks(model, *, op: str = "find_blocks"):
    """The model's list of transformer blocks (a ``torch.nn.ModuleList``).

    Tries :data:`BLOCK_PATHS` on the model and on its ``base_model``, then the one
    ``ModuleList`` with ``config.num_hidden_layers`` entries. Raises ValueError naming
    ``model`` when none is found.
    """
    _check_model(op, model)
    torch = _torch()
    roots = [model]
    base = getattr(model, "base_model", None)
    if isinstance(base, torch.nn.Module) and base is not model:
        roots.append(base)
    for root in roots:
        for path in BLOCK_PATHS:
            blocks = _get(root, path)
            if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
                return blocks
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if isinstance(n, int) and n > 0:
        lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
        if len(lists) == 1:
            return lists[0]
    raise ValueError(
        f"{op}: argument 'model' ({type(model).__name__}): cannot find its list of transformer blocks "
        f"(tried {list(BLOCK_PATHS)} and a single ModuleList of config.num_hidden_layers modules)"
    )


def _final_norm(model):
    torch = _torch()
    if getattr(getattr(model, "config", None), "tie_last_hidden_states", True) is False:
        return None  # the model reports the last hidden state before its final norm
    base = getattr(model, "base_model", model)
    for name, child in base.named_children():
        if name in FINAL_NORMS and isinstance(child, torch.nn.Module):
            return child
    return None


def n_layers(model) -> int:
    """The number of blocks: valid hook points are ``0 .. n_layers(model)``."""
    return len(find_blocks(model))


def _resolve_kind(op: str, model, kind: str) -> str:
    C.choice(op, "kind", kind, KINDS)
    if kind != "auto":
        return kind
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        return "ce"
    get_out = getattr(model, "get_output_embeddings", None)
    if get_out is None or get_out() is None:
        return "embedding"
    raise ValueError(f"{op}: argument 'kind' is 'auto' but {type(model).__name__} is neither a causal "
                     f"language model nor a model without an output head; pass kind='ce' or 'embedding'")


# --- batches ------------------------------------------------------------------------------------
def tokenize(tokenizer, texts: list[str], *, max_length: int = 128) -> dict:
    """A batch for the functions here: padded, truncated, with the special-tokens mask.

    Returns a dict of torch tensors: ``input_ids``, ``attention_mask`` (and ``token_type_ids``
    when the tokenizer makes them) and ``positions_mask`` = real, non-special tokens.
    """
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt", return_special_tokens_mask=True)
    batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    batch["positions_mask"] = enc["attention_mask"].bool() & ~enc["special_tokens_mask"].bool()
    return batch


@dataclass(frozen=True)
class _Batch:
    inputs: dict          # what the model is called with
    attention: Any        # bool [B, T]
    positions: Any        # bool [B, T], the replaced positions


def _batch(op: str, model, batch) -> _Batch:
    torch = _torch()
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError(f"{op}: argument 'batch' must be a mapping with 'input_ids' (and "
                        f"'attention_mask'), e.g. a tokenizer's output; got {type(batch).__name__}")
    device = next(model.parameters()).device
    ids = torch.as_tensor(batch["input_ids"])
    if ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{op}: argument 'batch[\"input_ids\"]' must be an integer tensor [B, T], "
                         f"got {ids.dtype} of shape {tuple(ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{op}: argument 'batch[\"input_ids\"]' is empty (shape {tuple(ids.shape)})")

    def mask(name):
        m = torch.as_tensor(batch[name]).to(device)
        if tuple(m.shape) != tuple(ids.shape):
            raise ValueError(f"{op}: argument 'batch[\"{name}\"]' must have the shape of input_ids "
                             f"{tuple(ids.shape)}, got {tuple(m.shape)}")
        return m

    attn = mask("attention_mask") if batch.get("attention_mask") is not None else \
        torch.ones(ids.shape, dtype=torch.long, device=device)
    inputs = {"input_ids": ids.to(device), "attention_mask": attn.long()}
    if batch.get("token_type_ids") is not None:
        inputs["token_type_ids"] = mask("token_type_ids")
    a = attn.bool()
    if batch.get("positions_mask") is not None:
        pos = mask("positions_mask").bool() & a
    elif batch.get("special_tokens_mask") is not None:
        pos = a & ~mask("special_tokens_mask").bool()
    else:
        pos = a
    if not bool(a.sum(dim=1).gt(0).all()):
        raise ValueError(f"{op}: argument 'batch[\"attention_mask\"]' has a sequence with no real token")
    return _Batch(inputs, a, pos)


# --- the hook -----------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised inside a capturing hook: the rest of the forward pass is not needed."""


def _splicer(op: str, name: str, positions, replace):
    """``h [B, T, d] -> h`` with ``replace`` applied to the rows at ``positions``."""
    torch = _torch()

    def fn(h):
        if not isinstance(h, torch.Tensor) or h.ndim != 3 or tuple(h.shape[:2]) != tuple(positions.shape):
            raise RuntimeError(f"{op}: the hidden states at the hook point are not a [B, T, d] tensor "
                               f"matching the batch {tuple(positions.shape)}; got "
                               f"{getattr(h, 'shape', type(h).__name__)}")
        sel = h[positions]
        if sel.shape[0] == 0:  # nothing to replace in this batch
            return h
        new = replace(sel)
        if not isinstance(new, torch.Tensor) or tuple(new.shape) != tuple(sel.shape):
            raise ValueError(f"{op}: argument '{name}' must return a torch tensor of the shape of its "
                             f"input {tuple(sel.shape)}, got {getattr(new, 'shape', type(new).__name__)}")
        out = h.clone()
        out[positions] = new.to(device=h.device, dtype=h.dtype)
        return out

    return fn


def _install(model, layer: int, fn):
    """Register the hook that maps the hidden states at ``layer`` through ``fn``; its handle."""
    blocks = find_blocks(model)
    if layer == 0:
        def pre_hook(module, args, kwargs):
            if args:
                return (fn(args[0]),) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = fn(kwargs["hidden_states"])
            return args, kwargs

        return blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)

    norm = _final_norm(model) if layer == len(blocks) else None
    module = norm if norm is not None else blocks[layer - 1]

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (fn(output[0]),) + tuple(output[1:])
        return fn(output)

    return module.register_forward_hook(hook)


class _eval_mode:
    """Eval mode (no dropout) and no autograd inside; every module's flag restored after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        torch = _torch()
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        self.grad = torch.no_grad()
        self.grad.__enter__()

    def __exit__(self, *exc):
        self.grad.__exit__(*exc)
        for m, flag in self.flags:
            m.training = flag
        return False


def _run(model, b: _Batch, layer: int, fn, kind: str):
    """One forward pass with ``fn`` hooked at ``layer`` (None: clean). Returns the outputs that
    the loss needs: the pooled embeddings [B, d] (float64), or per-sequence CE sums and counts."""
    torch = _torch()
    handle = _install(model, layer, fn) if fn is not None else None
    try:
        if kind == "ce":
            out = model(**b.inputs, use_cache=False)
        else:
            need_hs = getattr(model, "get_output_embeddings", lambda: None)() is not None
            out = model(**b.inputs, output_hidden_states=need_hs)
    finally:
        if handle is not None:
            handle.remove()
    if kind == "ce":
        logits = out.logits[:, :-1].float()
        targets = b.inputs["input_ids"][:, 1:]
        valid = b.attention[:, 1:] & b.attention[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        ce = torch.where(valid, ce, torch.zeros_like(ce)).double()
        return ce.sum(dim=1), valid.sum(dim=1).double()
    last = getattr(out, "last_hidden_state", None)
    if last is None:
        last = out.hidden_states[-1]
    m = b.attention.unsqueeze(-1).double()
    return (last.double() * m).sum(dim=1) / m.sum(dim=1)


def _one_minus_cos(e0, e1):
    """1 - cos per row, exactly 0 for identical rows (sqrt(x*x) == x in binary floating point);
    1 when either embedding is zero."""
    torch = _torch()
    nn = (e0 * e0).sum(dim=1) * (e1 * e1).sum(dim=1)
    dot = (e0 * e1).sum(dim=1)
    cos = torch.where(nn > 0, dot / torch.sqrt(torch.where(nn > 0, nn, torch.ones_like(nn))),
                      torch.zeros_like(nn))
    return 1.0 - cos


@dataclass(frozen=True)
class SpliceLoss:
    """Losses of one batch.

    kind : "embedding" or "ce"
    per_sequence : float64 [B]; 1 - cos of the sentence embeddings, or the mean next-token CE
        of each sequence (NaN for a sequence with no predicted token)
    weights : float64 [B]; 1 per sequence (embedding), or the number of predicted tokens (ce)
    n_replaced : number of positions whose hidden states were replaced
    """

    kind: str
    per_sequence: np.ndarray
    weights: np.ndarray
    n_replaced: int

    @property
    def mean(self) -> float:
        """Average over sequences (embedding) or over predicted tokens (ce)."""
        w = self.weights
        v = np.where(w > 0, self.per_sequence, 0.0)
        return float((v * w).sum() / w.sum()) if w.sum() > 0 else float("nan")


def _common(op: str, model, layer, kind):
    blocks = find_blocks(model, op=op)
    layer = C.integer_in(op, "layer", layer, 0, len(blocks), f" (the model has {len(blocks)} blocks)")
    return layer, _resolve_kind(op, model, kind)


def _loss(kind, ref, spliced, b: _Batch) -> SpliceLoss:
    """From the outputs of :func:`_run` (clean ``ref``, and ``spliced``) to the losses."""
    n = int(b.positions.sum())
    if kind == "ce":
        s, cnt = spliced
        per = _np(s / cnt.clamp(min=1))
        cnt = _np(cnt)
        return SpliceLoss(kind, np.where(cnt > 0, per, np.nan), cnt, n)
    per = _np(_one_minus_cos(ref, spliced))
    return SpliceLoss(kind, per, np.ones_like(per), n)


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def splice_loss(model, batch: Mapping, *, layer: int,
                replace: Callable | None, kind: str = "auto") -> SpliceLoss:
    """The model's loss with ``replace`` spliced in at hook point ``layer``.

    ``replace(h)`` maps the hidden states of the replaced positions, a torch tensor [n, d], to
    their replacements (same shape; cast to the model's dtype and device). ``None`` is the
    clean model. ``batch`` is a mapping with ``input_ids`` [B, T] and ``attention_mask``
    (optional ``token_type_ids``, ``positions_mask``, ``special_tokens_mask``: see the module
    docstring). ``kind``: "embedding" (1 - cos of the mean-pooled final state against the clean
    model; two forward passes), "ce" (next-token cross-entropy; one pass) or "auto" (ce for a
    causal LM, embedding for a model without an output head).

    The hook is removed however the call ends; the model runs in eval mode without autograd
    and its modules' training flags are restored.
    """
    op = "splice_loss"
    layer, kind = _common(op, model, layer, kind)
    if replace is not None and not callable(replace):
        raise TypeError(f"{op}: argument 'replace' must be callable or None, got {type(replace).__name__}")
    b = _batch(op, model, batch)
    with _eval_mode(model):
        fn = None if replace is None else _splicer(op, "replace", b.positions, replace)
        if kind == "ce":
            return _loss(kind, None, _run(model, b, layer, fn, kind), b)
        ref = _run(model, b, layer, None, kind)
        spliced = ref if fn is None else _run(model, b, layer, fn, kind)
        return _loss(kind, ref, spliced, b)


def activations(model, batch: Mapping, *, layer: int):
    """The hidden states at hook point ``layer`` of the replaced positions, a tensor [n, d]
    (row order: ``h[positions_mask]``). The forward pass stops at the hook."""
    op = "activations"
    layer, _ = _common(op, model, layer, "embedding")
    b = _batch(op, model, batch)
    got = []

    def capture(sel):
        got.append(sel.detach().clone())
        raise _Stop

    with _eval_mode(model):
        try:
            _run(model, b, layer, _splicer(op, "capture", b.positions, capture), "embedding")
        except _Stop:
            pass
    if not got:
        raise RuntimeError(f"{op}: the hook at layer {layer} was not reached by the forward pass")
    return got[0]


# --- SAE splices ---------------------------------------------------------------------------------
def _library(a) -> str:
    from array_api_compat import is_cupy_array, is_numpy_array, is_torch_array

    if is_numpy_array(a):
        return "numpy"
    if is_torch_array(a):
        return "torch"
    if is_cupy_array(a):
        return "cupy"
    if type(a).__module__.startswith("array_api_strict"):
        return "strict"
    return type(a).__module__.split(".")[0]


class SAEReplace:
    """``replace`` function that runs an SAE on torch hidden states: see :func:`sae_replace`."""

    def __init__(self, params: SAEParams, config: SAEConfig, fn: Callable | None = None):
        op = "sae_replace"
        if fn is not None and not callable(fn):
            raise TypeError(f"{op}: argument 'fn' must be callable, got {type(fn).__name__}")
        self.fn = fn
        if not isinstance(params, SAEParams):
            raise TypeError(f"{op}: argument 'params' must be SAEParams, got {type(params).__name__}")
        if not isinstance(config, SAEConfig):
            raise TypeError(f"{op}: argument 'config' must be SAEConfig, got {type(config).__name__}")
        self.xp = C.namespace(op, **params.arrays())
        self.library = _library(params.W_enc)
        if self.library not in ("numpy", "torch", "cupy", "strict"):
            raise TypeError(f"{op}: argument 'params' holds {self.library} arrays; torch hidden states "
                            f"can be converted to numpy, torch, cupy or array-api-strict arrays only")
        self.params, self.config = params, config
        self.d = params.d
        self.device = device_of(params.W_enc)

    def _to_sae(self, h):
        torch = _torch()
        x = h.detach()
        p = self.params.W_enc
        if self.library == "torch":
            return x.to(device=p.device, dtype=p.dtype)
        if self.library == "cupy" and x.is_cuda:
            import cupy

            dt = torch.from_numpy(np.empty(0, dtype=np.dtype(p.dtype.name))).dtype
            with cupy.cuda.Device(p.device.id):
                return cupy.from_dlpack(x.to(dtype=dt).contiguous())
        host = _host_dtype(p.dtype)
        a = x.to(dtype=torch.from_numpy(np.empty(0, dtype=host)).dtype).cpu().numpy()
        if self.library == "numpy":
            return a
        return self.xp.asarray(a, device=self.device)

    def _from_sae(self, y, like):
        torch = _torch()
        if self.library == "torch":
            return y
        if self.library == "cupy" and like.is_cuda:
            return torch.from_dlpack(y)
        from sae_ref.arrays import to_numpy

        return torch.from_numpy(np.ascontiguousarray(to_numpy(y)))

    def __call__(self, h):
        if h.ndim != 2 or h.shape[1] != self.d:
            raise ValueError(f"sae_replace: the SAE's d = {self.d} (argument 'params') differs from the "
                             f"model's hidden size at the hook point (hidden states {tuple(h.shape)})")
        x = self._to_sae(h)
        y = reconstruct(self.params, x, self.config) if self.fn is None else self.fn(x)
        return self._from_sae(y, h).to(device=h.device, dtype=h.dtype)


def _host_dtype(dtype) -> np.dtype:
    name = getattr(dtype, "name", None) or str(dtype).split(".")[-1]
    return np.dtype(name)


def sae_replace(params: SAEParams, config: SAEConfig, *, fn: Callable | None = None) -> SAEReplace:
    """A ``replace`` function: torch hidden states [n, d] through the SAE and back.

    The hidden states are converted to the parameters' backend (NumPy: a host copy with
    ``.detach().cpu().numpy()``; torch: moved to the parameters' device and dtype; CuPy and
    array-api-strict likewise), reconstructed with :func:`sae_ref.sae.reconstruct` (which undoes
    the config's standardisation) and converted back to the model's dtype and device. The
    callable's ``d`` is checked against the model's hidden size by :func:`loss_recovered`.
    ``fn(x) -> x_hat`` replaces that reconstruction (e.g. a
    :class:`~sae_ref.pruning.PrunedSAE`), on the parameters' backend and device.
    """
    return SAEReplace(params, config, fn)


def _mean_tensor(op, mean_activation, d):
    torch = _torch()
    if hasattr(mean_activation, "__dlpack__") and not isinstance(mean_activation, torch.Tensor):
        from sae_ref.arrays import to_numpy

        mean_activation = to_numpy(mean_activation)
    try:
        m = torch.as_tensor(np.asarray(mean_activation) if not isinstance(mean_activation, torch.Tensor)
                            else mean_activation)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{op}: argument 'mean_activation' must be an array of shape ({d},), "
                        f"got {type(mean_activation).__name__}") from None
    if tuple(m.shape) != (d,) or not m.dtype.is_floating_point:
        raise ValueError(f"{op}: argument 'mean_activation' must be a floating array of shape ({d},) "
                         f"(the model's hidden size), got {m.dtype} of shape {tuple(m.shape)}")
    if not bool(torch.isfinite(m).all()):
        raise ValueError(f"{op}: argument 'mean_activation' contains NaN or infinity")
    return m


def mean_hidden_state(model, batches: Iterable[Mapping], *, layer: int):
    """The mean hidden state at ``layer`` over the replaced positions of ``batches`` (float64 [d])."""
    total, count = None, 0
    for batch in batches:
        h = activations(model, batch, layer=layer).double()
        s = h.sum(dim=0)
        total = s if total is None else total + s
        count += h.shape[0]
    if count == 0:
        raise ValueError("mean_hidden_state: argument 'batches' has no position to average over")
    return total / count


def _hidden_size(model) -> int | None:
    d = getattr(getattr(model, "config", None), "hidden_size", None)
    return int(d) if isinstance(d, int) else None


def loss_recovered(model, batches: Iterable[Mapping], *, layer: int, sae_fn: Callable,
                   kind: str = "auto", mean_activation=None) -> dict:
    """Clean, zero-ablation, mean-ablation and SAE losses at ``layer``, and loss recovered.

    ``batches``: mappings as for :func:`splice_loss` (read twice when the mean is computed).
    ``sae_fn(h) -> h_hat`` on torch hidden states [n, d], e.g. :func:`sae_replace`.
    ``mean_activation`` [d]: the mean-ablation vector; by default the mean hidden state at
    ``layer`` over the replaced positions of ``batches``.

    Losses are averaged over all sequences (embedding) or all predicted tokens (ce) of all
    batches; for "embedding" the clean loss is 0. Returns a dict: ``kind``, ``layer``,
    ``n_sequences``, ``n_replaced`` (positions per splice), ``n_predicted`` (ce: tokens),
    ``loss_clean``, ``loss_zero``, ``loss_mean``, ``loss_sae``, ``recovered_zero`` =
    (L_zero - L_sae) / (L_zero - L_clean) and ``recovered_mean`` likewise with mean ablation
    (NaN where the ablation does not change the loss).
    """
    return Baseline(model, batches, layer=layer, kind=kind,
                    mean_activation=mean_activation).recovered(sae_fn)


class Baseline:
    """The clean model's outputs and the ablation losses of ``batches``, computed once, so that
    :meth:`recovered` costs one spliced forward pass per batch for each SAE (what
    :func:`loss_recovered` computes; use this when evaluating many SAEs on the same batches).
    """

    def __init__(self, model, batches: Iterable[Mapping], *, layer: int, kind: str = "auto",
                 mean_activation=None):
        op = "loss_recovered"
        torch = _torch()
        self.layer, self.kind = _common(op, model, layer, kind)
        if isinstance(batches, Mapping):
            batches = [batches]
        self.model = model
        self.batches = [_batch(op, model, b) for b in batches]
        if not self.batches:
            raise ValueError(f"{op}: argument 'batches' is empty")
        d = _hidden_size(model)
        if d is None:
            d = int(activations(model, _raw(self.batches[0]), layer=layer).shape[1])
        self.d = d
        if mean_activation is None:
            mean = _mean_over(model, self.batches, self.layer)
        else:
            mean = _mean_tensor(op, mean_activation, d)

        def zero(h):
            return torch.zeros_like(h)

        def mean_fill(h):
            return mean.to(device=h.device, dtype=h.dtype).expand(h.shape)

        self.refs, acc = [], {"clean": [], "zero": [], "mean": []}
        with _eval_mode(model):
            for b in self.batches:
                ref = _run(model, b, self.layer, None, self.kind)
                self.refs.append(ref)
                acc["clean"].append(_loss(self.kind, ref, ref, b))
                for key, f in (("zero", zero), ("mean", mean_fill)):
                    out = _run(model, b, self.layer, _splicer(op, key, b.positions, f), self.kind)
                    acc[key].append(_loss(self.kind, ref, out, b))
        self.losses = {k: _pooled(v) for k, v in acc.items()}
        if self.kind == "embedding":
            self.losses["clean"] = 0.0
        self.n_predicted = (int(sum(s.weights.sum() for s in acc["clean"])) if self.kind == "ce" else None)

    def loss(self, sae_fn) -> float:
        """The pooled loss with ``sae_fn`` spliced in."""
        op = "loss_recovered"
        if not callable(sae_fn):
            raise TypeError(f"{op}: argument 'sae_fn' must be callable, got {type(sae_fn).__name__}")
        sae_d = getattr(sae_fn, "d", None)
        if sae_d is not None and sae_d != self.d:
            raise ValueError(f"{op}: argument 'sae_fn' is an SAE with d = {sae_d}, but the model's "
                             f"hidden size is {self.d}")
        out = []
        with _eval_mode(self.model):
            for b, ref in zip(self.batches, self.refs, strict=True):
                spliced = _run(self.model, b, self.layer, _splicer(op, "sae_fn", b.positions, sae_fn), self.kind)
                out.append(_loss(self.kind, ref, spliced, b))
        return _pooled(out)

    def recovered(self, sae_fn) -> dict:
        """The dict of :func:`loss_recovered` for ``sae_fn``."""
        L = {**self.losses, "sae": self.loss(sae_fn)}
        res = {"kind": self.kind, "layer": self.layer,
               "n_sequences": sum(int(b.attention.shape[0]) for b in self.batches),
               "n_replaced": sum(int(b.positions.sum()) for b in self.batches)}
        if self.kind == "ce":
            res["n_predicted"] = self.n_predicted
        for k in ("clean", "zero", "mean", "sae"):
            res[f"loss_{k}"] = L[k]
        for abl in ("zero", "mean"):
            den = L[abl] - L["clean"]
            res[f"recovered_{abl}"] = (L[abl] - L["sae"]) / den if den != 0 else float("nan")
        return res


def _raw(b: _Batch) -> dict:
    return {**b.inputs, "positions_mask": b.positions}


def _mean_over(model, batches: list[_Batch], layer: int):
    return mean_hidden_state(model, [_raw(b) for b in batches], layer=layer)


def _pooled(losses: list[SpliceLoss]) -> float:
    per = np.concatenate([s.per_sequence for s in losses])
    w = np.concatenate([s.weights for s in losses])
    v = np.where(w > 0, per, 0.0)
    return float((v * w).sum() / w.sum()) if w.sum() > 0 else float("nan")


__all__ = [
    "BLOCK_PATHS",
    "FINAL_NORMS",
    "KINDS",
    "Baseline",
    "SAEReplace",
    "SpliceLoss",
    "activations",
    "find_blocks",
    "loss_recovered",
    "mean_hidden_state",
    "n_layers",
    "sae_replace",
    "splice_loss",
    "tokenize",
]

