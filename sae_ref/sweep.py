"""A sweep: several SAEs trained in lockstep on one pass over the data.

Sparsity-performance frontiers need several SAEs (k, architectures) trained on the same data.
:func:`fit_sweep` reads, checks, shuffles and moves each batch once, and every member steps on
it; each member's run is bit for bit its own :func:`sae_ref.fit.fit` with the same source,
data seed and batch size (on NumPy; tested), so a sweep is a speed-up and never a different
experiment. Members of one shape share the step's workspace (the [B, h] pre-activations and the
[h, d] gradients, :mod:`sae_ref.workspace`): a sweep holds each member's parameters and Adam
moments, and one set of the step's big arrays per shape.

Layout of ``out``: one run directory per member (``out/<name>/``, the files of a single run:
``metrics.jsonl``, ``checkpoints/``, ``sae/``, ``summary.json``) and ``out/sweep.json``, the
manifest: the members (name, directory, config), the shared data settings, the last step at
which every member running had committed a checkpoint (where ``resume=True`` continues the
whole sweep) and each member's state (running, finished, or stopped with the reason). A member
whose loss stops being finite (read at each log line) is stopped and reported; the others go
on.

Members must share the stream: the batch size, data seed, held-out batches and dtype are the
sweep's arguments, and their configs must agree on ``nonfinite`` (what to do with a NaN batch,
which decides the batches); a sweep that mixes them is refused naming the field. Their
``steps`` may differ: a member that is done stops stepping.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

from sae_ref.fit import (FitResult, RunDirError, _heldout, _loop_args, _Loop, _Member, _split,
                         check_run_dir, data_identity)
from sae_ref.io import _atomic
from sae_ref.train import TrainConfig

MANIFEST = "sweep.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def member_name(config: TrainConfig) -> str:
    """The default directory name of a member: its architecture, and k where it applies."""
    return config.arch if config.k is None or config.arch not in ("topk", "batchtopk") else f"{config.arch}-k{config.k}"


def _names(configs, names) -> list[str]:
    if names is None:
        names = [member_name(c) for c in configs]
    names = [str(n) for n in names]
    if len(names) != len(configs):
        raise ValueError(f"fit_sweep: argument 'names' has {len(names)} names for {len(configs)} configs")
    bad = [n for n in names if not _NAME.match(n)]
    if bad:
        raise ValueError(f"fit_sweep: member names must be plain directory names (letters, digits, "
                         f"'.', '_', '-'), got {bad}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"fit_sweep: two members would share the directory {twice}: give "
                         f"argument 'names'")
    return names


def _check_configs(configs) -> list[TrainConfig]:
    configs = list(configs)
    if not configs:
        raise ValueError("fit_sweep: argument 'configs' is empty: a sweep needs at least one TrainConfig")
    for i, c in enumerate(configs):
        if not isinstance(c, TrainConfig):
            raise TypeError(f"fit_sweep: argument 'configs[{i}]' must be a TrainConfig, got {type(c).__name__}")
    first = configs[0].nonfinite
    for i, c in enumerate(configs):
        if c.nonfinite != first:
            raise ValueError(f"fit_sweep: the members cannot share one batch stream: field "
                             f"'nonfinite' is {first!r} in configs[0] and {c.nonfinite!r} in "
                             f"configs[{i}] (it decides which batches are skipped)")
    return configs


def member_bytes(config: TrainConfig, d: int, batch_size: int, itemsize: int) -> int:
    """An estimate of one member's memory in training, alone (a :func:`~sae_ref.fit.fit`):
    :func:`state_bytes` and :func:`step_bytes`."""
    return state_bytes(config, d, itemsize) + step_bytes(config, d, batch_size, itemsize)


def state_bytes(config: TrainConfig, d: int, itemsize: int) -> int:
    """What a member keeps from step to step: its parameters and Adam's two moments (3 copies
    of 2 d h + h + d values)."""
    return itemsize * 3 * (2 * d * config.h + config.h + d)


def step_bytes(config: TrainConfig, d: int, batch_size: int, itemsize: int) -> int:
    """What a step needs besides the state: the gradients (one copy of the parameters; the
    [h, d] ones in the step's workspace) and the [B, h] arrays (the pre-activations, in the
    workspace, and with AuxK its block and gradient: 3 of them). In a sweep, members of one
    shape share one workspace (their steps run one after another), so this is counted once
    per shape."""
    h = config.h
    blocks = 3 if config.aux_convention else 1
    return itemsize * ((2 * d * h + h + d) + blocks * batch_size * h)


def available_bytes(xp, device) -> int | None:
    """Free memory of the device: CUDA's free bytes for torch-CUDA and CuPy, the host's
    available memory (``MemAvailable``) otherwise; None when it cannot be read."""
    from array_api_compat import is_cupy_namespace, is_torch_namespace

    try:
        if is_torch_namespace(xp) and getattr(device, "type", "cpu") == "cuda":
            import torch

            return int(torch.cuda.mem_get_info(device)[0])
        if is_cupy_namespace(xp):
            import cupy

            return int(cupy.cuda.runtime.memGetInfo()[0])
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, RuntimeError, ImportError):
        return None
    return None


def _check_memory(configs, names, ds, batch_size, itemsize, xp, dev) -> None:
    """Refuse, naming the sizes, a sweep whose members (of input widths ``ds``) cannot all fit
    the device: every member's state, and one step's arrays per shape of member (the
    workspace its members share, :func:`_share_workspaces`)."""
    state = [state_bytes(c, d, itemsize) for c, d in zip(configs, ds)]
    steps: dict = {}
    for c, d in zip(configs, ds):
        key = (d, c.h)
        steps[key] = max(steps.get(key, 0), step_bytes(c, d, batch_size, itemsize))
    need = sum(state) + sum(steps.values())
    free = available_bytes(xp, dev)
    if free is not None and need > free:
        gib = 2 ** 30
        each = ", ".join(f"{n} {b / gib:.2f}" for n, b in zip(names, state))
        raise MemoryError(f"fit_sweep: the members need about {need / gib:.2f} GiB together "
                          f"({each} GiB: parameters and Adam's moments; "
                          f"{sum(steps.values()) / gib:.2f} GiB: the step's gradients and [B, h] "
                          f"arrays, once per shape of member) but the device has "
                          f"{free / gib:.2f} GiB free; train fewer members at once")


def _share_workspaces(members) -> None:
    """Give the members of one shape (d, h, dtype, device) one workspace: their steps run one
    after another, each fills the arrays it reads, and no step's result refers to them
    (:mod:`sae_ref.workspace`), so the results are the same, the sweep keeps one set of the
    step's big arrays per shape instead of one per member, and touches less fresh memory."""
    from array_api_compat import device as device_of

    from sae_ref.workspace import Workspace

    shared: dict = {}
    for m in members:
        W = m.state.params.W_enc
        key = (tuple(W.shape), str(W.dtype), str(device_of(W)))
        m.state = replace(m.state, scratch=shared.setdefault(key, Workspace()))


