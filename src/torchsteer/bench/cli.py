"""The ``torchsteer`` console script.

``torchsteer --version`` prints the version.
``torchsteer bench [SUITE ...] [--suite FILE.py:FUNC ...] [--quick] [--seeds N] [--out DIR]
[--overwrite] [--list]`` runs the named suites (none named: every suite marked
``quick_default``) and the user suites of ``--suite`` (:mod:`torchsteer.bench.custom`), shows
a progress bar on a terminal, prints each suite's table as it ends and writes
``results.json``, ``results.csv``, ``runs.csv``, ``summary.csv`` and plots into ``DIR``
(default ``bench-results/``; a folder holding an earlier run is refused without
``--overwrite``, and no file is written through a symbolic link). ``--seeds N`` runs seeds
0 .. N-1 (default 1 with ``--quick``, 3 without). A suite that raises is reported and skipped;
the exit status is then 1. Bad arguments (an unknown suite, ``--seeds abc``, ``--out`` naming
a file, a ``--suite`` file that does not load) print one line ``torchsteer bench: ...`` and
exit with status 2, before any suite runs.

``--list`` imports neither torch nor any suite module: the built-in suites are listed from
:mod:`torchsteer.bench.catalog`, with any suite registered in this process.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torchsteer
from torchsteer.extras import MissingExtraError

__all__ = ["main", "parser"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"torchsteer bench: {message}\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"Invalid seeds: {text!r} (must be a whole number >= 1)"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"Invalid seeds: {value} (must be >= 1)")
    return value


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="torchsteer", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"torchsteer {torchsteer.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="run convergence benchmark suites")
    b.add_argument(
        "suites",
        nargs="*",
        metavar="SUITE",
        help="suites to run (default: all quick-default suites)",
    )
    b.add_argument(
        "--suite",
        action="append",
        default=[],
        dest="files",
        metavar="FILE.py:FUNC",
        help="also run the suite that FUNC() in FILE.py returns (FUNC default: make_suite)",
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
    b.add_argument("--list", action="store_true", help="list the suites and exit")
    return p


def _list() -> None:
    from torchsteer.bench.catalog import BUILTIN
    from torchsteer.bench.registry import registered

    entries = {name: (desc, quick) for name, (_, desc, quick) in BUILTIN.items()}
    entries.update({n: (s.description, s.quick_default) for n, s in registered().items()})
    for name, (description, quick) in sorted(entries.items()):
        mark = "" if quick else "  (not in the default set)"
        print(f"{name:20s} {description}{mark}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torchsteer`` console script; returns the exit status."""
    args = parser().parse_args(argv)
    if args.list:
        _list()
        return 0
    from torchsteer.bench.runner import resolve, run_suites

    try:
        selected = resolve(args.suites) if args.suites or not args.files else []
        selected += resolve(args.files) if args.files else []
        n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
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
    return 0 if all(s.name in results for s in selected) else 1


if __name__ == "__main__":
    sys.exit(main())
