"""The training loop at the edge: data in, :func:`sae_ref.train.step`, files and progress out.

:func:`fit` runs a :class:`~sae_ref.train.TrainConfig` on a data source (an
:class:`~sae_ref.data.store.ActivationStore` or a
:class:`~sae_ref.data.synthetic.SyntheticSource`) on one backend, and writes into ``run_dir``:

- ``checkpoints/step-*.safetensors`` + ``.json``: the whole state (parameters, Adam moments,
  counters, the theta estimator, the data position, the config, and what decides the batches:
  the data, ``batch_size``, ``data_seed``, ``holdout_batches``, ``dtype``), atomically, every
  ``checkpoint_every`` steps and at the end; ``resume=True`` continues from the newest one
  exactly (bit for bit on NumPy: the data stream is a function of its position);
- ``metrics.jsonl``: one line every ``log_every`` steps (the only host reads of the metrics);
- ``sae/``: the trained SAE in the SAELens format (BatchTopK as JumpReLU with theta; top-AFA
  has no SAELens architecture and is kept in the checkpoint only);
- ``summary.json``: final metrics, the loop's tokens/s and data-wait share, the rows trained
  on and held out, and, for BatchTopK, the inference L0 that theta gives on held-out batches
  next to k, with theta of the final weights calibrated on held-out rows
  (``theta_calibration``, :mod:`sae_ref.calibrate`; the export uses it by default).

A run directory that holds a run (any of :data:`RUN_FILES`) is never written over by
accident: a new run there needs ``overwrite=True`` (which deletes the old run's files first),
and ``resume=True`` needs a checkpoint to resume from (:class:`RunDirError` otherwise).
Resuming with anything that decides the batches or the steps changed (the data, the batch
size, the data seed, the held-out batches, the dtype, a config field other than
``nonfinite``) raises :class:`RunMismatch` naming each field and both values. Temporary
files left by a process killed inside a write are removed when a run starts.

:func:`load_run` reads a trained SAE back (from the newest checkpoint, or from a SAELens
directory) for evaluation.

Batches are checked for NaN/inf on the host before they move to the device (raise, or skip
and count with ``nonfinite="skip"``), so the steps themselves never sync; on a GPU they are
made ahead on a background thread (``prefetch``). The loop itself (a member per SAE, one
batch stream) is shared with :func:`sae_ref.sweep.fit_sweep`, which trains several SAEs on
one pass over the data.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
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
#: What :func:`fit` writes into a run directory: a directory holding any of them holds a run.
RUN_FILES = ("checkpoints", "metrics.jsonl", "sae", "summary.json")
#: The fields of a run's identity besides its config: a resume must give the same values.
IDENTITY = ("data", "batch_size", "data_seed", "holdout_batches", "dtype")


class RunDirError(ValueError):
    """A run directory does not fit the request: it holds a run and neither ``resume`` nor
    ``overwrite`` was asked for (``kind="exists"``), or ``resume`` was asked for and it has
    no checkpoint (``kind="no-checkpoint"``). ``run`` is the directory and ``contents`` what
    it holds (e.g. ``"checkpoints/ (newest step 600), metrics.jsonl (12 lines)"``)."""

    def __init__(self, message: str, *, kind: str, run: Path, contents: str):
        super().__init__(message)
        self.kind, self.run, self.contents = kind, run, contents


class RunMismatch(ValueError):
    """A resume asked for another run than the checkpoint holds.

    ``fields`` lists ``(name, given, recorded)`` for each differing field: a config field, or
    one of :data:`IDENTITY` (``data`` values are the data's descriptions).
    """

    def __init__(self, run: Path, fields: list[tuple[str, Any, Any]]):
        self.run, self.fields = run, fields
        diffs = "; ".join(f"{name} is {given!r} but the run was trained with {recorded!r}"
                          for name, given, recorded in fields)
        super().__init__(f"fit: cannot resume the run in '{run}': {diffs}; resume with the "
                         "run's values or start a new run_dir")


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


def data_identity(source) -> dict:
    """What identifies a data source's content: ``{"source": description, "fingerprint": str}``.

    A store is identified by its shards' checksums (the same store copied elsewhere is the
    same data), a synthetic source by its parameters; another source has no fingerprint
    (None: not compared on resume).
    """
    from sae_ref.data.store import ActivationStore
    from sae_ref.data.synthetic import SyntheticSource

    if isinstance(source, ActivationStore):
        return {"source": f"store '{source.directory}' ({source.n_rows} rows, d={source.d})",
                "fingerprint": source.fingerprint()}
    if isinstance(source, SyntheticSource):
        return {"source": repr(source), "fingerprint": repr(source)}
    return {"source": type(source).__name__, "fingerprint": None}


def _contents(run: Path) -> str:
    """What a run directory holds of :data:`RUN_FILES`, described ("" when none)."""
    out = []
    for name in RUN_FILES:
        p = run / name
        if name == "checkpoints":
            newest = latest_checkpoint(p)
            others = [q for q in p.iterdir() if not _atomic.is_temp_name(q.name)] if p.is_dir() else []
            if newest is not None:
                out.append(f"checkpoints/ (newest step {int(newest.stem.split('-')[1])})")
            elif others:
                out.append("checkpoints/ (no committed checkpoint)")
        elif name == "metrics.jsonl" and p.is_file():
            out.append(f"metrics.jsonl ({len(p.read_bytes().splitlines())} lines)")
        elif p.exists():
            out.append(name + ("/" if p.is_dir() else ""))
    return ", ".join(out)


def check_run_dir(run_dir, *, resume: bool = False, overwrite: bool = False) -> None:
    """Raise :class:`RunDirError` if starting a run in ``run_dir`` would write over a run
    (it holds one, and neither ``resume`` nor ``overwrite``) or ``resume`` has nothing to
    resume (no committed checkpoint). Reads only; a missing directory is a fresh one."""
    if resume and overwrite:
        raise ValueError("fit: arguments 'resume' and 'overwrite' exclude each other")
    run = Path(run_dir)
    contents = _contents(run) if run.is_dir() else ""
    if resume and latest_checkpoint(run / "checkpoints") is None:
        raise RunDirError(f"fit: resume=True but run_dir '{run}' has no checkpoint to resume from "
                          f"(no checkpoints/step-*.json){'; it holds ' + contents if contents else ''}",
                          kind="no-checkpoint", run=run, contents=contents)
    if contents and not resume and not overwrite:
        raise RunDirError(f"fit: run_dir '{run}' already holds a run ({contents}); pass "
                          "resume=True to continue it or overwrite=True to replace it",
                          kind="exists", run=run, contents=contents)


def _clear(run: Path, overwrite: bool) -> None:
    """Delete the old run's files (with ``overwrite``) and temporary files left by a kill."""
    if overwrite:
        for name in RUN_FILES:
            p = run / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    for d in (run, run / "checkpoints", run / "sae"):
        if d.is_dir():
            for p in d.iterdir():
                if _atomic.is_temp_name(p.name) and p.is_file():
                    p.unlink()