def _write_manifest(out: Path | None, manifest: dict) -> None:
    if out is None:  # a sweep without files
        return
    _atomic.atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=2).encode())


def _member_states(members, names) -> list[dict]:
    out = []
    for m, n in zip(members, names):
        state = "stopped" if m.stopped else ("finished" if m.state.t >= m.config.steps else "running")
        entry = {"name": n, "dir": n, "step": m.state.t, "state": state, "config": m.config.to_dict(),
                 "data": m.identity["data"]}
        if m.stopped:
            entry["stopped"] = m.stopped
        out.append(entry)
    return out


def fit_sweep(configs, source, *, out, names=None, backend: str = "numpy", device=None,
              dtype: str = "float32", batch_size: int = 4096, checkpoint_every: int | None = None,
              keep: int | None = 3, resume: bool = False, overwrite: bool = False,
              log_every: int = 50, holdout_batches: int = 4, data_seed: int = 0,
              progress: bool = True, prefetch: int | None = None,
              saelens_metadata: dict | None = None) -> list[FitResult]:
    """Train every config of ``configs`` on one batch stream of ``source`` (module docstring).

    Arguments as :func:`sae_ref.fit.fit`, for every member; ``out`` is the sweep directory (None:
    nothing is written, as ``fit(run_dir=None)``) and
    ``names`` the members' directory names (default :func:`member_name`). ``source`` is one
    source for every member, or a sequence of one source per member (e.g. the stores of several
    layers from one harvest, :func:`sae_ref.data.harvest.harvest`): each distinct source is
    read once per step, in lockstep, and each member trains on its own. ``resume``
    continues every member from the sweep's last common checkpoint (``checkpoint_every``
    sets when those are written); ``overwrite`` replaces the runs the member directories
    hold. Returns one :class:`~sae_ref.fit.FitResult` per member, in order; a stopped
    member's summary says why (``"stopped"``).
    """
    configs = _check_configs(configs)
    names = _names(configs, names)
    xp, dev, dt, batch_size, log_every, checkpoint_every, holdout_batches, prefetch = _loop_args(
        "fit_sweep", backend, device, dtype, batch_size, log_every, checkpoint_every,
        holdout_batches, prefetch)
    if resume and overwrite:
        raise ValueError("fit_sweep: resume=True and overwrite=True exclude each other")
    if out is None and (resume or overwrite):
        raise ValueError("fit_sweep: resume=True or overwrite=True needs a sweep directory 'out'")
    out = None if out is None else Path(out)
    manifest = _read_manifest(out) if resume else None
    if out is not None and not resume and (out / MANIFEST).exists() and not overwrite:
        raise RunDirError(f"fit_sweep: '{out}' already holds a sweep ({MANIFEST}); resume it "
                          f"or overwrite it", kind="exists", run=out, contents=MANIFEST)
    if manifest is not None and [m["name"] for m in manifest["members"]] != names:
        raise ValueError(f"fit_sweep: '{out}' holds a sweep of {[m['name'] for m in manifest['members']]}, "
                         f"not of {names}")
    for n in names:
        if out is not None:
            check_run_dir(out / n, resume=resume, overwrite=overwrite)
    sources, feeds = _sources(source, len(configs))
    _check_memory(configs, names, [sources[f].d for f in feeds], batch_size,
                  8 if dtype == "float64" else 4, xp, dev)
    groups = []  # per source: (train_rows, held_rows, identity, stream arguments)
    for src in sources:
        train_rows, held_rows = _split(src, batch_size, holdout_batches)
        identity = {"data": data_identity(src), "batch_size": batch_size, "data_seed": data_seed,
                    "holdout_batches": holdout_batches, "dtype": dtype,
                    "train_rows": None if train_rows is None else list(train_rows)}
        kw = dict(seed=data_seed, xp=xp, device=dev, dtype=dt, nonfinite=configs[0].nonfinite,
                  rows=train_rows)
        groups.append((train_rows, held_rows, identity, kw))
    members = [_Member(c, None if out is None else out / n, backend=backend, identity=groups[f][2], keep=keep)
               for c, n, f in zip(configs, names, feeds)]
    positions = [0] * len(sources)
    if resume:
        positions = _resume(members, feeds, len(sources), manifest, xp, dev)
    firsts = {}

    def first_batch(f):  # one read of batch 0 of each source for every new member
        if f not in firsts:
            firsts[f] = next(sources[f].stream(batch_size, position=0, **groups[f][3]))
        return firsts[f]

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for m, f in zip(members, feeds):
        m.start(lambda f=f: first_batch(f), overwrite)
    firsts.clear()
    _share_workspaces(members)
    identity = groups[0][2]
    base = {"members": None, "data": identity["data"] if len(sources) == 1 else "per member",
            "batch_size": batch_size,
            "data_seed": data_seed, "holdout_batches": holdout_batches, "dtype": dtype,
            "backend": backend, "committed_step": None if manifest is None else manifest.get("committed_step")}

    def commit():
        """Record the step at which every member still stepping has committed a checkpoint
        (members done before it hold their final one)."""
        live = [m for m in members if m.stopped is None]
        if live:
            t = max(m.state.t for m in live)
            going = [m for m in live if m.config.steps >= t]
            if all(m.saved_t == t for m in going):
                base["committed_step"] = t
        base["members"] = _member_states(members, names)
        _write_manifest(out, base)

    commit()
    streams = [src.stream(batch_size, position=p, **g[3]) for src, p, g in zip(sources, positions, groups)]
    loop = _Loop(members, streams, log_every=log_every, checkpoint_every=checkpoint_every,
                 prefetch=prefetch, progress=progress, on_checkpoint=commit, feeds=feeds)
    loop.run()
    for m, f in zip(members, feeds):
        m.checkpoint_if_due(streams[f], final=True)
    held = [_heldout(src, batch_size, holdout_batches, g[1], xp, dev, dt) for src, g in zip(sources, groups)]
    results = [m.finish(sources[f], streams[f], loop, groups[f][1], held[f], saelens_metadata)
               for m, f in zip(members, feeds)]
    base["members"] = _member_states(members, names)
    base["finished"] = True
    _write_manifest(out, base)
    return results


