"""The output folder of a ``torchsteer bench`` run: never an earlier run's, never through a link.

:func:`prepare` checks the folder before any suite runs: a folder that holds an earlier
run's files (``results.json``, ``results.csv``, ``runs.csv``, ``summary.csv``, ``*.png``) is
refused unless ``overwrite`` is set, and a symbolic link (the folder itself or a file the run
would write) is refused always. :func:`open_output` then opens each file with
``O_NOFOLLOW``, so a link planted in the folder while the suites run is not followed either:
nothing is written outside the folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

__all__ = ["RESULT_FILES", "open_output", "prepare"]

RESULT_FILES = ("results.json", "results.csv", "runs.csv", "summary.csv")


def _ours(path: Path) -> bool:
    return path.name in RESULT_FILES or path.suffix == ".png"


def prepare(out: str | Path, overwrite: bool = False) -> Path:
    """Create ``out`` (parents too) and check it may receive this run's files.

    Raises:
        FileExistsError: ``out`` holds an earlier run's files and ``overwrite`` is false.
        ValueError: ``out``, or a file in it that the run writes, is a symbolic link; ``out``
            or a folder above it is a file; ``out`` cannot be created.
    """
    out = Path(out)
    if out.is_symlink():
        raise ValueError(f"Invalid --out: {out} is a symbolic link; give a real folder")
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"Invalid --out: {parent} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"Invalid --out: cannot create {out} ({e.strerror})") from e
    found = sorted(p for p in out.iterdir() if _ours(p))
    links = [p.name for p in found if p.is_symlink()]
    if links:
        raise ValueError(f"Invalid --out: {out} holds symbolic links {links}; remove them")
    if found and not overwrite:
        names = ", ".join(p.name for p in found[:4]) + (" ..." if len(found) > 4 else "")
        raise FileExistsError(
            f"{out} holds an earlier run ({names}); pass --overwrite to replace it, or "
            "another --out"
        )
    return out


def open_output(path: str | Path, mode: str = "w", newline: str | None = None) -> IO:
    """Open ``path`` for writing (truncated, created), refusing to follow a symbolic link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if Path(path).is_symlink():
            raise ValueError(f"Invalid output file: {path} is a symbolic link") from exc
        raise
    return os.fdopen(fd, mode, newline=newline)