def _check_same_run(run: Path, meta: dict, identity: dict, config: TrainConfig) -> None:
    """RunMismatch listing what differs between the checkpoint's run and the one asked for."""
    diffs = []
    for name in IDENTITY:
        if name not in meta or (name == "holdout_batches" and identity["train_rows"] is None):
            continue  # older checkpoints lack some fields; an endless source holds no rows out
        got, had = identity[name], meta[name]
        if name == "data":
            prints = (got["fingerprint"], had.get("fingerprint"))
            if None not in prints and prints[0] != prints[1]:
                diffs.append(("data", got["source"], had.get("source")))
        elif got != had:
            diffs.append((name, got, had))
    if diffs:  # before the config: a dtype mismatch would fail later, less clearly
        raise RunMismatch(run, diffs)
    mine, theirs = config.to_dict(), meta["config"]
    diffs = [(k, mine[k], theirs.get(k)) for k in mine
             if k not in ("nonfinite", "cuda_graphs") and mine[k] != theirs.get(k)]
    if diffs:
        raise RunMismatch(run, diffs)


def _write_error(e: OSError, path: Path) -> OSError:
    """``e`` naming the file that was being written (a full disk names none)."""
    if e.errno is None:
        return e
    return OSError(e.errno, f"{e.strerror} while writing", str(path))


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
        overwrite: bool = False, log_every: int = 50, holdout_batches: int = 4,
        data_seed: int = 0, progress: bool = True, saelens_metadata: dict | None = None,
        comm=None, prefetch: int | None = None) -> FitResult:
    """Train ``config`` on ``source`` for ``config.steps`` steps (see the module docstring).

    ``resume``: continue the run in ``run_dir`` from its newest checkpoint (one must exist;
    everything that decides the batches must match, else :class:`RunMismatch`).
    ``overwrite``: delete the run ``run_dir`` holds (its :data:`RUN_FILES`) and start anew;
    without it a ``run_dir`` holding a run raises :class:`RunDirError`. Everything is
    checked before the old run is deleted. ``checkpoint_every`` None or 0: one checkpoint,
    at the end.

    ``prefetch``: how many batches a background thread prepares ahead of the step (reading,
    shuffling, checking, converting and, on a GPU, copying on a side stream;
    :meth:`~sae_ref.data.stream.BatchStream.prefetch`); 0 makes each batch when it is due.
    Default: 2 on a GPU, 0 on the CPU (where the thread takes cores from the step: measured
    0.90 of the bare step's rate with it, 0.97 without, on 2 cores). The batches are the
    same either way. The log's ``tokens_per_s`` and ``data_wait`` (the
    share of the loop's time spent waiting for a batch) show whether the data keeps up.

    ``comm`` (a :class:`sae_ref.dist.Comm` of R > 1 ranks, e.g. from
    :func:`sae_ref.dist.comm_from_env` under ``torchrun``): data-parallel training. Every rank
    reads the same global batches of ``batch_size`` rows (so the data order, resuming and the
    results do not depend on R) and trains on its ``batch_size / R`` rows; the ranks' steps
    equal one process's step on the global batch (:mod:`sae_ref.dist.data_parallel`). Rank 0
    alone writes the log, checkpoints and exports; a run resumes with any number of ranks.
    """
    xp, dev, dt, batch_size, log_every, checkpoint_every, holdout_batches, prefetch = _loop_args(
        "fit", backend, device, dtype, batch_size, log_every, checkpoint_every, holdout_batches, prefetch)
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
    if (resume or overwrite) and run is None:
        raise ValueError("fit: resume=True or overwrite=True needs a run_dir")
    if run is not None and (writer or resume):  # other ranks: rank 0 may be writing already
        check_run_dir(run, resume=resume, overwrite=overwrite)
    identity = {"data": data_identity(source), "batch_size": batch_size, "data_seed": data_seed,
                "holdout_batches": holdout_batches, "dtype": dtype,
                "train_rows": None if train_rows is None else list(train_rows)}
    member = _Member(config, run, backend=backend, identity=identity, keep=keep, writer=writer)
    position = member.load(xp, dev) if resume else 0
    stream_kw = dict(seed=data_seed, xp=xp, device=dev, dtype=dt, nonfinite=config.nonfinite, rows=train_rows)
    member.start(lambda: next(source.stream(batch_size, position=0, **stream_kw)), overwrite)
    stream = source.stream(batch_size, position=position, **stream_kw)
    loop = _Loop([member], stream, log_every=log_every, checkpoint_every=checkpoint_every,
                 prefetch=prefetch, progress=progress, batch_rows=rows if size > 1 else None,
                 comm=comm)
    loop.run()
    member.checkpoint_if_due(stream, final=True)
    return member.finish(source, stream, loop, held_rows,
                         _heldout(source, batch_size, holdout_batches, held_rows, xp, dev, dt)
                         if writer else None, saelens_metadata)


