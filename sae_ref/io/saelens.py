"""The SAELens on-disk format, read and written without importing sae-lens.

A SAELens SAE is a directory with two files:

- ``sae_weights.safetensors``: ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in],
  ``b_enc`` [d_sae], ``b_dec`` [d_in] and, for JumpReLU, ``threshold`` [d_sae]; no metadata;
- ``cfg.json``: ``d_in``, ``d_sae``, ``dtype``, ``device``, ``apply_b_dec_to_input``,
  ``normalize_activations``, ``reshape_activations``, ``architecture``, a ``metadata`` object
  (``sae_lens_version``, ``model_name``, ``hook_name``, ``context_size``, ...) and, for TopK,
  ``k`` and ``rescale_acts_by_decoder_norm``. Configs without ``metadata.sae_lens_version``
  (or with a version below 6) are the pre-6.0 flat format, which :func:`load_saelens` reads too.

SAELens encodes ``z = (x - b_dec if apply_b_dec_to_input else x) @ W_enc + b_enc``, then
``relu(z)`` (standard), ``relu(z) * (z > threshold)`` (jumprelu) or the k largest of ``z`` per
row passed through ReLU (topk). ``normalize_activations: "layer_norm"`` centres each row and
divides it by its unbiased std plus 1e-5, which is sae-ref's ``SAEConfig(standardize=True)``.

How sae-ref's activations are saved:

=============  ===========================================================================
activation     SAELens
=============  ===========================================================================
relu           ``standard``
topk           ``topk`` with ``k`` and ``rescale_acts_by_decoder_norm: false``
jumprelu       ``jumprelu`` with ``threshold = params.theta``
threshold      ``jumprelu`` with ``threshold`` = ``config.theta`` for every latent (the same
               function: ``relu(z) * (z > theta)``)
batchtopk      ``jumprelu`` with ``threshold`` = ``config.theta`` for every latent, i.e. the
               inference rule; ``metadata.training_architecture_details`` records
               ``{"architecture": "batchtopk", "k", "theta", "trained_with"}``
=============  ===========================================================================

and back: ``standard`` loads as relu, ``topk`` as topk, ``jumprelu`` as jumprelu with
``params.theta = threshold`` (all thresholds must be positive, as sae-ref's JumpReLU requires;
a jumprelu whose thresholds are one common value ``t <= 0`` loads as
``SAEConfig("threshold", theta=t)``, the same function). Two SAELens options are folded into
the parameters so that :func:`sae_ref.sae.encode` gives SAELens's output:

- ``apply_b_dec_to_input: false``: ``b_enc' = b_enc + b_dec @ W_enc``, so
  ``(x - b_dec) @ W_enc + b_enc' = x @ W_enc + b_enc``;
- TopK ``rescale_acts_by_decoder_norm: true`` (SAELens selects on ``z * n`` with
  ``n_j = |W_dec[j]|`` and decodes ``(f / n) @ W_dec``): ``W_enc[:, j]`` and ``b_enc[j]`` are
  multiplied by ``n_j`` and ``W_dec[j]`` divided by it (a zero row stays zero).

Both are exact in real arithmetic and done in float64 before the cast to the target dtype,
so the pre-activations match SAELens's to rounding (a top-k cut between two values within
rounding of each other could then differ).

>>> import tempfile, numpy as np
>>> from sae_ref.sae import SAEConfig, init_params
>>> from sae_ref.io.saelens import save_saelens, load_saelens
>>> params = init_params(8, 32, xp=np, seed=0)
>>> with tempfile.TemporaryDirectory() as d:
...     path = save_saelens(f"{d}/sae", params, SAEConfig("topk", k=4))
...     p2, cfg, raw = load_saelens(path)
...     print(raw["architecture"], raw["k"], cfg.activation, bool(np.all(p2.W_enc == params.W_enc)))
topk 4 topk True
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from array_api_compat import array_namespace
from safetensors import SafetensorError, deserialize

from sae_ref import _checks as C
from sae_ref.arrays import to_numpy
from sae_ref.io._atomic import atomic_write_bytes, fsync_directory
from sae_ref.sae import SAEConfig, SAEParams, _check_params

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
#: The ``metadata.sae_lens_version`` written: the cfg layout is sae-lens 6's.
SAELENS_FORMAT_VERSION = "6.0.0"

_ARCHITECTURE = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu",
                 "threshold": "jumprelu", "batchtopk": "jumprelu"}
_FLOAT_DTYPES = ("float16", "float32", "float64")
_KNOWN_NORMALIZATIONS = ("expected_average_only_in", "constant_norm_rescale")
_SAFETENSORS_FLOATS = {"F16": np.float16, "F32": np.float32, "F64": np.float64}


# --- writing ------------------------------------------------------------------------------------
def save_saelens(directory, params: SAEParams, config: SAEConfig, *, metadata: dict | None = None,
                 dtype: str | None = None, overwrite: bool = False) -> Path:
    """Write an SAE as a SAELens directory (``cfg.json`` + ``sae_weights.safetensors``).

    Parameters
    ----------
    directory : str or os.PathLike
        The SAE directory. It must not exist or be empty, unless ``overwrite`` is True, in
        which case it is replaced as a whole.
    params : SAEParams
        Arrays of any backend (copied to NumPy).
    config : SAEConfig
        Its activation decides the SAELens architecture (see the module docs); a
        ``"batchtopk"`` config needs ``theta``, the global inference threshold.
    metadata : dict, optional
        JSON-serialisable entries for ``cfg["metadata"]`` (``model_name``, ``hook_name``,
        ``context_size``, ...); they are added to, and win over, the defaults written.
    dtype : {"float16", "float32", "float64"}, optional
        Tensor and ``cfg["dtype"]`` precision; defaults to the parameters' dtype.
    overwrite : bool
        Replace an existing non-empty directory.

    Returns
    -------
    pathlib.Path
        ``directory``.

    Notes
    -----
    Both files are written into a hidden temporary directory beside the target, which is then
    renamed into place: the target never holds a half-written pair. When replacing, the old
    directory is renamed aside first and deleted last.
    """
    op = "save_saelens"
    tensors, cfg = _to_saelens(op, params, config, metadata, dtype)
    data = safetensors.numpy.save(tensors)
    try:
        text = json.dumps(cfg, indent=2) + "\n"
    except (TypeError, ValueError) as e:
        raise TypeError(f"{op}: argument 'metadata' must be JSON-serialisable: {e}") from None
    directory = Path(directory)
    _check_target(op, directory, overwrite)
    _write_directory(directory, {WEIGHTS_FILENAME: data, CFG_FILENAME: text.encode("utf-8")})
    return directory


def _to_saelens(op, params, config, metadata, dtype) -> tuple[dict[str, np.ndarray], dict]:
    if not isinstance(config, SAEConfig):
        raise TypeError(f"{op}: argument 'config' must be SAEConfig, got {type(config).__name__}")
    _check_params(op, params, None, config)
    if config.activation not in _ARCHITECTURE:
        raise NotImplementedError(
            f"{op}: activation {config.activation!r} has no SAELens architecture (SAELens cannot "
            "run it); keep the training checkpoint, which sae_ref.fit.load_run reads")
    if dtype is not None and dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: argument 'dtype' must be one of {list(_FLOAT_DTYPES)}, got {dtype!r}")
    arrays = {n: to_numpy(getattr(params, n)) for n in ("W_enc", "W_dec", "b_enc", "b_dec")}
    threshold = _threshold(op, params, config)
    if threshold is not None:
        arrays["threshold"] = threshold
    np_dtype = np.dtype(dtype or arrays["W_enc"].dtype.name)
    tensors = {n: np.ascontiguousarray(a, dtype=np_dtype) for n, a in arrays.items()}
    return tensors, _cfg(params, config, metadata, np_dtype.name)


def _threshold(op, params, config):
    a = config.activation
    if a == "jumprelu":
        return to_numpy(params.theta)
    if a not in ("threshold", "batchtopk"):
        return None
    if config.theta is None:
        raise ValueError(
            f"{op}: activation {a!r} is saved as SAELens's JumpReLU with its global inference "
            "threshold, but config.theta is None; estimate theta and pass SAEConfig(..., theta=...)")
    return np.full((params.h,), config.theta, dtype=np.float64)


def _cfg(params, config, metadata, dtype_name) -> dict:
    arch = _ARCHITECTURE[config.activation]
    cfg = {
        "d_in": params.d, "d_sae": params.h, "dtype": dtype_name, "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm" if config.standardize else "none",
        "reshape_activations": "none",
        "metadata": _metadata(config, metadata),
    }
    if arch == "topk":
        cfg["k"] = config.k
        cfg["rescale_acts_by_decoder_norm"] = False
    cfg["architecture"] = arch
    return cfg


def _metadata(config, metadata) -> dict:
    from sae_ref import __version__

    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"save_saelens: argument 'metadata' must be a dict, got {type(metadata).__name__}")
    out = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
           "model_name": None, "hook_name": None, "context_size": None,
           "written_by": f"sae-ref {__version__}", "sae_ref_config": dataclasses.asdict(config)}
    if config.activation == "batchtopk":
        out["training_architecture_details"] = {
            "architecture": "batchtopk", "k": config.k, "theta": config.theta,
            "trained_with": f"sae-ref {__version__}"}
    out.update(metadata or {})
    return out


def set_threshold(directory, theta: float, *, metadata: dict | None = None) -> Path:
    """Set every latent's threshold of a SAELens JumpReLU directory holding one global
    :math:`\theta` (a BatchTopK export) to ``theta`` and add ``metadata`` to
    ``cfg["metadata"]``; the other tensors and keys are kept as written. Both files are
    replaced together (as :func:`save_saelens` writes them). Returns ``directory``."""
    op = "set_threshold"
    directory = Path(directory)
    theta = C.finite_number(op, "theta", theta)
    cfg = read_saelens_cfg(directory)
    if cfg.get("architecture") != "jumprelu":
        raise ValueError(f"{op}: argument 'directory' {os.fspath(directory)!r} is a "
                         f"{cfg.get('architecture')!r} SAE; only a JumpReLU has a threshold")
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"{op}: argument 'metadata' must be a dict, got {type(metadata).__name__}")
    tensors = read_saelens_weights(directory)
    t = tensors["threshold"]
    if t.size and not np.all(t == t.flat[0]):
        raise ValueError(f"{op}: argument 'directory' {os.fspath(directory)!r} has per-latent "
                         "thresholds (a trained JumpReLU), not one global theta")
    tensors["threshold"] = np.full(t.shape, theta, dtype=t.dtype)
    cfg["metadata"] = {**(cfg.get("metadata") or {}), **(metadata or {})}
    det = cfg["metadata"].get("training_architecture_details")
    if isinstance(det, dict) and det.get("architecture") == "batchtopk":
        cfg["metadata"]["training_architecture_details"] = {**det, "theta": theta}
    try:
        text = json.dumps(cfg, indent=2) + "\n"
    except (TypeError, ValueError) as e:
        raise TypeError(f"{op}: argument 'metadata' must be JSON-serialisable: {e}") from None
    _write_directory(directory, {WEIGHTS_FILENAME: safetensors.numpy.save(tensors),
                                 CFG_FILENAME: text.encode("utf-8")})
    return directory


def _check_target(op, directory: Path, overwrite: bool) -> None:
    if not directory.exists():
        return
    if not directory.is_dir():
        raise FileExistsError(f"{op}: {os.fspath(directory)} exists and is not a directory")
    if any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{op}: directory {os.fspath(directory)} is not empty; "
                              "pass overwrite=True to replace it")


def _write_directory(directory: Path, files: dict[str, bytes]) -> None:
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{directory.name}.{secrets.token_hex(6)}.tmp"
    os.mkdir(tmp)
    try:
        for name, data in files.items():
            atomic_write_bytes(tmp / name, data)
        _swap_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_directory(parent)


def _swap_into_place(tmp: Path, directory: Path) -> None:
    if not directory.exists():
        os.rename(tmp, directory)
        return
    old = directory.parent / f".{directory.name}.{secrets.token_hex(6)}.old"
    os.rename(directory, old)
    try:
        os.rename(tmp, directory)
    except BaseException:
        os.rename(old, directory)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --- reading: the config ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Spec:
    """What sae-ref needs from a cfg.json, either format."""

    architecture: str
    d_in: int
    d_sae: int
    dtype: str | None
    apply_b_dec_to_input: bool
    standardize: bool
    k: int | None
    rescale: bool


def read_saelens_cfg(directory) -> dict:
    """The parsed ``cfg.json`` of a SAELens directory, as written (errors name the file)."""
    path = Path(directory) / CFG_FILENAME
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"load_saelens: {os.fspath(path)} does not exist "
                                f"(a SAELens directory holds {CFG_FILENAME} and {WEIGHTS_FILENAME})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"load_saelens: {os.fspath(path)} is not valid JSON (truncated or corrupted): {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"load_saelens: {os.fspath(path)} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def saelens_version(cfg: dict) -> str | None:
    """The sae-lens version a cfg declares (``metadata.sae_lens_version`` or top level)."""
    meta = cfg.get("metadata")
    v = meta.get("sae_lens_version") if isinstance(meta, dict) else None
    return v or cfg.get("sae_lens_version")


def is_pre_6_cfg(cfg: dict) -> bool:
    """Whether sae-lens would read ``cfg`` with its pre-6.0 (flat) loader."""
    m = re.match(r"\s*v?(\d+)", str(saelens_version(cfg) or ""))
    return m is None or int(m.group(1)) < 6


def _spec(path: Path, cfg: dict) -> _Spec:
    flat = _flat_cfg(path, cfg) if is_pre_6_cfg(cfg) else cfg
    arch = flat.get("architecture")
    if arch not in ("standard", "jumprelu", "topk"):
        raise NotImplementedError(f"load_saelens: {os.fspath(path)}: architecture {arch!r} is not supported "
                                  "(supported: 'standard', 'jumprelu', 'topk')")
    d_in = _int_field(path, flat, "d_in", 1)
    d_sae = _int_field(path, flat, "d_sae", 1)
    k = _int_field(path, flat, "k", 1) if arch == "topk" else None
    if k is not None and k > d_sae:
        raise ValueError(f"load_saelens: {os.fspath(path)}: k = {k} exceeds d_sae = {d_sae}")
    return _Spec(arch, d_in, d_sae, _dtype_name(flat.get("dtype")),
                 _bool_field(path, flat, "apply_b_dec_to_input", True),
                 _standardize(path, flat), k,
                 arch == "topk" and _bool_field(path, flat, "rescale_acts_by_decoder_norm", False))


def _flat_cfg(path: Path, cfg: dict) -> dict:
    """A pre-6.0 cfg in the v6 vocabulary (the renames and defaults sae-lens applies)."""
    out = dict(cfg)
    act = out.get("activation_fn_str", out.get("activation_fn", "relu"))
    out.setdefault("architecture", "standard")
    kwargs = out.get("activation_fn_kwargs") or {}
    if act == "topk" and isinstance(kwargs, dict) and kwargs.get("k") is not None:
        out["architecture"], out["k"] = "topk", kwargs["k"]
    elif out["architecture"] == "standard" and act not in ("relu", None):
        raise NotImplementedError(f"load_saelens: {os.fspath(path)}: activation function {act!r} "
                                  "is not supported (supported: 'relu', 'topk')")
    norm = out.get("normalize_activations")
    if isinstance(norm, bool):
        out["normalize_activations"] = "expected_average_only_in" if norm else "none"
    return out


def _standardize(path: Path, cfg: dict) -> bool:
    norm = cfg.get("normalize_activations") or "none"
    if norm in _KNOWN_NORMALIZATIONS:
        raise NotImplementedError(f"load_saelens: {os.fspath(path)}: normalize_activations {norm!r} "
                                  "is not supported (supported: 'none', 'layer_norm')")
    if norm not in ("none", "layer_norm"):
        raise ValueError(f"load_saelens: {os.fspath(path)}: unknown normalize_activations {norm!r} "
                         "(expected 'none' or 'layer_norm')")
    reshape = cfg.get("reshape_activations") or "none"
    if reshape not in ("none", "hook_z"):
        raise ValueError(f"load_saelens: {os.fspath(path)}: unknown reshape_activations {reshape!r}")
    return norm == "layer_norm"


def _int_field(path: Path, cfg: dict, key: str, low: int) -> int:
    v = cfg.get(key)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ValueError(f"load_saelens: {os.fspath(path)}: {key!r} must be an integer >= {low}, got {v!r}")
    return v


def _bool_field(path: Path, cfg: dict, key: str, default: bool) -> bool:
    v = cfg.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ValueError(f"load_saelens: {os.fspath(path)}: {key!r} must be true or false, got {v!r}")
    return v


def _dtype_name(v) -> str | None:
    """sae-lens's dtype spellings ("float32", "torch.float32", "bfloat16") as a NumPy name."""
    if not isinstance(v, str):
        return None
    name = v.removeprefix("torch.")
    name = {"float": "float32", "half": "float16", "double": "float64", "bfloat16": "float32"}.get(name, name)
    return name if name in _FLOAT_DTYPES else None


