"""The ``torchsteer`` console script.

``torchsteer --version`` prints the version.
``torchsteer bench [SUITE ...] [--quick] [--seeds N] [--out DIR] [--overwrite] [--list]`` runs
the named suites (none named: every suite marked ``quick_default``), shows a progress bar, prints
a table per suite and writes ``results.json``, ``results.csv``, ``summary.csv`` and plots into
``DIR`` (default ``bench-results/``; a folder holding an earlier run is refused without
``--overwrite``, and no file is written through a symbolic link). ``--seeds N`` runs seeds
0 .. N-1 (default 1 with ``--quick``, 3 without). A suite that raises is reported and skipped;
the exit status is then 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torchsteer
from torchsteer.extras import MissingExtraError

__all__ = ["main", "parser"]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"Invalid seeds: {value} (must be >= 1)")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchsteer", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"torchsteer {torchsteer.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="run convergence benchmark suites")
    b.add_argument(
        "suites",
        nargs="*",
        metavar="SUITE",
        help="suites to run (default: all quick-default suites)",
    )
    b.add_argument("--quick", action="store_true", help="small, fast configurations")
    b.add_argument(
        "--seeds",
        type=_positive,
        default=None,
        metavar="N",
        help="run seeds 0..N-1 (default: 1 with --quick, else 3)",
    )
    b.add_argument(
        "--out",
        default="bench-results",
        metavar="DIR",
        help="output folder (default: bench-results)",
    )
    b.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run's files in --out (without it such a folder is refused)",
    )
    b.add_argument("--list", action="store_true", help="list the registered suites and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torchsteer`` console script; returns the exit status."""
    args = parser().parse_args(argv)
    from torchsteer.bench.registry import suites

    if args.list:
        for name, s in sorted(suites().items()):
            mark = "" if s.quick_default else "  (not in the default set)"
            print(f"{name:20s} {s.description}{mark}")
        return 0
    from torchsteer.bench.runner import resolve, run_suites

    try:
        selected = [s.name for s in resolve(args.suites)]
    except ValueError as e:
        print(f"torchsteer bench: {e}", file=sys.stderr)
        return 2
    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    try:
        results = run_suites(
            selected,
            quick=args.quick,
            seeds=range(n_seeds),
            out=args.out,
            overwrite=args.overwrite,
        )
    except (FileExistsError, ValueError, MissingExtraError) as e:  # checked before any suite
        print(f"torchsteer bench: {e}", file=sys.stderr)
        return 2
    return 0 if all(name in results for name in selected) else 1


if __name__ == "__main__":
    sys.exit(main())