def _loop_args(op, backend, device, dtype, batch_size, log_every, checkpoint_every,
               holdout_batches, prefetch):
    """The training loop's arguments checked (``op`` names the function in errors), with the
    backend's namespace, device and dtype and the default prefetching resolved."""
    xp, dev = resolve(backend, device)
    dt = _dtype(xp, dtype)
    batch_size = C.integer_in(op, "batch_size", batch_size, 1, 2**40)
    log_every = C.integer_in(op, "log_every", log_every, 1, 2**62)
    if checkpoint_every is not None:
        checkpoint_every = C.integer_in(op, "checkpoint_every", checkpoint_every, 0, 2**62)
    holdout_batches = C.integer_in(op, "holdout_batches", holdout_batches, 0, 2**40)
    prefetch = default_prefetch(xp, dev) if prefetch is None else C.integer_in(op, "prefetch", prefetch, 0, 2**20)
    return xp, dev, dt, batch_size, log_every, checkpoint_every, holdout_batches, prefetch


def default_prefetch(xp, device) -> int:
    """Batches made ahead by default: 2 on a GPU, where the host is idle while the device
    steps; 0 on the CPU, where a reading thread competes with the step for the cores."""
    from sae_ref.data.stream import on_gpu

    return 2 if on_gpu(xp, device) else 0


