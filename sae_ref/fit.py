"""The training loop at the edge: data in, :func:`sae_ref.train.step`, files and progress out.

:func:`fit` runs a :class:`~sae_ref.train.TrainConfig` on a data source (an
:class:`~sae_ref.data.store.ActivationStore` or a
:class:`~sae_ref.data.synthetic.SyntheticSource`) on one backend, and writes into ``run_dir``:

- ``checkpoints/step-*.safetensors`` + ``.json``: the whole state (parameters, Adam moments,
  counters, the theta estimator, the data position, the config), atomically, every
  ``checkpoint_every`` steps and at the end; ``resume=True`` continues from the newest one
  exactly (bit for bit on NumPy: the data stream is a function of its position);
- ``metrics.jsonl``: one line every ``log_every`` steps (the only host reads of the metrics);
- ``sae/``: the trained SAE in the SAELens format (BatchTopK as JumpReLU with theta; top-AFA
  has no SAELens architecture and is kept in the checkpoint only);
- ``summary.json``: final metrics and, for BatchTopK, the inference L0 that theta gives on
  held-out batches next to k.

:func:`load_run` reads a trained SAE back (from the newest checkpoint, or from a SAELens
directory) for evaluation.

Batches are checked for NaN/inf on the host before they move to the device (raise, or skip
and count with ``nonfinite="skip"``), so the steps themselves never sync.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from array_api_compat import array_namespace
from tqdm.auto import tqdm

from sae_ref import _checks as C
from sae_ref.arrays import resolve
from sae_ref.io import _atomic
from sae_ref.io.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from sae_ref.io.saelens import save_saelens
from sae_ref.sae import encode
from sae_ref.train import (TrainConfig, TrainState, inference_config, init_state,
                           state_arrays, state_from_arrays, step)

#: Seed offset of the held-out stream of a synthetic source (disjoint from training batches).
HOLDOUT_SEED = 1_000_003


@dataclass(frozen=True)
class FitResult:
    state: TrainState
    summary: dict


def _dtype(xp, name):
    C.choice("fit", "dtype", name, ("float32", "float64"))
    return getattr(xp, name)


def _split(source, batch_size, holdout_batches):
    """Row ranges (train, held-out) for a store; (None, None) for an endless source."""
    n = getattr(source, "n_rows", None)
    if n is None:
        return None, None
    m = holdout_batches * batch_size
    if n - m < batch_size:
        raise ValueError(f"fit: the store has {n} rows; holding out {holdout_batches} batches of "
                         f"{batch_size} leaves fewer than one batch to train on")
    return (0, n - m), (n - m, n)


def _read_metrics(m: dict) -> dict:
    return {k: (float(v) if not isinstance(v, (int, float)) else v) for k, v in m.items()}


def _trim_log(path: Path, t: int):
    """Keep the log lines of steps <= t (after a resume), dropping a torn last line."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", math.inf) <= t:
            keep.append(line)
    _atomic.atomic_write_bytes(path, "".join(x + "\n" for x in keep).encode())


def _kept(code) -> int:
    """How many entries of ``code`` are nonzero (one host read)."""
    xp = array_namespace(code.values)
    return int(xp.count_nonzero(code.values))


def heldout_l0(state: TrainState, batches) -> dict:
    """Mean L0 per sample on held-out batches: the training selection and inference."""
    inf_cfg = inference_config(state)
    train_cfg = state.config.sae_config()
    l0_inf = l0_train = 0.0
    n = 0
    with C.no_checks():
        for x in batches:
            l0_inf += _kept(encode(state.params, x, inf_cfg))
            l0_train += _kept(encode(state.params, x, train_cfg))
            n += x.shape[0]
    out = {"heldout_tokens": n, "l0_inference": l0_inf / n, "l0_training_selection": l0_train / n}
    if inf_cfg.activation == "threshold":
        out["theta"] = inf_cfg.theta
        out["theta_estimator"] = state.config.theta_estimator
    return out


