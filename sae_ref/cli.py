"""The ``sae-ref`` command line.

``sae-ref demo`` runs the main job on its embedded default; ``sae-ref train`` trains one SAE
on an activation store (or on synthetic data with known features) on any backend;
``sae-ref sweep`` trains several in lockstep on one pass over the data;
``sae-ref calibrate`` estimates BatchTopK's theta on a trained SAE's final weights.
Moving a run to a GPU is one flag: ``--backend torch --device cuda`` or ``--backend cupy``.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path

BACKENDS = ["numpy", "torch", "torch-cuda", "cupy", "strict"]
#: Architectures that keep k latents per sample (``--k`` applies to them only).
K_ARCHS = ("topk", "batchtopk")
#: The flag of each field a resumed run must keep (TrainConfig fields without one: --set).
FLAGS = {"data": "--data", "batch_size": "--batch-size", "data_seed": "--data-seed",
         "holdout_batches": "--holdout-batches", "dtype": "--dtype", "arch": "--arch", "h": "--h",
         "k": "--k", "steps": "--steps", "lr": "--lr", "sparsity_coeff": "--sparsity-coeff",
         "seed": "--seed", "afa_coeff": "--afa-coeff", "afa_target": "--afa-target",
         "matmul_precision": "--matmul-precision", "preset": "--preset"}


def _value(text: str):
    """A ``--set`` value: JSON if it parses (numbers, true/false/null, lists), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _train_parser(sub, name: str = "train"):
    sweep = name == "sweep"
    if sweep:
        p = sub.add_parser("sweep", help="train several SAEs in lockstep on one pass over the data",
                           description="Train one SAE per --arch (and per --k for topk and "
                           "batchtopk) on one batch stream: each batch is read once and every "
                           "member steps on it, each ending bit for bit as its own 'sae-ref "
                           "train'. OUT/<member>/ holds each run's files, OUT/sweep.json the "
                           "members; --resume continues the whole sweep.")
    else:
        p = sub.add_parser("train", help="train one SAE (checkpoints, resume, SAELens export)",
                           description="Train one SAE. Every run writes OUT/metrics.jsonl, "
                           "OUT/checkpoints/, OUT/sae/ (SAELens format) and OUT/summary.json. An OUT "
                           "that holds a run is continued with --resume or replaced with --overwrite, "
                           "never written over otherwise.")
    p.add_argument("--data", default="synthetic",
                   help="activation store directory (with manifest.json), or 'synthetic' (default)")
    p.add_argument("--synthetic", default="64,512,4", metavar="D,N,K",
                   help="synthetic source: dimension, true features, mean active features (default 64,512,4)")
    p.add_argument("--backend", default="numpy", choices=BACKENDS)
    p.add_argument("--device", default=None, help="e.g. cuda, cuda:1 (torch) or 0 (cupy)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--matmul-precision", default=None, choices=["highest", "tf32", "bf16"],
                   help="the encoder product's precision: tf32 (CUDA TensorFloat-32 units) or bf16 "
                   "(bfloat16 inputs, float32 sums; torch only); default highest")
    p.add_argument("--preset", default="sae-ref", help="named configuration (see sae_ref.train.PRESETS)")
    if sweep:
        p.add_argument("--arch", default=None, help="comma-separated: batchtopk, topk, jumprelu, "
                       "relu-l1, sqrt-l1, top-afa (default: the preset's)")
        p.add_argument("--k", default=None, help="comma-separated k values for topk and batchtopk")
    else:
        p.add_argument("--arch", default=None, help="batchtopk, topk, jumprelu, relu-l1, sqrt-l1, top-afa")
        p.add_argument("--k", type=int, default=None, help="active latents per sample (TopK, BatchTopK)")
    p.add_argument("--h", type=int, default=None, help="latents (default 16384; synthetic: 8 x D)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--sparsity-coeff", type=float, default=None)
    p.add_argument("--afa-coeff", type=float, default=None,
                   help="coefficient of the AFA loss (any architecture; 0 = off)")
    p.add_argument("--afa-target", default=None, choices=["x", "x_minus_b_dec"],
                   help="AFA loss target: ||x|| (top-AFA authors) or ||x - b_dec|| (default)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other TrainConfig field, e.g. --set aux_coeff=0.05 (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="initialisation seed")
    p.add_argument("--data-seed", type=int, default=0, help="shuffling / sampling seed")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--checkpoint-every", type=int, default=500,
                   help="steps between checkpoints (0: only at the end)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept (newest)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoints (with the run's data, batch size, seeds, "
                   "dtype and config)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run OUT holds (checkpoints/, metrics.jsonl, sae/, "
                   "summary.json) and start a new one")
    p.add_argument("--log-every", type=int, default=50, help="steps between metrics lines")
    p.add_argument("--holdout-batches", type=int, default=4,
                   help="batches at the store's end held out of training (default 4)")
    p.add_argument("--nonfinite", default=None, choices=["raise", "skip"],
                   help="what to do with a batch holding NaN/inf (default: raise)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--prefetch", type=int, default=None,
                   help="batches prepared ahead on a background thread (0: each when it is due; "
                   "default 2 on a GPU, 0 on the CPU)")
    if sweep:
        return p
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel ranks started here (torch.distributed: Gloo on the CPU, NCCL "
                   "with --device cuda, one GPU per rank); --batch-size is the global batch. Under "
                   "torchrun, leave it out: the ranks come from the launcher")
    return p