class _Member:
    """One SAE of a training loop: its state, its run directory (log, checkpoints, summary,
    export) and what it has logged. :func:`fit` trains one; :func:`sae_ref.sweep.fit_sweep`
    trains several on one batch stream."""

    def __init__(self, config: TrainConfig, run: Path | None, *, backend: str, identity: dict,
                 keep: int | None, writer: bool = True):
        self.config, self.backend, self.identity, self.keep = config, backend, identity, keep
        self.run = run if writer else None
        self.resume_dir = run  # every rank reads the checkpoint it resumes from
        self.state, self.skipped, self.saved_t = None, 0, None
        self.last, self.log, self.stopped = {}, None, None

    @property
    def ckpt_dir(self) -> Path | None:
        return None if self.run is None else self.run / "checkpoints"

    def load(self, xp, dev, step: int | None = None) -> int:
        """Resume from the newest checkpoint (or that of ``step``); returns its data position."""
        from sae_ref.io.checkpoint import checkpoint_at

        where = self.resume_dir / "checkpoints"
        if step is not None:
            where = checkpoint_at(where, step)
            if where is None:
                raise RunDirError(f"'{self.resume_dir}' has no checkpoint of step {step}, the "
                                  f"sweep's last common step", kind="sweep", run=self.resume_dir,
                                  contents=_contents(self.resume_dir))
        arrays, meta, self.saved_t = load_checkpoint(where)
        _check_same_run(self.resume_dir, meta, self.identity, self.config)
        state = state_from_arrays(arrays, meta, xp=xp, device=dev)
        if state.config != self.config:  # only nonfinite may differ: what to do with a NaN batch
            state = replace(state, config=self.config)
        self.state, self.skipped = state, meta["data_skipped"]
        return meta["data_position"]

    def start(self, first_batch, overwrite: bool) -> None:
        """Initialise a new state from ``first_batch()`` (unless resumed) and open the run
        directory (the old run removed first with ``overwrite``)."""
        if self.state is None:
            self.state = init_state(self.config, first_batch())
        self.tokens0 = self.state.tokens
        if self.run is not None:
            _clear(self.run, overwrite)  # nothing failed so far: the old run may go
            self.run.mkdir(parents=True, exist_ok=True)
            _trim_log(self.run / "metrics.jsonl", self.state.t)

    @property
    def active(self) -> bool:
        return self.stopped is None and self.state.t < self.config.steps

    def step(self, x, comm=None):
        self.state, metrics = step(self.state, x, check=False, donate=True, comm=comm)
        return metrics

    def record(self, metrics, stream, loop) -> None:
        """Log this step when due; stop a member whose loss is no longer finite."""
        t = self.state.t
        if not (t % loop.log_every == 0 or t == self.config.steps):
            return
        last = _read_metrics(metrics)
        elapsed = max(time.perf_counter() - loop.t0, 1e-9)
        last.update(tokens_per_s=(self.state.tokens - self.tokens0) / elapsed,
                    data_wait=loop.waited / elapsed, skipped=self.skipped + stream.skipped,
                    mse_unit=self.config.loss_unit)
        self.last = last
        if self.log is not None:
            path = self.run / "metrics.jsonl"
            try:
                self.log.write(json.dumps(last) + "\n")
                self.log.flush()
            except OSError as e:
                raise _write_error(e, path) from e
        if loop.many and not math.isfinite(last.get("loss", 0.0)):
            self.stopped = f"the loss is {last.get('loss')} at step {t}: stopped, the others go on"

    def checkpoint_if_due(self, stream, every=None, final: bool = False) -> bool:
        """Write a checkpoint of this step when due (every ``every`` steps, or ``final``);
        returns whether one was written."""
        if self.ckpt_dir is None or self.stopped is not None:
            return False
        t = self.state.t
        if final and self.saved_t == t:  # a resumed finished run: already saved
            return False
        if not (final or (every and t % every == 0)):
            return False
        arrays, meta = state_arrays(self.state)
        meta.update(data_position=stream.position, data_skipped=self.skipped + stream.skipped,
                    backend=self.backend, **self.identity)
        save_checkpoint(self.ckpt_dir, t, arrays, meta, keep=self.keep)
        self.saved_t = t
        return True

    def finish(self, source, stream, loop, held_rows, held, saelens_metadata) -> FitResult:
        """The summary, the held-out L0, the export and theta's calibration of a finished run."""
        state, config, identity = self.state, self.config, self.identity
        elapsed = max(time.perf_counter() - loop.t0, 1e-9)
        summary = {"steps": state.t, "tokens": state.tokens, "skipped": self.skipped + stream.skipped,
                   "tokens_per_s": (state.tokens - self.tokens0) / elapsed,
                   "data_wait": loop.waited / elapsed,
                   "config": config.to_dict(), "backend": self.backend, "dtype": identity["dtype"],
                   "final_metrics": self.last, "k": config.k, "data": identity["data"],
                   "batch_size": identity["batch_size"], "data_seed": identity["data_seed"],
                   "holdout_batches": identity["holdout_batches"], "train_rows": identity["train_rows"],
                   "heldout_rows": None if held_rows is None else list(held_rows)}
        run = self.run
        if self.stopped is not None:  # no export or evaluation of a diverged model
            summary["stopped"] = self.stopped
            if run is not None:
                _atomic.atomic_write_bytes(run / "summary.json", json.dumps(summary, indent=2).encode())
            return FitResult(state, summary)
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
        if held is not None:  # BatchTopK: theta of the final weights, beside the running estimate (sae_ref.calibrate)
            from sae_ref.calibrate import calibrate_fit

            summary = calibrate_fit(state, source, summary, run)
        return FitResult(state, summary)


