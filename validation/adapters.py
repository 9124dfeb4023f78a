r"""Adapters: someone's torch SAE module, or torch functions, in the form the checks take.

:class:`TorchSAE` wraps an ``nn.Module`` whose parameters follow one of the common layouts

- SAELens style: ``W_enc`` [d, h], ``b_enc`` [h], ``W_dec`` [h, d], ``b_dec`` [d] and, for
  JumpReLU, ``threshold`` [h] (or ``log_threshold``); a SAELens ``cfg`` is read for the
  architecture, ``k``, ``apply_b_dec_to_input``, ``rescale_acts_by_decoder_norm`` and
  ``normalize_activations: "layer_norm"``;
- dictionary_learning style: ``encoder`` and ``decoder`` ``nn.Linear`` layers (weights
  [h, d] and [d, h]) with ``b_dec`` (or ``bias``) [d], and ``k`` / ``threshold`` buffers;

and gives :func:`~sae_ref.validation.checks_sae.check_sae` what it needs: sae-ref's
parameters and config for the same function (float64), the module's own ``encode``,
``decode`` and ``forward`` on NumPy inputs, its autograd gradients, and the map that carries
sae-ref's hand-written gradients back onto the module's own parameters (through the folds
of ``apply_b_dec_to_input: false`` and decoder-norm rescaling, by autograd of the fold).

By default the module is checked on a float64 copy (``dtype="float64"``), so a comparison
with sae-ref is not blurred by float32 rounding; ``dtype=None`` keeps the module's dtype.

:func:`torch_fn`, :func:`torch_vjp` and :func:`torch_step_vjp` turn torch functions (an
activation, an autograd function) into the NumPy-in, NumPy-out callables the activation
checks take. torch is imported only when one of these is used.

>>> import numpy as np
>>> from sae_ref.validation.adapters import detect_layout
>>> class Plain:
...     W_enc = b_enc = W_dec = b_dec = None
>>> detect_layout(Plain())
'saelens'
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from sae_ref.sae import ACTIVATIONS, SAEConfig, SAEParams
from sae_ref.validation.interface import as_numpy

LAYOUTS = ("saelens", "dictionary_learning")
_PLAIN = ("W_enc", "b_enc", "W_dec", "b_dec")


def detect_layout(module) -> str:
    """``"saelens"`` for ``W_enc``/``b_enc``/``W_dec``/``b_dec`` attributes,
    ``"dictionary_learning"`` for ``encoder``/``decoder`` layers; ValueError otherwise."""
    if all(hasattr(module, n) for n in _PLAIN):
        return "saelens"
    if hasattr(module, "encoder") and hasattr(module, "decoder"):
        return "dictionary_learning"
    raise ValueError(f"detect_layout: {type(module).__name__} has neither W_enc/b_enc/W_dec/b_dec nor "
                     "encoder/decoder layers; pass the parameter names explicitly (TorchSAE(names=...))")


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("the torch adapters need torch installed") from None
    return torch


def _get(module, path: str):
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class TorchSAE:
    """A torch SAE module seen through sae-ref's parameterisation (module docstring).

    Parameters
    ----------
    module : torch.nn.Module
    activation : one of :data:`sae_ref.sae.ACTIVATIONS`, optional
        Detected when left out: SAELens ``cfg.architecture()``, else a threshold attribute
        (per latent: jumprelu, one number: threshold), else ``k`` (BatchTopK when the class
        name says so, else TopK), else relu.
    k, theta, bandwidth : optional
        Override the detected ``k``, the global inference threshold (``activation="threshold"``)
        and the JumpReLU bandwidth (default: the module's ``bandwidth`` attribute).
    layout : {"saelens", "dictionary_learning"}, optional
    names : dict, optional
        Attribute paths for ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``, ``threshold`` (plain
        layout: ``W_enc`` [d, h]); overrides the layout.
    encode, decode, forward : callables, optional
        Replace ``module.encode`` / ``module.decode`` / ``module(x)`` (each takes and returns
        torch tensors).
    dtype : "float64" (default), "float32" or None
        The module is deep-copied and cast; None checks the module as it is.
    device : torch device, optional
    """

    def __init__(self, module, *, activation: str | None = None, k: int | None = None,
                 theta: float | None = None, bandwidth: float | None = None, layout: str | None = None,
                 names: dict | None = None, encode=None, decode=None, forward=None,
                 dtype: str | None = "float64", device=None):
        torch = _torch()
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"TorchSAE: argument 'module' must be a torch.nn.Module, got {type(module).__name__}")
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(f"TorchSAE: argument 'activation' must be one of {list(ACTIVATIONS)}, got {activation!r}")
        if dtype not in (None, "float32", "float64"):
            raise ValueError(f"TorchSAE: argument 'dtype' must be 'float32', 'float64' or None, got {dtype!r}")
        if dtype is not None:
            module = copy.deepcopy(module).to(getattr(torch, dtype))
        if device is not None:
            module = module.to(device)
        self.module = module.eval() if hasattr(module, "eval") else module
        self.name = type(module).__name__
        self.layout = layout or ("custom" if names else detect_layout(module))
        if self.layout not in LAYOUTS + ("custom",):
            raise ValueError(f"TorchSAE: argument 'layout' must be one of {list(LAYOUTS)}, got {layout!r}")
        self._paths = self._param_paths(names)
        cfg = getattr(module, "cfg", None)
        self._apply_b_dec = bool(getattr(cfg, "apply_b_dec_to_input", True))
        self._rescale = bool(getattr(cfg, "rescale_acts_by_decoder_norm", False))
        norm = getattr(cfg, "normalize_activations", "none") or "none"
        if norm not in ("none", "layer_norm", "expected_average_only_in"):
            raise NotImplementedError(f"TorchSAE: normalize_activations {norm!r} is not supported "
                                      "(supported: 'none', 'layer_norm', 'expected_average_only_in')")
        self._encode, self._decode, self._forward = encode, decode, forward
        self.config = self._config(activation, k, theta, bandwidth, norm == "layer_norm")

    # --- discovery ----------------------------------------------------------------------------
    def _param_paths(self, names) -> dict[str, str]:
        if names:
            paths = {**{n: n for n in _PLAIN}, **names}
        elif self.layout == "saelens":
            paths = {n: n for n in _PLAIN}
        else:
            b_dec = "b_dec" if hasattr(self.module, "b_dec") else "bias"
            paths = {"W_enc": "encoder.weight", "b_enc": "encoder.bias", "W_dec": "decoder.weight",
                     "b_dec": b_dec}
        for extra in ("threshold", "log_threshold"):
            if extra not in paths and hasattr(self.module, extra) and _get(self.module, extra) is not None:
                paths[extra] = extra
        for name, path in paths.items():
            try:
                _get(self.module, path)
            except AttributeError:
                raise ValueError(f"TorchSAE: {self.name} has no attribute {path!r} (for {name})") from None
        return paths

    def _raw(self) -> dict:
        return {path: _get(self.module, path) for path in self._paths.values()}

    def _theta_raw(self, raw):
        torch = _torch()
        if "threshold" in self._paths:
            return raw[self._paths["threshold"]]
        if "log_threshold" in self._paths:
            return torch.exp(raw[self._paths["log_threshold"]])
        return None

    def _config(self, activation, k, theta, bandwidth, standardize) -> SAEConfig:
        raw = self._raw()
        th = self._theta_raw(raw)
        th_np = None if th is None else np.asarray(as_numpy(th), dtype=np.float64)
        cfg = getattr(self.module, "cfg", None)
        arch = None
        if activation is None and cfg is not None and hasattr(cfg, "architecture"):
            arch = cfg.architecture() if callable(cfg.architecture) else cfg.architecture
            activation = {"standard": "relu", "topk": "topk", "batchtopk": "batchtopk", "jumprelu": "jumprelu"}.get(arch)
            if activation is None:
                raise NotImplementedError(f"TorchSAE: SAELens architecture {arch!r} is not supported")
        if activation is None:
            if th_np is not None:
                activation = "threshold" if th_np.ndim == 0 else "jumprelu"
            elif hasattr(self.module, "k"):
                activation = "batchtopk" if "batch" in self.name.lower() else "topk"
            else:
                activation = "relu"
        if activation == "jumprelu" and th_np is not None and not np.all(th_np > 0):
            if np.all(th_np == th_np.reshape(-1)[0]):  # one common threshold <= 0: the same function
                activation, theta = "threshold", float(th_np.reshape(-1)[0]) if theta is None else theta
            else:
                raise ValueError(f"TorchSAE: {self.name}'s threshold is <= 0 for some latents; sae-ref's "
                                 "JumpReLU needs positive thresholds")
        if activation == "threshold" and theta is None:
            if th_np is None:
                raise ValueError("TorchSAE: activation 'threshold' needs 'theta' (the module has no threshold)")
            theta = float(th_np.reshape(-1)[0])
        if activation in ("topk", "batchtopk") and k is None:
            k = getattr(cfg, "k", None) if cfg is not None else None
            k = getattr(self.module, "k", None) if k is None else k
            if k is None:
                raise ValueError(f"TorchSAE: activation {activation!r} needs 'k' (the module has none)")
            k = int(as_numpy(k)) if not isinstance(k, (int, float)) else int(k)
        if bandwidth is None:
            bandwidth = float(getattr(self.module, "bandwidth", 0.001))
        self._has_theta_param = activation == "jumprelu"
        return SAEConfig(activation, k=k if activation in ("topk", "batchtopk") else None,
                         theta=theta if activation == "threshold" else None, bandwidth=bandwidth,
                         standardize=standardize)

    # --- sae-ref's parameterisation -----------------------------------------------------------
    def _to_reference(self, raw: dict) -> dict:
        """sae-ref's parameters as differentiable torch functions of the module's tensors."""
        p = self._paths
        if self.layout == "dictionary_learning":
            W_enc, W_dec = raw[p["W_enc"]].T, raw[p["W_dec"]].T
        else:
            W_enc, W_dec = raw[p["W_enc"]], raw[p["W_dec"]]
        b_enc, b_dec = raw[p["b_enc"]], raw[p["b_dec"]]
        if not self._apply_b_dec:  # (x - b_dec) W_enc + b_enc' = x W_enc + b_enc
            b_enc = b_enc + b_dec @ W_enc
        if self._rescale:  # selection on z * |W_dec_j|, decoding (f / |W_dec_j|) W_dec
            n = W_dec.norm(dim=1)
            W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
        out = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
        if self._has_theta_param:
            out["theta"] = self._theta_raw(raw)
        return out

    def reference_params(self) -> SAEParams:
        """sae-ref's parameters for the module's function (float64 NumPy)."""
        torch = _torch()
        with torch.no_grad():
            ref = self._to_reference(self._raw())
        arrays = {n: np.asarray(as_numpy(t), dtype=np.float64) for n, t in ref.items()}
        return SAEParams(arrays["W_enc"], arrays["b_enc"], arrays["W_dec"], arrays["b_dec"], arrays.get("theta"))

    # --- the module's own computations --------------------------------------------------------
    def _dtype(self):
        return self._raw()[self._paths["W_enc"]].dtype

    def _device(self):
        return self._raw()[self._paths["W_enc"]].device

    def _tensor(self, a: np.ndarray):
        torch = _torch()
        return torch.as_tensor(np.array(a, dtype=np.float64), dtype=self._dtype(), device=self._device())

    @staticmethod
    def _first(out):
        return out[0] if isinstance(out, (tuple, list)) else out

    def _run_encode(self, x):
        return self._first(self._encode(x) if self._encode else self.module.encode(x))

    def _run_decode(self, f):
        return self._first(self._decode(f) if self._decode else self.module.decode(f))

    def _run_forward(self, x):
        return self._first(self._forward(x) if self._forward else self.module(x))

    def encode(self, x: np.ndarray) -> np.ndarray:
        torch = _torch()
        with torch.no_grad():
            return np.asarray(as_numpy(self._run_encode(self._tensor(x))), dtype=np.float64)

    def decode(self, f: np.ndarray) -> np.ndarray:
        torch = _torch()
        with torch.no_grad():
            return np.asarray(as_numpy(self._run_decode(self._tensor(f))), dtype=np.float64)

    def forward(self, x: np.ndarray) -> np.ndarray:
        torch = _torch()
        with torch.no_grad():
            return np.asarray(as_numpy(self._run_forward(self._tensor(x))), dtype=np.float64)

    def gradients(self, x: np.ndarray, g_xhat: np.ndarray) -> dict[str, np.ndarray]:
        """Autograd gradients of ``sum(g_xhat * forward(x))`` on the module's tensors (by
        attribute path; tensors the graph does not reach are left out)."""
        torch = _torch()
        raw = {k: t for k, t in self._raw().items() if getattr(t, "requires_grad", False)}
        with torch.enable_grad():
            out = self._run_forward(self._tensor(x))
            loss = (out * self._tensor(g_xhat)).sum()
            grads = torch.autograd.grad(loss, list(raw.values()), allow_unused=True)
        return {k: np.asarray(as_numpy(g), dtype=np.float64) for k, g in zip(raw, grads, strict=True) if g is not None}

    def pullback(self, ref_grads: SAEParams) -> dict[str, np.ndarray]:
        """sae-ref's gradients (on its parameterisation) carried onto the module's tensors."""
        torch = _torch()
        raw = {k: t.detach().clone().requires_grad_(True) for k, t in self._raw().items()}
        with torch.enable_grad():
            ref = self._to_reference(raw)
            names = [n for n in ref if getattr(ref_grads, n, None) is not None]
            outs = [ref[n] for n in names]
            gouts = [torch.as_tensor(np.asarray(getattr(ref_grads, n), dtype=np.float64), dtype=o.dtype,
                                     device=o.device) for n, o in zip(names, outs, strict=True)]
            grads = torch.autograd.grad(outs, list(raw.values()), grad_outputs=gouts, allow_unused=True)
        return {k: np.asarray(as_numpy(g), dtype=np.float64) for k, g in zip(raw, grads, strict=True) if g is not None}

    def __repr__(self) -> str:
        return f"TorchSAE({self.name}, layout={self.layout!r}, {self.config})"


# --- torch functions as NumPy callables -----------------------------------------------------
def _to_torch(a, dtype=None, device=None, grad=False):
    torch = _torch()
    t = torch.as_tensor(np.array(a), device=device)
    if dtype is not None:
        t = t.to(dtype)
    return t.requires_grad_(True) if grad else t


def torch_fn(fn, *, device=None):
    """``fn`` (torch tensors in and out) as a NumPy-in, NumPy-out callable; non-array
    arguments (k, theta) pass unchanged."""
    def wrapped(*args):
        torch = _torch()
        targs = [_to_torch(a, device=device) if isinstance(a, np.ndarray) else a for a in args]
        with torch.no_grad():
            return as_numpy(fn(*targs))
    return wrapped


def torch_vjp(forward, *, device=None):
    """The ``vjp(pre, param, bandwidth, g) -> (g_pre, g_param)`` form of a torch forward
    ``forward(pre, param, bandwidth) -> f`` by autograd (for :func:`check_jumprelu`)."""
    def vjp(pre, param, bandwidth, g):
        torch = _torch()
        z, p = _to_torch(pre, device=device, grad=True), _to_torch(param, device=device, grad=True)
        with torch.enable_grad():
            f = forward(z, p, bandwidth)
            g_z, g_p = torch.autograd.grad(f, (z, p), grad_outputs=_to_torch(g, f.dtype, f.device), allow_unused=True)
        return (as_numpy(torch.zeros_like(z) if g_z is None else g_z),
                as_numpy(torch.zeros_like(p) if g_p is None else g_p))
    return vjp


def torch_step_vjp(step, *, device=None):
    """The ``step_vjp(pre, param, bandwidth, g) -> g_param`` form of a torch L0 step
    ``step(pre, param, bandwidth) -> H`` by autograd (for :func:`check_jumprelu`)."""
    def step_vjp(pre, param, bandwidth, g):
        torch = _torch()
        z, p = _to_torch(pre, device=device), _to_torch(param, device=device, grad=True)
        with torch.enable_grad():
            H = step(z, p, bandwidth)
            (g_p,) = torch.autograd.grad(H, (p,), grad_outputs=_to_torch(g, H.dtype, H.device), allow_unused=True)
        return as_numpy(torch.zeros_like(p) if g_p is None else g_p)
    return step_vjp


def as_adapter(model: Any, **kwargs):
    """``model`` itself when it already has the adapter's methods, else :class:`TorchSAE`."""
    if all(hasattr(model, m) for m in ("reference_params", "encode", "decode", "forward", "config")):
        if kwargs:
            raise TypeError(f"as_adapter: {type(model).__name__} is already an adapter; options {sorted(kwargs)} "
                            "belong to TorchSAE")
        return model
    return TorchSAE(model, **kwargs)