def _train_rank(rank: int, size: int, argv: list) -> int:
    """One rank of ``sae-ref train --nproc N`` (started by :func:`sae_ref.dist.launch.spawn`)."""
    return main(argv)


def _spawn_train(args) -> int:
    from sae_ref.dist.launch import RankError, spawn

    argv = list(args.argv)
    i = argv.index("--nproc") if "--nproc" in argv else None
    if i is not None:
        del argv[i : i + 2]
    else:
        argv = [a for a in argv if not a.startswith("--nproc=")]
    cuda = (args.device or "").startswith("cuda")
    try:
        spawn(_train_rank, args.nproc, argv, backend="nccl" if cuda else "gloo", timeout_s=600)
    except RankError as e:
        print(f"sae-ref train: error: {e}\nthe last checkpoint in {args.out}/checkpoints is intact: "
              "continue with the same command and --resume (any --nproc)", file=sys.stderr)
        return 1
    return 0


def _at_least(parser, args, flag: str, low: int, what: str = "") -> None:
    value = getattr(args, flag.lstrip("-").replace("-", "_"))
    if value is not None and value < low:
        parser.error(f"{flag} must be >= {low}{what}, got {value}")


def _check_loop_flags(args, parser) -> None:
    """The ranges of the flags train and sweep share, and --resume against --overwrite."""
    _at_least(parser, args, "--batch-size", 1)
    _at_least(parser, args, "--steps", 1)
    _at_least(parser, args, "--log-every", 1)
    _at_least(parser, args, "--checkpoint-every", 0, " (0: a checkpoint at the end only)")
    _at_least(parser, args, "--keep", 1)
    _at_least(parser, args, "--holdout-batches", 0)
    _at_least(parser, args, "--prefetch", 0)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other: --resume continues the run "
                     "in --out, --overwrite deletes it")


def _check_train_flags(args, parser) -> None:
    """The flags' ranges and combinations, before anything is read or written."""
    from sae_ref.train import ARCHS, PRESETS

    _at_least(parser, args, "--nproc", 1)
    _check_loop_flags(args, parser)
    if args.preset not in PRESETS:
        parser.error(f"--preset must be one of {sorted(PRESETS)}, got {args.preset!r}")
    arch = args.arch or PRESETS[args.preset].get("arch", "batchtopk")
    if arch not in ARCHS:
        parser.error(f"--arch must be one of {list(ARCHS)}, got {arch!r}")
    if args.k is not None and arch not in K_ARCHS:
        parser.error(f"--k does not apply to --arch {arch}: only {' and '.join(K_ARCHS)} keep k "
                     "latents per sample (set the sparsity with --sparsity-coeff)")


def _check_out(args) -> str | None:
    """The error line when --out does not fit --resume / --overwrite, else None."""
    from sae_ref.fit import RunDirError, check_run_dir

    try:
        check_run_dir(args.out, resume=args.resume, overwrite=args.overwrite)
    except RunDirError as e:
        return _run_dir_message(e)
    return None


