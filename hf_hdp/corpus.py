"""The embedded default corpus: the Python standard library's own source files.

Every machine with Python has it, it is real text, and its length distribution has the long tail
HDP is for (DESIGN §1: median file about 1.9K tokens, p99 about 47K, the files over 16K tokens hold
about half of all tokens). The demo, the planner CLI and the benchmarks use it when no data is given.
"""

from __future__ import annotations

import os
import sysconfig


def stdlib_dir() -> str:
    """The directory of the running interpreter's standard library."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(limit: int | None = None) -> list[str]:
    """Paths of the standard library's ``.py`` files (site-packages excluded), sorted."""
    root = stdlib_dir()
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                paths.append(os.path.join(dirpath, name))
    paths.sort()
    return paths[:limit] if limit is not None else paths


def stdlib_texts(limit: int | None = None) -> list[tuple[str, str]]:
    """``(relative path, text)`` of each non-empty standard-library source file."""
    root = stdlib_dir()
    out = []
    for path in stdlib_files(limit):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if text.strip():
            out.append((os.path.relpath(path, root), text))
    return out


def stdlib_lengths(chars_per_token: float = 3.6) -> list[int]:
    """Approximate token lengths of the standard-library files (bytes / ``chars_per_token``), no tokenizer needed."""
    lengths = []
    for path in stdlib_files():
        size = os.path.getsize(path)
        if size:
            lengths.append(max(1, round(size / chars_per_token)))
    return lengths