# --- reading: the weights -----------------------------------------------------------------------
def read_saelens_weights(directory) -> dict[str, np.ndarray]:
    """The tensors of ``sae_weights.safetensors`` as NumPy arrays (bfloat16 widened to float32)."""
    path = Path(directory) / WEIGHTS_FILENAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"load_saelens: {os.fspath(path)} does not exist") from None
    try:
        views = deserialize(data)
    except SafetensorError as e:
        raise ValueError(f"load_saelens: {os.fspath(path)} is not a readable safetensors file "
                         f"(truncated or corrupted): {e}") from None
    return {name: _view_to_numpy(path, name, v) for name, v in views}


def _view_to_numpy(path: Path, name: str, view) -> np.ndarray:
    code, shape = view["dtype"], tuple(view["shape"])
    if code == "BF16":
        bits = np.frombuffer(view["data"], dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if code not in _SAFETENSORS_FLOATS:
        raise ValueError(f"load_saelens: {os.fspath(path)}: tensor {name!r} has dtype {code}, "
                         "expected a floating type (F16, BF16, F32, F64)")
    return np.frombuffer(view["data"], dtype=np.dtype(_SAFETENSORS_FLOATS[code]).newbyteorder("<")).reshape(shape)


def _check_tensors(path: Path, tensors: dict, spec: _Spec) -> dict[str, np.ndarray]:
    d, h = spec.d_in, spec.d_sae
    want = {"W_enc": (d, h), "W_dec": (h, d), "b_enc": (h,), "b_dec": (d,)}
    if spec.architecture == "jumprelu":
        want["threshold"] = (h,)
    tensors = _drop_unit_scaling(path, dict(tensors))
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing or extra:
        raise ValueError(f"load_saelens: {os.fspath(path)}: tensors missing {missing}, unexpected {extra} "
                         f"for architecture {spec.architecture!r}")
    for name, shape in want.items():
        a = tensors[name]
        if a.shape != shape:
            raise ValueError(f"load_saelens: {os.fspath(path)}: tensor {name!r} has shape {a.shape}, "
                             f"expected {shape} from d_in = {d}, d_sae = {h}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"load_saelens: {os.fspath(path)}: tensor {name!r} contains NaN or infinity")
    return tensors


def _drop_unit_scaling(path: Path, tensors: dict) -> dict:
    s = tensors.pop("scaling_factor", None)
    if s is not None and not np.all(s == 1):
        raise NotImplementedError(f"load_saelens: {os.fspath(path)}: a finetuning 'scaling_factor' "
                                  "other than all ones is not supported")
    return tensors


# --- reading: the SAE ---------------------------------------------------------------------------
def load_saelens(directory, *, xp=None, device=None, dtype=None) -> tuple[SAEParams, SAEConfig, dict]:
    """Read a SAELens SAE directory (sae-lens 6 or pre-6.0 cfg) as sae-ref parameters.

    Parameters
    ----------
    directory : str or os.PathLike
        Holds ``cfg.json`` and ``sae_weights.safetensors``.
    xp : array namespace or library, optional
        Where the arrays go (``numpy``, ``torch``, ``array_api_strict``, compat namespaces);
        default NumPy.
    device : optional
        A device of ``xp``; default its default device.
    dtype : str or dtype of ``xp``, optional
        Default: the cfg's ``dtype`` (bfloat16 widens to float32), else the file's.

    Returns
    -------
    params : SAEParams
        With ``apply_b_dec_to_input: false`` and TopK decoder-norm rescaling folded in (see
        the module docs), so :func:`sae_ref.sae.encode` gives SAELens's activations.
    config : SAEConfig
    cfg : dict
        ``cfg.json`` as written (extra keys kept).

    Raises
    ------
    FileNotFoundError
        A file is missing.
    ValueError
        A file is corrupted or inconsistent (wrong or missing tensors, shapes, fields), or a
        JumpReLU has thresholds <= 0 that are not one common value.
    NotImplementedError
        An architecture, normalisation or activation sae-ref does not implement.
    """
    directory = Path(directory)
    cfg = read_saelens_cfg(directory)
    spec = _spec(directory / CFG_FILENAME, cfg)
    path = directory / WEIGHTS_FILENAME
    tensors = _check_tensors(path, read_saelens_weights(directory), spec)
    tensors = _fold(tensors, spec)
    config, theta = _config(path, spec, tensors.get("threshold"))
    xp, device, target = _target(xp, device, dtype, spec, tensors["W_enc"])
    arrays = {n: xp.asarray(tensors[n], dtype=target, device=device) for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    arrays["theta"] = None if theta is None else xp.asarray(theta, dtype=target, device=device)
    return SAEParams(**arrays), config, cfg


def _fold(tensors: dict, spec: _Spec) -> dict:
    if spec.apply_b_dec_to_input and not spec.rescale:
        return tensors
    t = {n: a.astype(np.float64) for n, a in tensors.items()}
    if not spec.apply_b_dec_to_input:
        t["b_enc"] = t["b_enc"] + t["b_dec"] @ t["W_enc"]
    if spec.rescale:
        norms = np.linalg.norm(t["W_dec"], axis=1)
        safe = np.where(norms > 0, norms, 1.0)
        t["W_enc"] = t["W_enc"] * norms
        t["b_enc"] = t["b_enc"] * norms
        t["W_dec"] = t["W_dec"] / safe[:, None]
    return t


def _config(path: Path, spec: _Spec, threshold) -> tuple[SAEConfig, Any]:
    std = spec.standardize
    if spec.architecture == "standard":
        return SAEConfig("relu", standardize=std), None
    if spec.architecture == "topk":
        return SAEConfig("topk", k=spec.k, standardize=std), None
    bad = int(np.count_nonzero(threshold <= 0))
    if bad == 0:
        return SAEConfig("jumprelu", standardize=std), threshold
    if np.all(threshold == threshold[0]):
        return SAEConfig("threshold", theta=float(threshold[0]), standardize=std), None
    raise ValueError(f"load_saelens: {os.fspath(path)}: JumpReLU threshold is <= 0 for {bad} of "
                     f"{threshold.shape[0]} latents; sae-ref's JumpReLU needs positive thresholds")


def _target(xp, device, dtype, spec: _Spec, W_enc):
    xp = array_namespace(np.zeros(1)) if xp is None else array_namespace(xp.zeros(1))
    if dtype is None:
        dtype = spec.dtype or np.dtype(W_enc.dtype).name
    if isinstance(dtype, str):
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"load_saelens: argument 'dtype' must be one of {list(_FLOAT_DTYPES)}, got {dtype!r}")
        dtype = getattr(xp, dtype)
    return xp, device, dtype
