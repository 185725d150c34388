"""Comparing output directories file by file (converter outputs must be byte-identical whatever
the worker, rank or node count)."""
from __future__ import annotations

import filecmp
import glob
import os


def files(d: str) -> list[str]:
    """Every file under ``d``, as sorted paths relative to it."""
    return sorted(os.path.relpath(p, d) for p in glob.glob(os.path.join(d, "**"), recursive=True)
                  if os.path.isfile(p))


def assert_identical(a: str, b: str) -> None:
    """``a`` and ``b`` hold the same files with the same bytes."""
    assert files(a) == files(b)
    different = [f for f in files(a) if not filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False)]
    assert different == []