def _run_dir_message(e) -> str:
    if e.kind == "exists":
        return (f"--out '{e.run}' already holds a run ({e.contents}); add --resume to continue "
                "it, or --overwrite to delete it and start again (or choose a new --out)")
    holds = (f"; it holds {e.contents}: start again there with --overwrite" if e.contents
             else "; leave out --resume to start a run there")
    return f"--resume: '{e.run}' has no checkpoint to resume from (no checkpoints/step-*.json){holds}"


def _mismatch_message(e) -> str:
    parts = []
    for name, given, recorded in e.fields:
        flag = FLAGS.get(name, f"--set {name}=...")
        if name == "data":
            parts.append(f"--data gives {given} but the run was trained on {recorded}")
        else:
            parts.append(f"{flag} is {_shown(given)} but the run was trained with {_shown(recorded)}")
    return (f"--resume: '{e.run}' holds another run: " + "; ".join(parts)
            + "; resume with the run's values, or train them in a new --out")


def _shown(v) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def _write_failed(e: OSError, out) -> str:
    """A failed read or write (a full disk): what failed, and that the checkpoints are intact."""
    from sae_ref.io.checkpoint import latest_checkpoint

    newest = latest_checkpoint(Path(out) / "checkpoints")
    fix = "free some space" if e.errno == errno.ENOSPC else "fix the cause"
    if newest is None:
        from sae_ref.fit import _contents

        again = " with --overwrite" if Path(out).is_dir() and _contents(Path(out)) else ""
        return f"{e}; no checkpoint had been written yet: {fix} and start again{again}"
    step = int(newest.stem.split("-")[1])
    return (f"{e}; no checkpoint was lost: the newest, step {step} in '{newest.parent}', is "
            f"intact: {fix} and continue with the same command and --resume")


def _train(args, parser) -> int:
    from sae_ref.dist.launch import comm_from_env, is_torchrun
    from sae_ref.fit import fit

    _check_train_flags(args, parser)
    if args.nproc > 1 and not is_torchrun():
        problem = _check_out(args)
        if problem is not None:
            print(f"sae-ref train: error: {problem}", file=sys.stderr)
            return 2
        return _spawn_train(args)
    comm = comm_from_env() if is_torchrun() else None
    rank = 0 if comm is None else comm.rank

    source = _source(args, parser)
    config = _config(args, parser, source, args.arch, args.k)
    result = fit(config, source, backend=args.backend, device=args.device, dtype=args.dtype,
                 batch_size=args.batch_size, run_dir=args.out, checkpoint_every=args.checkpoint_every,
                 keep=args.keep, resume=args.resume, overwrite=args.overwrite, log_every=args.log_every,
                 holdout_batches=args.holdout_batches, data_seed=args.data_seed,
                 progress=not args.no_progress, comm=comm, prefetch=args.prefetch)
    if rank != 0:
        return 0
    _print_run(args, config, source, result)
    print(f"run directory: {args.out}")
    return 0


def _config(args, parser, source, arch, k):
    """The TrainConfig of the flags (the preset, then the flags and --set), for one --arch / --k."""
    from sae_ref.train import preset

    overrides = {}
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set expects FIELD=VALUE, got {item!r}")
        key, val = item.split("=", 1)
        overrides[key.strip()] = _value(val)
    for flag, field in (("h", "h"), ("steps", "steps"), ("lr", "lr"),
                        ("sparsity_coeff", "sparsity_coeff"), ("seed", "seed"), ("nonfinite", "nonfinite"),
                        ("afa_coeff", "afa_coeff"), ("afa_target", "afa_target"),
                        ("matmul_precision", "matmul_precision")):
        if getattr(args, flag) is not None:
            overrides[field] = getattr(args, flag)
    if arch is not None:
        overrides["arch"] = arch
    if k is not None:
        overrides["k"] = k
    if "h" not in overrides and args.data == "synthetic":
        overrides["h"] = 8 * source.d
    if overrides.get("arch") in ("jumprelu", "relu-l1", "sqrt-l1", "top-afa") and "k" not in overrides:
        overrides["k"] = None
    try:
        return preset(args.preset, **overrides)
    except TypeError as e:
        parser.error(f"--set: {e}")


