"""Training checkpoints: named NumPy arrays in safetensors plus a JSON record that commits them.

A checkpoint of step ``s`` in a directory is two files:

- ``step-{s:09d}.safetensors``: the arrays;
- ``step-{s:09d}.json``: the commit record, written **last**::

    {"format": "sae-ref-checkpoint", "format_version": 1, "step": s,
     "tensors_file": "step-....safetensors", "sha256": "<hex digest of that file>",
     "tensors": {name: {"shape": [...], "dtype": "float32"}, ...},
     "meta": {...}}

Both are written atomically (:mod:`sae_ref.io._atomic`), so a crash leaves at worst a tensors
file without its record, which is not a checkpoint: :func:`latest_checkpoint` only sees steps
whose record exists. :func:`load_checkpoint` verifies everything it reads (the record's keys,
the digest, the safetensors header, every shape and dtype) and raises :class:`CheckpointError`
naming the file rather than returning partial data; it never skips a damaged newest checkpoint
in favour of an older one.

>>> import tempfile, numpy as np
>>> from sae_ref.io.checkpoint import save_checkpoint, load_checkpoint
>>> with tempfile.TemporaryDirectory() as d:
...     p = save_checkpoint(d, 7, {"w": np.arange(6.0).reshape(2, 3)}, {"lr": 1e-3})
...     arrays, meta, step = load_checkpoint(d)
...     print(p.name, step, meta, arrays["w"].shape)
step-000000007.json 7 {'lr': 0.001} (2, 3)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from sae_ref import _checks as C
from sae_ref.arrays import to_numpy
from sae_ref.io._atomic import atomic_write_bytes, fsync_directory

FORMAT = "sae-ref-checkpoint"
FORMAT_VERSION = 1
_RECORD_KEYS = ("format", "format_version", "step", "tensors_file", "sha256", "tensors", "meta")
_RECORD_RE = re.compile(r"^step-(\d+)\.json$")
_TENSORS_RE = re.compile(r"^step-(\d+)\.safetensors$")
_SUPPORTED_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                     "uint64", "float16", "float32", "float64", "complex64")


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupted or inconsistent; the message names the file."""


# --- names --------------------------------------------------------------------------------------
def checkpoint_files(directory, step: int) -> tuple[Path, Path]:
    """``(record, tensors)``: the paths of step ``step``'s two files in ``directory``."""
    stem = f"step-{int(step):09d}"
    directory = Path(directory)
    return directory / f"{stem}.json", directory / f"{stem}.safetensors"


def _steps(directory: Path, pattern: re.Pattern) -> dict[int, Path]:
    if not directory.is_dir():
        return {}
    out = {}
    for p in directory.iterdir():
        m = pattern.match(p.name)
        if m:
            out[int(m.group(1))] = p
    return out


def committed_steps(directory) -> list[int]:
    """The steps of ``directory`` whose JSON record exists, ascending (contents not checked)."""
    return sorted(_steps(Path(directory), _RECORD_RE))


def latest_checkpoint(directory) -> Path | None:
    """The record (``.json``) of the highest committed step in ``directory``, or None.

    A ``.safetensors`` file without its record is not a checkpoint and is ignored; nothing is
    verified here (:func:`load_checkpoint` does that). A directory that does not exist has no
    checkpoint.
    """
    steps = _steps(Path(directory), _RECORD_RE)
    return steps[max(steps)] if steps else None


def checkpoint_at(directory, step: int) -> Path | None:
    """The record (``.json``) of the committed checkpoint of ``step`` in ``directory``, or None."""
    return _steps(Path(directory), _RECORD_RE).get(int(step))


# --- saving -------------------------------------------------------------------------------------
def save_checkpoint(directory, step: int, arrays: dict[str, Any], meta: dict | None = None, *,
                    keep: int | None = None) -> Path:
    """Write a checkpoint of ``arrays`` and ``meta`` for ``step``; return its record's path.

    Parameters
    ----------
    directory : str or os.PathLike
        Where the checkpoints live; created if missing.
    step : int
        The training step, >= 0. Saving a step that already exists replaces it (its old
        record is removed first, so a crash midway leaves no half-replaced checkpoint).
    arrays : dict of str to array
        Named arrays of any backend (copied to NumPy); dtypes: bool, (u)int8-64,
        float16/32/64, complex64. Saved bit for bit.
    meta : dict, optional
        JSON-serialisable state (config, counters, data position, ...).
    keep : int, optional
        After committing, delete all but the newest ``keep`` checkpoints (and stray tensors
        files of older steps left by interrupted saves).

    Returns
    -------
    pathlib.Path
        The ``step-XXXXXXXXX.json`` record.

    Raises
    ------
    TypeError, ValueError
        Bad arguments or a ``meta`` that is not JSON-serialisable; raised before anything is
        written, so the directory is left as it was.
    """
    op = "save_checkpoint"
    step = C.integer_in(op, "step", step, 0, 10**15)
    if keep is not None:
        keep = C.integer_in(op, "keep", keep, 1, 2**31)
    np_arrays = _numpy_arrays(op, arrays)
    data = safetensors.numpy.save(np_arrays)
    directory = Path(directory)
    record_path, tensors_path = checkpoint_files(directory, step)
    record = _record(step, tensors_path.name, data, np_arrays, {} if meta is None else meta)
    text = _record_text(op, record)
    directory.mkdir(parents=True, exist_ok=True)
    _uncommit(record_path)
    atomic_write_bytes(tensors_path, data)
    atomic_write_bytes(record_path, text)
    if keep is not None:
        prune_checkpoints(directory, keep)
    return record_path


