"""Shared pieces of the converters: atomic output directories, progress, throughput."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time

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


@contextlib.contextmanager
def atomic_dir(out_dir: str, force: bool):
    """Yield a temporary directory next to ``out_dir``; rename it to ``out_dir`` only on success.
    On any error the temporary directory is removed and ``out_dir`` is left untouched."""
    check_output(out_dir, force)
    out_dir = os.path.abspath(out_dir)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=os.path.dirname(out_dir))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700: the output gets the mode mkdir would give it
    try:
        yield tmp
        if os.path.lexists(out_dir):  # --force: replace only once the new output is complete
            old = tmp + ".old"
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def progress(total: int, desc: str, enabled: bool = True):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, file=sys.stderr, dynamic_ncols=True)


class Throughput:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.read = 0
        self.written = 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def summary(self, what: str) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return (f"{what}: read {self.read / 1e9:.3f} GB, wrote {self.written / 1e9:.3f} GB in {dt:.1f} s "
                f"({self.written / 1e6 / dt:.0f} MB/s written)")