def _print_run(args, config, source, result) -> None:
    """The lines a finished run prints: its metrics, held-out L0 and theta."""
    s = result.summary
    fm = s.get("final_metrics", {})
    print(f"trained {s['steps']} steps, {s['tokens']:,} tokens on {args.backend}: "
          f"mse({config.loss_unit}) {fm.get('mse', float('nan')):.5f}  nmse {fm.get('nmse', float('nan')):.4f}  "
          f"L0 {fm.get('l0', float('nan')):.2f}  dead {fm.get('dead_fraction', float('nan')):.3f}")
    if "heldout" in s:
        h = s["heldout"]
        line = f"held-out L0: inference {h['l0_inference']:.2f}"
        if "theta" in h:
            line += f" with theta {h['theta']:.4g} ({h['theta_estimator']}) vs k = {config.k}"
        print(line)
    cal = s.get("theta_calibration") or {}
    if "theta" in cal:
        print(f"theta of the final weights {cal['theta']:.4g}: held-out L0 {cal['l0_calibrated']:.2f} "
              f"vs k = {config.k} on rows calibration did not use (the threshold in sae/: {cal['export']})")
    if hasattr(source, "atoms"):
        from sae_ref.arrays import to_numpy
        from sae_ref.data.synthetic import mean_max_cosine

        print(f"mean max cosine to the true features: "
              f"{mean_max_cosine(to_numpy(result.state.params.W_dec), source.atoms):.3f}")


def _sweep_members(args, parser) -> list[tuple[str, int | None]]:
    """(arch, k) of every member: each --arch, and each --k for the architectures that keep k."""
    from sae_ref.train import ARCHS, PRESETS

    _check_loop_flags(args, parser)
    if args.preset not in PRESETS:
        parser.error(f"--preset must be one of {sorted(PRESETS)}, got {args.preset!r}")
    archs = [a.strip() for a in (args.arch or PRESETS[args.preset].get("arch", "batchtopk")).split(",")]
    for a in archs:
        if a not in ARCHS:
            parser.error(f"--arch must list architectures of {list(ARCHS)}, got {a!r}")
    try:
        ks = [int(v) for v in args.k.split(",")] if args.k else [None]
    except ValueError:
        parser.error(f"--k expects comma-separated integers, got {args.k!r}")
    if args.k and not any(a in K_ARCHS for a in archs):
        parser.error(f"--k does not apply to --arch {args.arch}: only {' and '.join(K_ARCHS)} keep k")
    return [(a, k) for a in archs for k in (ks if a in K_ARCHS else [None])]


def _sweep(args, parser) -> int:
    from sae_ref.sweep import fit_sweep

    members = _sweep_members(args, parser)
    source = _source(args, parser)
    configs = [_config(args, parser, source, a, k) for a, k in members]
    results = fit_sweep(configs, source, out=args.out, backend=args.backend, device=args.device,
                        dtype=args.dtype, batch_size=args.batch_size,
                        checkpoint_every=args.checkpoint_every, keep=args.keep, resume=args.resume,
                        overwrite=args.overwrite, log_every=args.log_every,
                        holdout_batches=args.holdout_batches, data_seed=args.data_seed,
                        progress=not args.no_progress, prefetch=args.prefetch)
    for config, result in zip(configs, results):
        print(f"--- {config.arch}" + (f" k={config.k}" if config.k is not None and config.arch in K_ARCHS else ""))
        if "stopped" in result.summary:
            print(f"stopped: {result.summary['stopped']}")
            continue
        _print_run(args, config, source, result)
    print(f"sweep directory: {args.out} (members in sweep.json)")
    return 0


def _source(args, parser):
    if args.data == "synthetic":
        from sae_ref.data.synthetic import SyntheticSource

        try:
            d, n, k = args.synthetic.split(",")
            return SyntheticSource(int(d), int(n), k=float(k), seed=args.data_seed)
        except ValueError as e:
            parser.error(f"--synthetic expects D,N,K (e.g. 64,512,4): {e}")
    from sae_ref.data.store import ActivationStore

    return ActivationStore(args.data)