def fit(config: TrainConfig, source, *, backend: str = "numpy", device=None,
        dtype: str = "float32", batch_size: int = 4096, run_dir=None,
        checkpoint_every: int | None = None, keep: int | None = 3, resume: bool = False,
        log_every: int = 50, holdout_batches: int = 4, data_seed: int = 0,
        progress: bool = True, saelens_metadata: dict | None = None, comm=None) -> FitResult:
    """Train ``config`` on ``source`` for ``config.steps`` steps (see the module docstring).

    ``comm`` (a :class:`sae_ref.dist.Comm` of R > 1 ranks, e.g. from
    :func:`sae_ref.dist.comm_from_env` under ``torchrun``): data-parallel training. Every rank
    reads the same global batches of ``batch_size`` rows (so the data order, resuming and the
    results do not depend on R) and trains on its ``batch_size / R`` rows; the ranks' steps
    equal one process's step on the global batch (:mod:`sae_ref.dist.data_parallel`). Rank 0
    alone writes the log, checkpoints and exports; a run resumes with any number of ranks.
    """
    xp, dev = resolve(backend, device)
    dt = _dtype(xp, dtype)
    batch_size = C.integer_in("fit", "batch_size", batch_size, 1, 2**40)
    rank, size = (0, 1) if comm is None else (comm.rank, comm.size)
    if batch_size % size:
        raise ValueError(f"fit: argument 'batch_size' ({batch_size}) must be a multiple of the number of ranks ({size})")
    rows = slice(rank * batch_size // size, (rank + 1) * batch_size // size)
    if rank != 0:  # only rank 0 writes files and shows progress
        progress, writer = False, False
    else:
        writer = True
    train_rows, held_rows = _split(source, batch_size, holdout_batches)
    run = Path(run_dir) if run_dir is not None else None
    ckpt_dir = run / "checkpoints" if run is not None else None
    if resume and run is None:
        raise ValueError("fit: resume=True needs a run_dir to resume from")
    state, position, skipped = None, 0, 0
    if resume and latest_checkpoint(ckpt_dir) is not None:
        arrays, meta, _ = load_checkpoint(ckpt_dir)
        state = state_from_arrays(arrays, meta, xp=xp, device=dev)
        if state.config.to_dict() != config.to_dict():
            raise ValueError("fit: the checkpoint in run_dir was written with another config; "
                             "resume with the same config or start a new run_dir")
        position, skipped = meta["data_position"], meta["data_skipped"]
    stream_kw = dict(seed=data_seed, xp=xp, device=dev, dtype=dt, nonfinite=config.nonfinite, rows=train_rows)
    if state is None:
        state = init_state(config, next(source.stream(batch_size, position=0, **stream_kw)))
    stream = source.stream(batch_size, position=position, **stream_kw)
    if not writer:
        run = ckpt_dir = None
    log_path = run / "metrics.jsonl" if run is not None else None
    if run is not None:
        run.mkdir(parents=True, exist_ok=True)
        _trim_log(log_path, state.t)

    def checkpoint():
        arrays, meta = state_arrays(state)
        meta.update(data_position=stream.position, data_skipped=skipped + stream.skipped,
                    batch_size=batch_size, data_seed=data_seed, backend=backend, dtype=dtype)
        save_checkpoint(ckpt_dir, state.t, arrays, meta, keep=keep)

    bar = tqdm(total=config.steps, initial=state.t, disable=not progress, unit="step",
               dynamic_ncols=True)
    t0, tokens0 = time.perf_counter(), state.tokens
    last = {}
    with C.no_checks(), (open(log_path, "a") if log_path is not None else _nullfile()) as log:
        while state.t < config.steps:
            x = next(stream)
            state, metrics = step(state, x if size == 1 else x[rows], check=False, donate=True, comm=comm)
            bar.update(1)
            if state.t % log_every == 0 or state.t == config.steps:
                last = _read_metrics(metrics)
                rate = (state.tokens - tokens0) / max(time.perf_counter() - t0, 1e-9)
                last.update(tokens_per_s=rate, skipped=skipped + stream.skipped,
                            mse_unit=config.loss_unit)
                log.write(json.dumps(last) + "\n")
                log.flush()
                bar.set_postfix(L0=f"{last['l0']:.2f}", NMSE=f"{last['nmse']:.4f}",
                                dead=f"{last['dead_fraction']:.3f}", tok_s=f"{rate:,.0f}")
            if ckpt_dir is not None and checkpoint_every and state.t % checkpoint_every == 0:
                checkpoint()
    bar.close()
    if ckpt_dir is not None and (not checkpoint_every or state.t % checkpoint_every != 0):
        checkpoint()
    summary = {"steps": state.t, "tokens": state.tokens, "skipped": skipped + stream.skipped,
               "config": config.to_dict(), "backend": backend, "dtype": dtype,
               "final_metrics": last, "k": config.k}
    held = _heldout(source, batch_size, holdout_batches, held_rows, xp, dev, dt) if writer else None
    if held is not None:
        summary["heldout"] = heldout_l0(state, held)
    if run is not None and config.arch == "top-afa":
        summary["sae_export"] = "none: SAELens has no top-AFA architecture; load_run reads the checkpoint"
        _atomic.atomic_write_bytes(run / "summary.json", json.dumps(summary, indent=2).encode())
    elif run is not None:
        sae_cfg = inference_config(state)
        meta = dict(saelens_metadata or {})
        meta.setdefault("training_architecture_details", {"architecture": config.arch, "k": config.k,
                        "preset": config.preset, "theta_estimator": config.theta_estimator})
        save_saelens(run / "sae", state.params, _export_config(state, sae_cfg), metadata=meta,
                     overwrite=True)
        _atomic.atomic_write_bytes(run / "summary.json", json.dumps(summary, indent=2).encode())
    return FitResult(state, summary)


@dataclass(frozen=True)
class LoadedSAE:
    """A trained SAE read back: its parameters, the configuration to encode with (inference:
    BatchTopK as threshold), the training configuration when known, and where it came from."""

    params: Any
    config: Any
    train_config: TrainConfig | None
    source: str


def load_run(path, *, xp=None, device=None) -> LoadedSAE:
    """The SAE of a run directory (its newest checkpoint, exact), or of a SAELens directory
    (``path`` itself or ``path/sae``), on ``xp`` (default NumPy) and ``device``."""
    import numpy as np

    from sae_ref.io.saelens import load_saelens

    xp = np if xp is None else xp
    path = Path(path)
    ckpt = path / "checkpoints"
    if ckpt.is_dir() and latest_checkpoint(ckpt) is not None:
        arrays, meta, t = load_checkpoint(ckpt)
        state = state_from_arrays(arrays, meta, xp=xp, device=device)
        return LoadedSAE(state.params, inference_config(state), state.config, f"{ckpt} (step {t})")
    for d in (path, path / "sae"):
        if (d / "cfg.json").is_file():
            params, config, _ = load_saelens(d, xp=xp, device=device)
            return LoadedSAE(params, config, None, str(d))
    raise FileNotFoundError(f"load_run: argument 'path' {str(path)!r} holds neither checkpoints/ "
                            "nor a SAELens directory (cfg.json)")


def _export_config(state, inf_cfg):
    """BatchTopK is exported with its training activation and theta (saved as JumpReLU)."""
    if state.config.arch != "batchtopk":
        return inf_cfg
    return replace(state.config.sae_config(), theta=inf_cfg.theta)


def _heldout(source, batch_size, holdout_batches, held_rows, xp, dev, dt):
    if holdout_batches <= 0:
        return None
    kw = dict(xp=xp, device=dev, dtype=dt, nonfinite="skip")
    if held_rows is not None:
        s = source.stream(batch_size, seed=0, rows=held_rows, **kw)
    else:
        s = source.stream(batch_size, seed=HOLDOUT_SEED, **kw)
    return [next(s) for _ in range(holdout_batches)]


class _nullfile:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, _):
        pass

    def flush(self):
        pass