def update_meta(record_path, **entries) -> Path:
    """Add ``entries`` to a committed checkpoint's ``meta`` (the record is rewritten
    atomically; the tensors and their digest are untouched), e.g. the theta calibrated on
    the final weights (:mod:`sae_ref.calibrate`). Returns the record's path."""
    op = "update_meta"
    path = _resolve(Path(record_path))
    record = _read_record(path)
    _check_record_fields(path, record)
    record["meta"] = {**record["meta"], **entries}
    atomic_write_bytes(path, _record_text(op, record))
    return path


def _numpy_arrays(op: str, arrays) -> dict[str, np.ndarray]:
    if not isinstance(arrays, dict):
        raise TypeError(f"{op}: argument 'arrays' must be a dict of name -> array, got {type(arrays).__name__}")
    out = {}
    for name, a in arrays.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"{op}: argument 'arrays' has an invalid name {name!r} (non-empty str, not '__metadata__')")
        a = np.asarray(to_numpy(a))
        a = a if a.flags.c_contiguous else a.copy(order="C")  # ascontiguousarray makes 0-d 1-d
        if a.dtype.name not in _SUPPORTED_DTYPES:
            raise TypeError(f"{op}: array {name!r} has dtype {a.dtype}, expected one of {list(_SUPPORTED_DTYPES)}")
        out[name] = a
    return out


def _record(step, tensors_name, data, arrays, meta) -> dict:
    if not isinstance(meta, dict):
        raise TypeError(f"save_checkpoint: argument 'meta' must be a dict, got {type(meta).__name__}")
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
        "tensors_file": tensors_name, "sha256": hashlib.sha256(data).hexdigest(),
        "tensors": {k: {"shape": list(a.shape), "dtype": a.dtype.name} for k, a in arrays.items()},
        "meta": meta,
    }


def _record_text(op, record) -> bytes:
    try:
        return (json.dumps(record, indent=2) + "\n").encode("utf-8")
    except (TypeError, ValueError) as e:
        raise TypeError(f"{op}: argument 'meta' must be JSON-serialisable: {e}") from None


def _uncommit(record_path: Path) -> None:
    if record_path.exists():
        record_path.unlink()
        fsync_directory(record_path.parent)