class _Loop:
    """The training loop shared by one run and a sweep: at each step every stream gives one
    batch (made ahead on a thread with ``prefetch``) and every active member steps on its own
    stream's batch (``streams[feeds[i]]`` for member ``i``; one stream unless a sweep pairs
    members with several sources), logs and checkpoints."""

    def __init__(self, members, streams, *, log_every, checkpoint_every, prefetch, progress,
                 batch_rows=None, comm=None, on_checkpoint=None, feeds=None):
        self.members = members
        self.streams = list(streams) if isinstance(streams, (list, tuple)) else [streams]
        self.feeds = list(feeds) if feeds is not None else [0] * len(members)
        self.log_every, self.checkpoint_every = log_every, checkpoint_every
        self.prefetch, self.progress = prefetch, progress
        self.batch_rows, self.comm, self.on_checkpoint = batch_rows, comm, on_checkpoint
        self.many = len(members) > 1
        self.waited, self.t0 = 0.0, time.perf_counter()

    def run(self) -> None:
        members, streams, feeds = self.members, self.streams, self.feeds
        total = max(m.config.steps for m in members)
        done = min(m.state.t for m in members)
        bar = tqdm(total=total, initial=done, disable=not self.progress, unit="step",
                   dynamic_ncols=True)
        self.t0 = time.perf_counter()
        with C.no_checks(), contextlib.ExitStack() as files:
            for j, stream in enumerate(streams):
                files.enter_context(_closing(stream))
                if self.prefetch and hasattr(stream, "prefetch") and any(
                        m.active for m, f in zip(members, feeds) if f == j):
                    stream.prefetch(self.prefetch)
            for m in members:
                path = None if m.run is None else m.run / "metrics.jsonl"
                m.log = None if path is None else files.enter_context(open(path, "a"))
            while any(m.active for m in members):
                w0 = time.perf_counter()
                xs = [next(stream) if any(m.active for m, f in zip(members, feeds) if f == j) else None
                      for j, stream in enumerate(streams)]
                self.waited += time.perf_counter() - w0
                if self.batch_rows is not None:
                    xs = [x if x is None else x[self.batch_rows] for x in xs]
                for m, f in zip(members, feeds):
                    if m.active:
                        m.record(m.step(xs[f], self.comm), streams[f], self)
                bar.update(1)
                self._postfix(bar)
                # a member that is done commits its last step at once
                saved = [m.checkpoint_if_due(streams[f], self.checkpoint_every,
                                             final=m.state.t == m.config.steps)
                         for m, f in zip(members, feeds)]
                if self.on_checkpoint is not None and any(saved):
                    self.on_checkpoint()
            for m in members:
                m.log = None
        bar.close()

    def _postfix(self, bar) -> None:
        m = self.members[0]
        last = m.last
        if not last or m.state.t % self.log_every:
            return
        tokens = sum(k.state.tokens - k.tokens0 for k in self.members)
        rate = tokens / max(time.perf_counter() - self.t0, 1e-9)
        if self.many:
            bar.set_postfix(members=sum(k.active for k in self.members), tok_s=f"{rate:,.0f}",
                            data_wait=f"{last['data_wait']:.0%}")
        else:
            bar.set_postfix(L0=f"{last['l0']:.2f}", NMSE=f"{last['nmse']:.4f}",
                            dead=f"{last['dead_fraction']:.3f}", tok_s=f"{rate:,.0f}",
                            data_wait=f"{last['data_wait']:.0%}")


def trained_rows(path) -> dict | None:
    """What a run directory trained on: ``{"fingerprint", "source", "train_rows"}`` from its
    newest checkpoint's record (or its summary), None when unknown (a SAELens directory, a
    run of an older sae-ref, an endless source)."""
    path = Path(path)
    meta = None
    newest = latest_checkpoint(path / "checkpoints")
    try:
        if newest is not None:
            meta = json.loads(newest.read_text())["meta"]
        elif (path / "summary.json").is_file():
            meta = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("data"), dict) or not meta.get("train_rows"):
        return None
    return {"fingerprint": meta["data"].get("fingerprint"), "source": meta["data"].get("source"),
            "train_rows": tuple(meta["train_rows"])}


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


@contextlib.contextmanager
def _closing(stream):
    """Stop the stream's prefetching thread when the loop ends, by error or Ctrl-C too."""
    try:
        yield stream
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


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
