"""``sae-ref validate``: run the checks on a module, a function or a saved SAE.

``TARGET`` is one of

- ``MODULE:ATTR`` or ``path/to/file.py:ATTR``: a torch ``nn.Module`` SAE is checked end to end
  (:func:`~sae_ref.validation.checks_sae.check_sae`); a function is checked with the check
  named by ``--check`` (``--call`` calls ``ATTR()`` first, for a factory);
- a SAELens directory (``cfg.json`` + ``sae_weights.safetensors``): with sae-lens installed
  the SAE it loads is checked end to end, and sae-ref's own reading of the files
  (:func:`sae_ref.io.saelens.load_saelens`) must describe the same function; without
  sae-lens only sae-ref's reading is checked;
- ``sae-ref``: every check on sae-ref's own implementations (a self-test).

The report is printed; ``--json PATH`` also writes it. The exit status is 0 when every
invariant holds, 1 when one is broken, 2 for a usage error.

>>> from sae_ref.validation.cli import main
>>> main(["sae-ref", "--only", "topk", "--max-examples", "3", "--quiet"])
sae-ref: 7 invariant(s), all hold
0
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

from sae_ref.validation.report import Outcome, Report

SELF = "sae-ref"
#: ``--check`` names for the callables a check takes by keyword: (check, keyword).
ALIASES = {"jumprelu_vjp": ("jumprelu", "vjp"), "jumprelu_step_vjp": ("jumprelu", "step_vjp"),
           "decoder_step": ("decoder_constraint", "step")}


def build_parser(prog: str = "sae-ref validate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Check an SAE implementation against sae-ref's invariants.")
    p.add_argument("target", nargs="?", default=None,
                   help="MODULE:ATTR, path/to/file.py:ATTR, a SAELens directory, or 'sae-ref'")
    p.add_argument("--check", default=None, help="the check to run on a function (see --list)")
    p.add_argument("--list", action="store_true", help="list the checks and exit")
    p.add_argument("--call", action="store_true", help="call ATTR() first (a factory of the module or function)")
    p.add_argument("--xp", default="numpy", choices=["numpy", "torch"], help="the function's array library")
    p.add_argument("--device", default=None, help="the function's device (torch), e.g. cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="input dtype of function checks")
    p.add_argument("--max-examples", type=int, default=None, help="examples per invariant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-shrink", action="store_true", help="report the first failing example as found")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument of the check (value parsed as JSON if it parses), repeatable; "
                        "e.g. --option kind=saelens_ema --option parameterization=log_theta")
    p.add_argument("--activation", default=None, help="module checks: the activation (default: detected)")
    p.add_argument("--k", type=int, default=None, help="module checks: k (default: the module's)")
    p.add_argument("--theta", type=float, default=None, help="module checks: global inference threshold")
    p.add_argument("--bandwidth", type=float, default=None, help="module checks: JumpReLU bandwidth")
    p.add_argument("--only", action="append", default=None, help="with target 'sae-ref': run only this check")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    return p


class UsageError(Exception):
    pass


def main(argv=None) -> int:
    """Run ``sae-ref validate`` with the arguments after ``validate``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from sae_ref.validation.checks import CHECKS

    if args.list:
        for name, fn in CHECKS.items():
            print(f"{name:20s} {_summary(fn)}")
        for name, (check, keyword) in ALIASES.items():
            print(f"{name:20s} the {check} check with the function as its '{keyword}'")
        return 0
    if args.target is None:
        parser.print_usage(sys.stderr)
        print("sae-ref validate: error: the TARGET argument is required", file=sys.stderr)
        return 2
    try:
        report = _run(args, CHECKS)
    except UsageError as e:
        print(f"sae-ref validate: error: {e}", file=sys.stderr)
        return 2
    _emit(report, args)
    return 0 if report.ok else 1


def _summary(fn) -> str:
    """The first sentence of a docstring, on one line."""
    para = " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())
    first = para.split(". ")[0].rstrip(".") + "."
    return first if len(first) <= 100 else first[:97] + "..."


def _emit(report: Report, args) -> None:
    text = str(report)
    print(text.splitlines()[0] if args.quiet else text)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")


def _budget(args, default: int | None = None) -> dict:
    kw = {"seed": args.seed}
    if args.max_examples is not None:
        if args.max_examples < 1:
            raise UsageError(f"--max-examples must be a positive integer, got {args.max_examples}")
        kw["max_examples"] = args.max_examples
    elif default is not None:
        kw["max_examples"] = default
    return kw


def _options(items) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--option expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _run(args, checks) -> Report:
    if args.target == SELF:
        from sae_ref.validation.checks import check_sae_ref

        xp, device = _library(args)
        try:
            return check_sae_ref(xp=xp, device=device, dtype=args.dtype, only=args.only, **_budget(args, 25))
        except ValueError as e:
            raise UsageError(str(e)) from None
    path = Path(args.target)
    if ":" not in args.target and path.is_dir():
        return _saelens_dir(path, args)
    obj = _load_object(args.target)
    if args.call:
        obj = obj()
    return _check_object(obj, args, checks)