def _demo(args, parser) -> int:
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.synthetic:
        from sae_ref.demo import run

        run(tuple(args.backend or ("numpy", "torch")), steps=args.steps, seed=args.seed)
        return 0
    from dataclasses import replace

    from sae_ref.demo_real import DemoConfig, run

    cfg = DemoConfig(backend=(args.backend or ["numpy"])[0], seed=args.seed)
    if args.tokens is not None:
        cfg = replace(cfg, tokens=args.tokens)
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    if args.ks is not None:
        try:
            cfg = replace(cfg, ks=tuple(int(v) for v in args.ks.split(",")))
        except ValueError:
            parser.error(f"--ks expects comma-separated integers, got {args.ks!r}")
    try:
        run(args.out, cfg)
    except ImportError as e:
        print(f"sae-ref demo: error: {e}", file=sys.stderr)
        return 2
    return 0


def _report_parser(sub):
    p = sub.add_parser("report", help="evaluate trained SAEs on a held-out store; metrics, ZF, "
                       "pruning, frontier fits; writes OUT/report.md",
                       description="Evaluate run directories (or SAELens directories) on the last "
                       "rows of an activation store and write OUT/report.md, OUT/results.json and "
                       "OUT/figures/.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run or SAELens directories")
    p.add_argument("--data", required=True, help="activation store directory")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--eval-rows", type=int, default=8192, help="held-out tail of the store (default 8192)")
    p.add_argument("--ref-rows", type=int, default=16384,
                   help="rows before the tail for the frozen pruning statistics (default 16384)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--prune", action="append", default=[], metavar="RUN_NAME",
                   help="prune this run (its directory name; 'all' for every run; repeatable)")
    p.add_argument("--downstream", default="auto", choices=["auto", "none"],
                   help="auto: the sentence-embedding metric when the store came from the packaged model")
    p.add_argument("--eval-docs", type=int, default=64)
    p.add_argument("--backend", default="numpy", choices=BACKENDS)
    p.add_argument("--device", default=None)
    p.add_argument("--nonfinite", default="raise", choices=["raise", "skip"],
                   help="what to do with an evaluation batch holding NaN/inf (default: raise)")
    return p


def _report(args, parser) -> int:
    from sae_ref.data.store import ActivationStore
    from sae_ref.report import ReportConfig, build_report, heldout_overlaps

    for flag in ("--eval-rows", "--batch-size", "--eval-docs"):
        _at_least(parser, args, flag, 1)
    _at_least(parser, args, "--ref-rows", 0)
    store = ActivationStore(args.data)
    overlaps = heldout_overlaps(args.runs, store, args.eval_rows)
    if overlaps:
        runs = "; ".join(f"'{r}' held out only the last {n:,}" for r, n in overlaps)
        print(f"sae-ref report: error: --eval-rows {args.eval_rows:,} reaches into rows that runs "
              f"trained on ({runs} of the {store.n_rows:,} rows of '{store.directory}'); pass "
              f"--eval-rows {min(n for _, n in overlaps)} or less", file=sys.stderr)
        return 2
    cfg = ReportConfig(eval_rows=args.eval_rows, ref_rows=args.ref_rows, batch_size=args.batch_size,
                       prune=tuple(args.prune), downstream=args.downstream, eval_docs=args.eval_docs,
                       backend=args.backend, device=args.device, nonfinite=args.nonfinite)
    build_report(args.runs, store, args.out, config=cfg)
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _calibrate_parser(sub):
    p = sub.add_parser("calibrate", help="BatchTopK: estimate theta on the final weights of a run "
                       "or SAELens directory and record it (and export it)",
                       description="Estimate BatchTopK's inference threshold theta on the SAE's "
                       "final weights: the mean over calibration batches (of the training batch "
                       "size) of the smallest kept value, with its standard error, and the held-out "
                       "L0 it gives next to the running estimate's. Recorded in the run's "
                       "summary.json, newest checkpoint and sae/cfg.json (or the SAELens cfg.json).")
    p.add_argument("path", metavar="RUN_DIR", help="run directory or SAELens directory")
    p.add_argument("--data", required=True, help="activation store directory")
    p.add_argument("--batch-size", type=int, default=None,
                   help="calibration batch rows (default: the run's training batch size)")
    p.add_argument("--batches", type=int, default=4,
                   help="calibration batches when the run's held-out rows are unknown (default 4)")
    p.add_argument("--rows", default=None, metavar="START:END",
                   help="rows to use: the first half of their batches calibrates, the rest measures L0 "
                   "(default: the run's held-out tail)")
    p.add_argument("--k", type=int, default=None, help="k of a SAELens directory that does not record it")
    p.add_argument("--export-theta", default="calibrated", choices=["calibrated", "running"],
                   help="which theta the SAELens threshold holds (default: calibrated, the final model's)")
    p.add_argument("--dry-run", action="store_true", help="print the estimate, write nothing")
    p.add_argument("--backend", default="numpy", choices=BACKENDS)
    p.add_argument("--device", default=None)
    return p


