"""Shared pieces of the converters: output checks, progress (the atomic output directory is
``parallel_exec``'s staging)."""
from __future__ import annotations

import os
import sys

from megatron_ling.errors import LingConfigError

DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp8": "bfloat16"}


def check_output(out_dir: str, force: bool, inputs: tuple = ()) -> None:
    """Refuse an existing ``out_dir`` without ``force``, and always one that is or contains one of
    ``inputs`` (``--force`` would replace the user's input with the export)."""
    out = os.path.realpath(out_dir)
    for src in inputs:
        src_real = os.path.realpath(src)
        if src_real == out or src_real.startswith(out.rstrip(os.sep) + os.sep):
            raise LingConfigError(f"output: {out_dir} {'is' if src_real == out else 'contains'} the input {src}; "
                                  f"replacing it would delete the input: choose an output directory outside it")
    if os.path.lexists(out_dir) and not force:
        raise LingConfigError(f"output: {out_dir} already exists; pass --force to replace it "
                              f"or choose another directory")
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise LingConfigError(f"output: parent directory {parent} does not exist; create it first")


def progress(total: int, desc: str, enabled: bool = True):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, file=sys.stderr, dynamic_ncols=True)