def _library(args):
    if args.xp == "numpy":
        if args.device not in (None, "cpu"):
            raise UsageError(f"--xp numpy runs on the CPU only, got --device {args.device}")
        return None, None
    try:
        import torch
    except ImportError:
        raise UsageError("--xp torch needs torch installed") from None
    return torch, args.device


def _load_object(target: str):
    if ":" not in target:
        raise UsageError(f"TARGET must be MODULE:ATTR, path/to/file.py:ATTR, a SAELens directory or 'sae-ref', "
                         f"got {target!r}")
    where, attr = target.rsplit(":", 1)
    try:
        if where.endswith(".py") or "/" in where:
            spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            if spec is None or spec.loader is None or not Path(where).is_file():
                raise UsageError(f"no Python file {where!r}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ImportError as e:
        raise UsageError(f"cannot import {where!r}: {e}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{where!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _adapter_kwargs(args) -> dict:
    kw = {}
    for name in ("activation", "k", "theta", "bandwidth"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    return kw


def _is_module(obj) -> bool:
    try:
        import torch
    except ImportError:
        return False
    return isinstance(obj, torch.nn.Module)


def _check_object(obj, args, checks) -> Report:
    if _is_module(obj) and args.check in (None, "sae"):
        from sae_ref.validation.checks_sae import check_sae

        try:
            return check_sae(obj, **_budget(args), shrink=not args.no_shrink, **_adapter_kwargs(args))
        except (ValueError, TypeError, NotImplementedError) as e:
            raise UsageError(f"cannot adapt {type(obj).__name__}: {e}") from None
    names = sorted((set(checks) - {"sae"}) | set(ALIASES))
    if args.check is None:
        raise UsageError(f"{args.target} is a {type(obj).__name__}, not a torch module: name the check with "
                         f"--check (one of {names})")
    if args.check not in names:
        raise UsageError(f"--check must be one of {names} for a function, got {args.check!r}")
    if not callable(obj):
        raise UsageError(f"{args.target} is not callable")
    xp, device = _library(args)
    options = _options(args.option)
    name, keyword = ALIASES.get(args.check, (args.check, None))
    positional = (obj,) if keyword is None else ()
    if keyword is not None:
        options[keyword] = obj
    try:
        return checks[name](*positional, **options, xp=xp, device=device, dtype=args.dtype,
                            shrink=not args.no_shrink, **_budget(args))
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None


def _saelens_dir(path: Path, args) -> Report:
    from sae_ref.io.saelens import load_saelens

    try:
        params, config, cfg = load_saelens(path, xp=np, dtype="float64")
    except (FileNotFoundError, ValueError, NotImplementedError) as e:
        outcome = Outcome("files.sae_ref_reads_them", "sae-ref reads the SAELens files.", "failed", message=str(e))
        return Report(f"SAELens directory {path}", [outcome])
    read = Outcome("files.sae_ref_reads_them", "sae-ref reads the SAELens files.", "passed",
                   message=f"{cfg.get('architecture')} SAE, d = {params.d}, h = {params.h}, as {config}")
    try:
        from sae_lens import SAE
    except ImportError:
        skipped = Outcome("sae.*", "The SAE sae-lens loads matches sae-ref.", "skipped",
                          message="sae-lens is not installed: only sae-ref's reading of the files was checked")
        return Report(f"SAELens directory {path}", [read, skipped])
    from sae_ref.validation.adapters import TorchSAE
    from sae_ref.validation.checks_sae import check_sae

    sae = SAE.load_from_disk(str(path), device=args.device or "cpu")
    adapter = TorchSAE(sae, **_adapter_kwargs(args))
    same = _same_function(adapter, params, config)
    report = check_sae(adapter, **_budget(args), shrink=not args.no_shrink)
    return Report(f"SAELens directory {path} ({type(sae).__name__})", [read, same] + report.outcomes)


def _same_function(adapter, params, config) -> Outcome:
    """sae-ref's reading of the files and the adapter of sae-lens's module agree."""
    statement = "sae-ref's reading of the files (load_saelens) and the SAE sae-lens loads are one function."
    P = adapter.reference_params()
    diffs = []
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "theta"):
        a, b = getattr(P, name), getattr(params, name)
        if (a is None) != (b is None):
            diffs.append(f"{name} present in only one")
        elif a is not None and not np.allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9):
            diffs.append(f"{name} differs (max |diff| {float(np.max(np.abs(np.asarray(a) - np.asarray(b)))):.3g})")
    c = adapter.config
    for field in ("activation", "k", "theta", "standardize"):
        if getattr(c, field) != getattr(config, field):
            diffs.append(f"config.{field}: {getattr(c, field)!r} against {getattr(config, field)!r}")
    if diffs:
        return Outcome("files.same_function", statement, "failed", message="; ".join(diffs))
    return Outcome("files.same_function", statement, "passed")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