def _read_manifest(out: Path) -> dict:
    path = out / MANIFEST
    if not path.is_file():
        raise RunDirError(f"fit_sweep: '{out}' holds no sweep to resume ({MANIFEST} is missing)",
                          kind="missing", run=out, contents="")
    try:
        manifest = json.loads(path.read_text())
        manifest["members"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"fit_sweep: '{path}' is not a sweep manifest: {e}") from None
    return manifest


def _sources(source, n: int):
    """(the distinct sources, each member's index among them): one source for every member,
    or a sequence of one source per member (e.g. each layer's store of one harvest)."""
    if not isinstance(source, (list, tuple)):
        return [source], [0] * n
    if len(source) != n:
        raise ValueError(f"fit_sweep: argument 'source' lists {len(source)} sources for {n} configs")
    distinct, feeds = [], []
    for src in source:
        at = next((i for i, d in enumerate(distinct) if d is src), None)
        if at is None:
            distinct.append(src)
            at = len(distinct) - 1
        feeds.append(at)
    return distinct, feeds


def _resume(members, feeds, n_sources, manifest, xp, dev) -> list[int]:
    """Load every member at the sweep's last common step; returns each stream's position there."""
    step = manifest.get("committed_step")
    if step is None:
        raise RunDirError(f"fit_sweep: '{members[0].run.parent}' has no common checkpoint of its "
                          f"members to resume from", kind="missing", run=members[0].run.parent, contents="")
    positions = [set() for _ in range(n_sources)]
    for m, f, entry in zip(members, feeds, manifest["members"]):
        if entry.get("stopped"):  # stopped for good: its newest state, not stepped again
            m.load(xp, dev)
            m.stopped = entry["stopped"]
            continue
        if m.config.steps < step:  # finished before the common step
            m.load(xp, dev)
            continue
        positions[f].add(m.load(xp, dev, step=step))
    for p in positions:
        if len(p) > 1:
            raise ValueError(f"fit_sweep: the members' checkpoints of step {step} record different "
                             f"data positions {sorted(p)}")
    return [p.pop() if p else 0 for p in positions]


def load_sweep(out) -> dict:
    """The manifest of the sweep in ``out`` (members, their directories and states)."""
    return _read_manifest(Path(out))


__all__ = ["MANIFEST", "available_bytes", "fit_sweep", "load_sweep", "member_bytes", "member_name",
           "state_bytes", "step_bytes"]