def prune_checkpoints(directory, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` committed checkpoints; return the deleted steps.

    Each record is removed before its tensors file, so a checkpoint is never left committed
    with its tensors gone. Tensors files without a record of a step older than the newest
    committed one (leftovers of interrupted saves) are removed too.
    """
    keep = C.integer_in("prune_checkpoints", "keep", keep, 1, 2**31)
    directory = Path(directory)
    steps = committed_steps(directory)
    doomed = steps[:-keep]
    for s in doomed:
        record, tensors = checkpoint_files(directory, s)
        record.unlink(missing_ok=True)
        tensors.unlink(missing_ok=True)
    newest = steps[-1] if steps else -1
    for s, p in _steps(directory, _TENSORS_RE).items():
        if s < newest and not checkpoint_files(directory, s)[0].exists():
            p.unlink(missing_ok=True)
    fsync_directory(directory)
    return doomed


# --- loading ------------------------------------------------------------------------------------
def load_checkpoint(path_or_directory) -> tuple[dict[str, np.ndarray], dict, int]:
    """Load and verify a checkpoint: ``(arrays, meta, step)``.

    Parameters
    ----------
    path_or_directory : str or os.PathLike
        A record (``step-XXXXXXXXX.json``) or a directory, meaning its latest committed
        checkpoint.

    Returns
    -------
    arrays : dict of str to numpy.ndarray
        Fresh, writable arrays with the recorded shapes and dtypes.
    meta : dict
    step : int

    Raises
    ------
    CheckpointError
        Nothing to load, or the record or tensors file is missing, truncated, corrupted or
        inconsistent. The message names the file. A damaged newest checkpoint is reported,
        not skipped: delete it or pass an older record explicitly.
    """
    record_path = _resolve(Path(path_or_directory))
    record = _read_record(record_path)
    tensors_path = record_path.parent / record["tensors_file"]
    data = _read_tensors_bytes(record_path, tensors_path, record["sha256"])
    arrays = _parse_tensors(tensors_path, data, record["tensors"])
    return arrays, record["meta"], record["step"]


def _fail(path, what) -> CheckpointError:
    return CheckpointError(f"load_checkpoint: {os.fspath(path)}: {what}")


def _resolve(path: Path) -> Path:
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise _fail(path, "no committed checkpoint (no step-*.json record) in this directory")
        return latest
    if not path.exists():
        raise _fail(path, "no such checkpoint record or directory")
    if path.suffix != ".json":
        raise _fail(path, "expected a checkpoint record (step-XXXXXXXXX.json) or a directory")
    return path


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise _fail(path, f"cannot read the record: {e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"record is not valid JSON (truncated or corrupted): {e}") from None
    if not isinstance(record, dict):
        raise _fail(path, f"record must be a JSON object, got {type(record).__name__}")
    missing = [k for k in _RECORD_KEYS if k not in record]
    if missing:
        raise _fail(path, f"record is missing keys {missing}")
    if record["format"] != FORMAT:
        raise _fail(path, f"not an sae-ref checkpoint record (format {record['format']!r})")
    _check_record_fields(path, record)
    return record


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_record_fields(path: Path, r: dict) -> None:
    if not _is_int(r["format_version"]) or r["format_version"] != FORMAT_VERSION:
        raise _fail(path, f"format_version {r['format_version']!r} is not {FORMAT_VERSION}, the version this sae-ref reads")
    if not _is_int(r["step"]) or r["step"] < 0:
        raise _fail(path, f"step must be an integer >= 0, got {r['step']!r}")
    m = _RECORD_RE.match(path.name)
    if m and int(m.group(1)) != r["step"]:
        raise _fail(path, f"records step {r['step']} but its name says step {int(m.group(1))}")
    name = r["tensors_file"]
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise _fail(path, f"tensors_file must be a plain file name in the same directory, got {name!r}")
    if not isinstance(r["sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", r["sha256"]):
        raise _fail(path, f"sha256 must be 64 lowercase hex digits, got {r['sha256']!r}")
    if not isinstance(r["meta"], dict):
        raise _fail(path, f"meta must be a JSON object, got {type(r['meta']).__name__}")
    _check_tensor_specs(path, r["tensors"])


def _check_tensor_specs(path: Path, specs) -> None:
    if not isinstance(specs, dict):
        raise _fail(path, f"tensors must be a JSON object, got {type(specs).__name__}")
    for name, spec in specs.items():
        ok = (isinstance(spec, dict) and isinstance(spec.get("shape"), list)
              and all(_is_int(n) and n >= 0 for n in spec["shape"])
              and spec.get("dtype") in _SUPPORTED_DTYPES)
        if not ok:
            raise _fail(path, f"tensor {name!r} has an invalid entry {spec!r} (want shape: list of int, dtype: name)")


def _read_tensors_bytes(record_path: Path, tensors_path: Path, sha256: str) -> bytes:
    try:
        data = tensors_path.read_bytes()
    except FileNotFoundError:
        raise _fail(tensors_path, f"tensors file is missing (named by {record_path.name})") from None
    except OSError as e:
        raise _fail(tensors_path, f"cannot read the tensors file: {e}") from None
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise _fail(tensors_path, f"truncated or corrupted: sha256 mismatch ({len(data)} bytes; "
                                  f"{record_path.name} records {sha256[:16]}..., the file has {got[:16]}...)")
    return data


def _parse_tensors(tensors_path: Path, data: bytes, specs: dict) -> dict[str, np.ndarray]:
    try:
        loaded = safetensors.numpy.load(data)
    except (SafetensorError, KeyError, ValueError) as e:  # KeyError: a dtype NumPy lacks
        raise _fail(tensors_path, f"not a readable safetensors file: {type(e).__name__}: {e}") from None
    missing = sorted(set(specs) - set(loaded))
    extra = sorted(set(loaded) - set(specs))
    if missing or extra:
        raise _fail(tensors_path, f"tensors do not match the record: missing {missing}, unrecorded {extra}")
    out = {}
    for name, spec in specs.items():
        a = loaded[name]
        if list(a.shape) != spec["shape"] or a.dtype.name != spec["dtype"]:
            raise _fail(tensors_path, f"tensor {name!r} is {a.dtype.name}{list(a.shape)} in the file "
                                      f"but the record says {spec['dtype']}{spec['shape']}")
        out[name] = a if a.flags.writeable else a.copy()
    return out