def _calibrate(args, parser) -> int:
    from sae_ref.calibrate import calibrate_path

    rows = None
    if args.rows is not None:
        try:
            a, b = (int(v) for v in args.rows.split(":"))
        except ValueError:
            parser.error(f"--rows expects START:END, got {args.rows!r}")
        rows = (a, b)
    for flag in ("--batch-size", "--batches", "--k"):
        _at_least(parser, args, flag, 1)
    rec = calibrate_path(args.path, args.data, batch_size=args.batch_size, batches=args.batches,
                         rows=rows, k=args.k, export=args.export_theta, write=not args.dry_run,
                         backend=args.backend, device=args.device)
    run = rec["theta_running"]
    se = "–" if rec["stderr"] is None else f"{rec['stderr']:.2g}"
    print(f"theta (final weights) {rec['theta']:.6g} ± {se} from {rec['batches']} batches "
          f"of {rec['batch_size']} (rows {rec['calibration_rows'][0]}–{rec['calibration_rows'][1]}); "
          f"held-out L0 {rec['l0_calibrated']:.2f} for k = {rec['k']}"
          + (f"; running estimate {run:.6g}: L0 {rec['l0_running']:.2f}" if run is not None else "")
          + ("" if args.dry_run else f"; exported: {args.export_theta}")
          + ("  (rows not checked to be unseen by training)" if rec.get("unchecked") else ""))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "validate":  # its own parser: sae_ref.validation.cli
        from sae_ref.validation.cli import main as validate

        return validate(argv[1:])
    parser = argparse.ArgumentParser(prog="sae-ref", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job: SAEs on real activations of a packaged model "
                          "(offline), evaluated downstream; --synthetic for the cross-backend demo")
    demo.add_argument("--synthetic", action="store_true",
                      help="instead: a BatchTopK SAE on synthetic data on each backend")
    demo.add_argument("--backend", action="append", choices=BACKENDS,
                      help="training backend (default numpy; repeatable with --synthetic: "
                      "default numpy and torch)")
    demo.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    demo.add_argument("--tokens", type=int, default=None, help="activations to harvest (default 262144)")
    demo.add_argument("--ks", default=None, help="comma-separated k values (default 8,16,32,64)")
    demo.add_argument("--steps", type=int, default=None, help="training steps per SAE")
    demo.add_argument("--seed", type=int, default=0)
    _train_parser(sub)
    _train_parser(sub, "sweep")
    _report_parser(sub)
    _calibrate_parser(sub)
    sub.add_parser("validate", add_help=False, help="check an SAE implementation (a module's "
                   "object, or SAELens files) against sae-ref's invariants; sae-ref validate --help")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command == "demo":
        return _demo(args, parser)
    run = {"train": _train, "sweep": _sweep, "report": _report, "calibrate": _calibrate}[args.command]
    try:
        return run(args, parser)
    except Exception as e:  # noqa: BLE001 (the known ones become one line; others propagate)
        line = _error_line(args, e)
        if line is None:
            raise
        print(f"sae-ref {args.command}: error: {line}", file=sys.stderr)
        return 2


def _error_line(args, e: Exception) -> str | None:
    """The one-line message of an expected error (bad input, missing file or package, a full
    disk), with the command's flags where the library names its arguments; None: a bug."""
    from sae_ref.data.stream import NonFiniteBatch
    from sae_ref.fit import RunDirError, RunMismatch

    if isinstance(e, RunDirError):
        return _run_dir_message(e)
    if isinstance(e, RunMismatch):
        return _mismatch_message(e)
    if isinstance(e, NonFiniteBatch):
        return f"{e.detail}; pass --nonfinite skip to leave such batches out"
    if isinstance(e, (ValueError, FileNotFoundError, NotImplementedError, ImportError, MemoryError)):
        return str(e)
    if isinstance(e, OSError):
        return _write_failed(e, args.out) if args.command == "train" else str(e)
    return None


if __name__ == "__main__":
    sys.exit(main())
