"""Shared pieces of the converters: output checks, progress (the atomic output directory is
``parallel_exec``'s staging), file-to-file copies of stored tensor bytes in the kernel, the
write-behind of output files, and the packing of planned output files."""
from __future__ import annotations

import errno
import os
import sys
from typing import NamedTuple

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


class Span(NamedTuple):
    """``length`` bytes at ``offset`` of the open file ``fd``: a tensor's bytes as stored (in a
    .distcp record or a safetensors shard)."""

    fd: int
    offset: int
    length: int


def write_all(write, data) -> None:
    """``write`` (a file's write, or os.write on an fd) until every byte is out: an unbuffered
    write may take less than asked."""
    view = memoryview(data).cast("B")
    while view:
        view = view[write(view):]


_NO_COPY_RANGE = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF)


def copy_range(src_fd: int, offset: int, length: int, dst_fd: int) -> None:
    """``length`` bytes of ``src_fd`` from ``offset`` to ``dst_fd`` at its current offset (which
    advances), in the kernel: copy_file_range(2); sendfile(2) where that is refused (a kernel
    before 5.3 across filesystems, some network filesystems); pread + write as the last resort."""

    def pread_write(at: int, n: int) -> int:
        b = os.pread(src_fd, min(64 << 20, n), at)
        write_all(lambda v: os.write(dst_fd, v), b)
        return len(b)

    ways = (("copy_file_range", lambda at, n: os.copy_file_range(src_fd, dst_fd, n, at)),
            ("sendfile", lambda at, n: os.sendfile(dst_fd, src_fd, at, n)),
            ("pread", pread_write))
    done = 0
    for k, (what, step) in enumerate(ways):
        try:
            while done < length:
                n = step(offset + done, length - done)
                if n == 0:
                    raise OSError(errno.EIO, f"{what}: source ended {length - done} bytes early")
                done += n
            return
        except OSError as e:  # refused before any byte moved: the next way
            if e.errno not in _NO_COPY_RANGE or done or k == len(ways) - 1:
                raise


WRITE_BEHIND_BYTES = 64 << 20


class WriteBehind:
    """Starts the disk writing an output file while it is still being written: every
    ``WRITE_BEHIND_BYTES`` that reached the kernel are handed to writeback at once
    (sync_file_range(2), SYNC_FILE_RANGE_WRITE), instead of waiting in the page cache until the
    closing fsync writes the whole file while the converter waits. The copy into the page cache
    and the disk's writing then overlap (from-hf of 3 GB on one worker: fsync 5.3 -> 2.5 s,
    10.0 s instead of 11.1 s; docs/convert.md), and a node's dirty memory stays a few write-behind
    steps per file, however large the conversion. A hint only: where the call is missing (not
    Linux) or refused, writing goes on and the fsync does all of it, as before."""

    def __init__(self, fd: int):
        self.fd, self.started = fd, 0  # bytes [0, started) have been handed to writeback

    def wrote(self, end: int, flush=None) -> None:
        """The file now holds ``end`` bytes (``flush``: pushes a user-space buffer to the kernel
        first)."""
        if end - self.started < WRITE_BEHIND_BYTES:
            return
        if flush is not None:
            flush()
        sync = _sync_file_range()
        if sync is not None and sync(self.fd, self.started, end - self.started, _SYNC_FILE_RANGE_WRITE) != 0:
            _SYNC_FILE_RANGE[0] = None  # refused (e.g. ENOSYS, EINVAL on this filesystem): a hint only
        self.started = end


_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h
_SYNC_FILE_RANGE: list = []  # [libc's sync_file_range or None], looked up once


def _sync_file_range():
    if not _SYNC_FILE_RANGE:
        fn = None
        if sys.platform.startswith("linux"):
            import ctypes

            try:
                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                fn.restype = ctypes.c_int
            except (OSError, AttributeError):
                fn = None
        _SYNC_FILE_RANGE.append(fn)
    return _SYNC_FILE_RANGE[0]


def pack_files(items, file_size: int) -> list[tuple[list[list], int]]:
    """The one rule for planning output files up to a size: to-hf's safetensors shards
    (``hf_io.ShardPlan``), from-hf's and ling-merge's ``.distcp`` files. ``items``: ``(item,
    part_bytes, split)`` in output order, ``part_bytes`` the sizes of the item's parts (an expert
    stack's experts; one entry for an item that is only stored whole), ``split`` whether its parts
    may be stored apart from each other. An item stored whole, or each part of one that may split,
    is an atom; consecutive atoms fill a file up to ``file_size`` bytes, and an atom larger than
    that gets a file alone. Returns per file ``(pieces, bytes)``, a piece ``[item, lo, hi]`` being
    the item's parts ``lo:hi`` (adjacent atoms of one item join into one piece)."""
    files: list[tuple[list[list], int]] = [([], 0)]
    for item, parts, split in items:
        atoms = [(k, k + 1, b) for k, b in enumerate(parts)] if split else [(0, len(parts), sum(parts))]
        for lo, hi, b in atoms:
            pieces, size = files[-1]
            if pieces and size + b > file_size:
                files.append(([], 0))
                pieces, size = files[-1]
            if pieces and pieces[-1][0] == item and pieces[-1][2] == lo:
                pieces[-1][2] = hi  # the run goes on
            else:
                pieces.append([item, lo, hi])
            files[-1] = (pieces, size + b)
    return files
