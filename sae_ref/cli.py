"""The ``sae-ref`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sae-ref", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a BatchTopK SAE on embedded synthetic data on each backend")
    demo.add_argument("--backend", action="append", choices=["numpy", "torch", "torch-cuda", "cupy", "strict"],
                      help="backend(s) to run on (repeatable); default numpy and torch")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default 2000)")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from sae_ref.demo import run

        if args.steps is not None and args.steps < 1:
            parser.error("--steps must be >= 1")
        run(tuple(args.backend or ("numpy", "torch")), steps=args.steps, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
