"""Read and write Megatron-Core torch_dist checkpoints in ONE process, without process groups.

A torch_dist checkpoint directory (``iter_NNNNNNN/``) holds ``.metadata`` (a pickled
``torch.distributed.checkpoint.Metadata``: every key's global shape, dtype and saved chunks, and
where each chunk's bytes are), ``__<rank>_<n>.distcp`` data files, the non-tensor state (megatron-ling
stores ``ling_config`` there; ``common.pt`` up to megatron-core 0.16, a ``common_state`` object in the
.distcp files from 0.19: read by ``checkpoint.layout.read_common_state``) and ``metadata.json``
(megatron's backend tag).

``TorchDistReader.read(key)`` assembles one full tensor from whatever chunks the training layout
wrote (TP/ETP row or column shards, EP expert shards, any PP/VPP stage), using torch's own
resharding planner and ``FileSystemReader.read_data``; only that tensor's bytes are read.

``TorchDistWriter`` streams tensors into one ``.distcp`` file (torch.save per chunk, exactly what
``FileSystemWriter`` writes); ``write_metadata`` pickles the matching ``Metadata`` of all files at
the end, then the checksum manifest (``checkpoint.manifest``), so megatron's
``dist_checkpointing.load`` reshards it to any layout like a checkpoint it wrote itself.
"""
from __future__ import annotations

import bisect
import io
import json
import math
import os
import pickle
import sys
import zlib
from typing import Optional

import torch
# torch.distributed.checkpoint (DCP) is imported where it is used, not here: it takes ~1.2 s to
# import, which every from-hf worker (it only writes .distcp files) would pay at start-up.

from megatron_ling.checkpoint import layout, manifest
from megatron_ling.checkpoint.metadata import read_metadata
from megatron_ling.convert.common import Span, WriteBehind, copy_range
from megatron_ling.errors import LingConfigError

MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}


class _Sink:
    """The two LoadPlanner methods FileSystemReader.read_data calls: copy into one dest tensor
    (the read items' ``dest_offsets`` are relative to the requested box already)."""

    def __init__(self, dest: torch.Tensor):
        self.dest = dest

    def resolve_tensor(self, req):
        t = self.dest
        for dim, (off, ln) in enumerate(zip(req.dest_offsets, req.lengths)):
            t = t.narrow(dim, off, ln)
        return t

    def commit_tensor(self, req, tensor):
        pass

    def load_bytes(self, req, value):  # pragma: no cover - tensors only
        raise AssertionError("byte items are never requested")


def _corrupt(key: str, e: Exception) -> LingConfigError:
    return LingConfigError(f"checkpoint: cannot read tensor {key!r} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); a data file is corrupt")


def _holds(chunk, offsets, sizes) -> bool:
    """Whether saved ``chunk`` contains the whole box ``offsets``/``sizes``."""
    return all(co <= o and o + z <= co + cz for o, z, co, cz in zip(offsets, sizes, chunk.offsets, chunk.sizes))


class TorchDistReader:
    def __init__(self, path: str, verify_checksums: bool = True):
        self.path = layout.resolve(path)
        if verify_checksums:
            manifest.check(self.path)  # every file against checksums.json (threads), before any is used
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

        self._reader = FileSystemReader(self.path)
        self.metadata = read_metadata(self.path)  # allow-list unpickler, never pickle.load
        self._reader.set_up_storage_reader(self.metadata, is_coordinator=True)
        self._cached = (None, None)  # (storage index, tensor) of the chunk read_view loaded last
        self._fds: dict[str, int] = {}  # .distcp file -> fd (pread; kept open for the reader's life)
        self._records: dict = {}  # storage index -> file offset of its tensor bytes (span), or None
        self._grids: dict = {}  # key -> (per dimension the sorted chunk starts, chunk by offsets, full grid?)
        self.tensors = {k: v for k, v in self.metadata.state_dict_metadata.items()
                        if isinstance(v, TensorStorageMetadata)}
        # ShardedObjects (e.g. ``_extra_state``): pickled bytes, copied verbatim, never unpickled here
        self.objects = {i.fqn: i for i in self.metadata.storage_data
                        if isinstance(self.metadata.state_dict_metadata.get(i.fqn), BytesStorageMetadata)}
        self._check_files()

    def _check_files(self) -> None:
        """A missing or truncated .distcp file is found here, before anything is converted."""
        need: dict[str, int] = {}
        for info in self.metadata.storage_data.values():
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
        for rel, end in sorted(need.items()):
            p = os.path.join(self.path, rel)
            if not os.path.exists(p):
                raise LingConfigError(f"checkpoint: data file {p} is missing (the checkpoint is incomplete); "
                                      f"copy it again or pick another iteration")
            size = os.path.getsize(p)
            if size < end:
                raise LingConfigError(f"checkpoint: data file {p} is truncated ({size} bytes, the metadata "
                                      f"needs {end}); copy it again or pick another iteration")

    def common_state(self) -> dict:
        return layout.read_common_state(self.path)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def read(self, key: str, offsets: tuple[int, ...] | None = None, sizes: tuple[int, ...] | None = None,
             dtype: torch.dtype | None = None) -> torch.Tensor:
        """The global tensor ``key`` (or the box ``offsets``/``sizes`` of it), assembled from its chunks."""
        md = self.tensors[key]
        offsets = tuple(offsets) if offsets is not None else (0,) * len(md.size)
        sizes = tuple(sizes) if sizes is not None else tuple(md.size)
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        dest = torch.empty(sizes, dtype=dtype or md.properties.dtype)
        want = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        items = create_read_items_for_chunk_list(key, md, [want])
        covered = sum(int(torch.Size(i.lengths).numel()) for i in items)
        if covered != dest.numel():
            raise LingConfigError(f"checkpoint: tensor {key!r} is only partly saved ({covered} of "
                                  f"{dest.numel()} elements); the checkpoint is incomplete")
        try:
            if len(items) == 1 and tuple(items[0].storage_offsets) == (0,) * len(sizes) and \
                    not self.metadata.storage_data[items[0].storage_index].transform_descriptors:
                t = self._load_chunk(items[0].storage_index)  # the common case: no copy
                if tuple(t.shape) == sizes and (dtype is None or t.dtype == dtype):
                    return t
            self._reader.read_data(LoadPlan(items), _Sink(dest)).wait()
        except LingConfigError:
            raise
        except Exception as e:
            raise _corrupt(key, e) from None
        return dest


    def read_bytes(self, key: str) -> bytes:
        """The raw stored bytes of ShardedObject ``key`` (to copy it without unpickling)."""
        info = self.metadata.storage_data[self.objects[key]]
        with open(os.path.join(self.path, info.relative_path), "rb") as f:
            f.seek(info.offset)
            return f.read(info.length)

    def read_view(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """The box ``offsets``/``sizes`` of ``key``: a view into the one saved chunk that contains it
        (no assembly copy; the last chunk loaded is kept for the next box), else assembled by ``read``."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        c = self._chunk_holding(key, offsets, sizes)
        index = MetadataIndex(key, c.offsets) if c is not None else None
        if index is None or self.metadata.storage_data[index].transform_descriptors:
            return self.read(key, offsets, sizes)
        if self._cached[0] != index:
            self._cached = (None, None)  # drop the old chunk before loading the next one
            try:
                self._cached = (index, self._load_chunk(index))
            except Exception as e:
                raise _corrupt(key, e) from None
        t = self._cached[1]
        for dim, (o, z, co) in enumerate(zip(offsets, sizes, c.offsets)):
            t = t.narrow(dim, o - co, z)
        return t

    def span(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> Optional[Span]:
        """Where the bytes of the box ``offsets``/``sizes`` of ``key`` lie in the data files, as one
        contiguous run, when they do: the box sits in one saved chunk (no transform) stored
        row-major from the start of its storage, and is itself one row-major run of that chunk
        (rows of a matrix, one expert of a stack, the gate or up half of fc1). A converter then
        copies those bytes file to file in the kernel (``hf_io.ShardFile.copy``) instead of
        reading them into memory and writing them back. None otherwise (read with ``read_view``)."""
        if sys.byteorder != "little":  # the bytes are copied as stored; safetensors is little-endian
            return None
        from torch.distributed.checkpoint.metadata import MetadataIndex

        c = self._chunk_holding(key, offsets, sizes)
        if c is None:
            return None
        index = MetadataIndex(key, c.offsets)
        if index not in self._records:
            self._records[index] = self._record_start(index)
        start = self._records[index]
        run = _row_major_run(tuple(c.sizes), [o - co for o, co in zip(offsets, c.offsets)], tuple(sizes))
        if start is None or run is None:
            return None
        item = self.tensors[key].properties.dtype.itemsize
        info = self.metadata.storage_data[index]
        return Span(self._fd(info.relative_path), start + run[0] * item, run[1] * item)

    def _chunk_holding(self, key: str, offsets, sizes):
        """The saved chunk of ``key`` that contains the whole box ``offsets``/``sizes``, or None
        (the box spans several chunks: a TP shard boundary).

        Found through a grid index, not a scan: an expert stack has a chunk per expert (and per
        gate/up half: 512 for Ling's fc1) and is looked up once per expert, so a scan cost a
        quadratic ~1.5 s of CPU per 10 GB of to-hf. Saved chunks tile the tensor, so the one
        holding the box starts, in every dimension, at the last chunk boundary at or before the
        box's offset; only a tiling that is not a full grid needs the scan when that chunk does not
        hold the box."""
        grid = self._grids.get(key)
        if grid is None:
            chunks = self.tensors[key].chunks
            starts = [sorted({int(c.offsets[d]) for c in chunks}) for d in range(len(self.tensors[key].size))]
            by_offsets = {tuple(int(o) for o in c.offsets): c for c in chunks}
            full = len(by_offsets) == len(chunks) == math.prod(len(s) for s in starts)
            grid = self._grids[key] = (starts, by_offsets, full)
        starts, by_offsets, full = grid
        c = by_offsets.get(tuple(s[max(bisect.bisect_right(s, o) - 1, 0)] for s, o in zip(starts, offsets)))
        if c is not None and _holds(c, offsets, sizes):
            return c
        if full:
            return None  # a full grid: the chunk holding the box's first element was the only candidate
        for c in self.tensors[key].chunks:  # not a grid: the scan decides
            if _holds(c, offsets, sizes):
                return c
        return None

    def _record_start(self, index) -> Optional[int]:
        """File offset of the tensor bytes of one saved record, when the record holds exactly the
        chunk's elements, row-major from the start of its storage (what torch DCP and megatron
        write: views are cloned before torch.save). Only the record's zip directory and pickle are
        read (torch.load onto the meta device; weights_only), never its data."""
        info = self.metadata.storage_data[index]
        if info.transform_descriptors:
            return None
        window = _Window(self._fd(info.relative_path), info.offset, info.length)
        try:
            t = torch.load(io.BufferedReader(window, 1 << 16), map_location="meta", weights_only=True)
        except Exception as e:
            raise _corrupt(index.fqn, e) from None
        st = t.untyped_storage() if isinstance(t, torch.Tensor) else None
        where = getattr(st, "_checkpoint_offset", None)
        chunk = self.tensors[index.fqn]
        if (where is None or t.dtype != chunk.properties.dtype or not t.is_contiguous() or t.storage_offset() != 0
                or st.nbytes() != t.numel() * t.element_size()):
            return None
        return info.offset + int(where)

    def _fd(self, relative_path: str) -> int:
        if relative_path not in self._fds:
            self._fds[relative_path] = os.open(os.path.join(self.path, relative_path), os.O_RDONLY)
        return self._fds[relative_path]

    def _load_chunk(self, index) -> torch.Tensor:
        """One saved record, torch.load-ed straight from the file: its storage bytes are read by
        pread into the tensor (not first into a bytes object: that was a second full copy)."""
        info = self.metadata.storage_data[index]
        window = _Window(self._fd(info.relative_path), info.offset, info.length)
        return torch.load(io.BufferedReader(window, 1 << 16), map_location="cpu", weights_only=True)


def _row_major_run(shape: tuple[int, ...], offsets: list[int], sizes: tuple[int, ...]) -> Optional[tuple[int, int]]:
    """(first element, element count) of the box ``offsets``/``sizes`` of a row-major array of
    ``shape`` when the box is one contiguous run of it (leading dims of size 1, then one partial
    dim, then whole dims), else None."""
    k = 0
    while k < len(shape) and sizes[k] == 1:
        k += 1
    if any(o != 0 or z != n for o, z, n in zip(offsets[k + 1:], sizes[k + 1:], shape[k + 1:])):
        return None
    first, stride = 0, 1
    for o, n in zip(reversed(offsets), reversed(shape)):
        first += o * stride
        stride *= n
    count = 1
    for z in sizes:
        count *= z
    return first, count


class _Window(io.RawIOBase):
    """Bytes [offset, offset + length) of an open file as a seekable stream (one torch.save record
    of a .distcp file), read with pread: torch.load reads the zip directory, then the storage
    directly into the tensor through ``readinto``."""

    def __init__(self, fd: int, offset: int, length: int):
        self.fd, self.offset, self.length, self.pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.length + pos
        return self.pos

    def readinto(self, b) -> int:
        k = min(len(b), self.length - self.pos)
        if k <= 0:
            return 0
        got = os.preadv(self.fd, [memoryview(b).cast("B")[:k]], self.offset + self.pos)
        self.pos += got
        return got


_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn)}


class _SerialCrc:
    """The CRC-32 of a byte stream whose pieces are given in order. A stored tensor's bytes (``add``)
    are taken on one helper thread: zlib.crc32 and copy_file_range both release the GIL, so the CRC
    is taken while the kernel copies the same bytes instead of after it (after, it was ~1.2 s of an
    11 s 3 GB from-hf, docs/convert.md). torch.save's many small framing writes (``add_small``) are
    gathered and go with the next piece: a thread hand-off per write would cost more than their CRC.
    At most one piece is in flight, so a deferred piece keeps at most one tensor's mapping alive;
    a piece must not change until the next call."""

    _GATHER = 8 << 20  # gathered small writes past this are taken at once (bounded memory)

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ling-crc32")
        self._crc = 0
        self._small = bytearray()
        self._pending = None

    def _take(self, *pieces) -> None:
        for buf in pieces:
            self._crc = zlib.crc32(buf, self._crc)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # re-raises the helper's error here

    def _gathered(self) -> bytearray:
        small, self._small = self._small, bytearray()
        return small

    def add_small(self, b) -> None:
        """A small write: copied and taken with the next piece."""
        self._small += b
        if len(self._small) > self._GATHER:
            self.add_now(b"")

    def add(self, buf) -> None:
        """``buf`` on the helper thread, after every piece before it (finished first: one in flight)."""
        self._wait()
        self._pending = self._pool.submit(self._take, self._gathered(), buf)

    def add_now(self, buf) -> None:
        """``buf`` in the caller's thread (a buffer that may change once this returns)."""
        self._wait()
        self._take(self._gathered(), buf)

    def value(self) -> int:
        self.add_now(b"")
        return self._crc

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class _CrcFile:
    """A write-only file that keeps the CRC-32 of what went through it (torch.save writes its
    records sequentially through ``write``), so that ``checksums.json`` needs no second read of
    the data files: on several nodes the finalizing rank would otherwise re-read the whole
    checkpoint (~2 TB for Ling-1T) alone."""

    # a write this small is gathered and its CRC deferred; a larger one (a tensor's storage on the
    # path without a kernel copy) may be a view torch.save frees afterwards: taken in place
    _DEFER_WRITE = 1 << 20

    def __init__(self, f):
        self._f = f
        self._crc = _SerialCrc()
        self.pos = 0
        self._hole = None  # (Span, its bytes as a buffer) to fill where torch.save skips the storage
        self._behind = WriteBehind(f.fileno())

    def write(self, b) -> int:
        if memoryview(b).nbytes <= self._DEFER_WRITE:
            self._crc.add_small(b)
        else:
            self._crc.add_now(b)
        n = self._f.write(b)
        self.pos += n
        self._behind.wrote(self.pos, self._f.flush)
        return n

    def tell(self) -> int:
        return self.pos

    def arm(self, span: Span, data) -> None:
        """The next storage torch.save skips (``skip_data``: it seeks over the storage's bytes)
        is filled from ``span`` in the kernel; ``data`` (the same bytes, mapped) feeds the CRC."""
        self._hole = (span, data)

    def seek(self, pos: int, whence: int = 0) -> int:
        if self._hole is None or whence != 1 or pos != self._hole[0].length:
            raise io.UnsupportedOperation(f"seek({pos}, {whence}) is not the armed storage hole")
        span, data = self._hole
        self._hole = None
        self._f.flush()
        self._crc.add(data)  # taken while the kernel copies the same bytes
        copy_range(span.fd, span.offset, span.length, self._f.fileno())
        self.pos += span.length
        self._behind.wrote(self.pos)  # flushed above
        return self.pos

    def flush(self) -> None:
        self._f.flush()

    @property
    def crc(self) -> int:
        """The CRC-32 of every byte written so far (waits for the helper thread)."""
        return self._crc.value()

    def close(self) -> None:
        """flush, fsync, close (after checking every byte landed where it was counted)."""
        try:
            self._f.flush()
            size = os.fstat(self._f.fileno()).st_size
            if size != self.pos:
                raise AssertionError(f"{self._f.name}: {size} bytes on disk, {self.pos} written")
            os.fsync(self._f.fileno())  # the last piece's CRC is taken meanwhile
            self._crc.value()  # and a helper error surfaces here, before the record is made
        finally:
            self._crc.close()
            self._f.close()


_SKIP_DATA_SEEKS = None


def skip_data_seeks_over_storage() -> bool:
    """Whether this torch's ``torch.save`` under ``torch.serialization.skip_data`` writes a record
    whose storage bytes are skipped by one relative seek of exactly their size (torch 2.5+ does;
    it is how :class:`TorchDistWriter` lets the kernel copy a stored tensor into the record).
    Probed once per process; where it does not hold, every tensor goes through torch.save."""
    global _SKIP_DATA_SEEKS
    if _SKIP_DATA_SEEKS is None:
        class Probe:
            def __init__(self):
                self.pos, self.seeks = 0, []

            def write(self, b):
                self.pos += memoryview(b).nbytes
                return memoryview(b).nbytes

            def tell(self):
                return self.pos

            def seek(self, pos, whence=0):
                self.seeks.append((pos, whence))
                self.pos = pos if whence == 0 else self.pos + pos
                return self.pos

            def flush(self):
                pass

        probe = Probe()
        try:
            with torch.serialization.skip_data():
                torch.save(torch.empty(4096, dtype=torch.bfloat16), probe)
            _SKIP_DATA_SEEKS = probe.seeks == [(8192, 1)]
        except Exception:  # noqa: BLE001 - an older torch or a changed writer: the plain path
            _SKIP_DATA_SEEKS = False
    return _SKIP_DATA_SEEKS


class TorchDistWriter:
    """Streams tensors into ONE ``.distcp`` file of a torch_dist directory (memory: one chunk) and
    returns what the metadata needs as a JSON-able record; :func:`write_metadata` combines the
    records of all files (written by any processes or nodes) into ``.metadata`` and ``checksums.json``, last."""

    def __init__(self, path: str, rel: str):
        os.makedirs(path, exist_ok=True)
        self.rel = rel
        self._f = _CrcFile(open(os.path.join(path, rel), "wb"))
        self.entries: list = []  # in write order: [key, dtype, global shape, [[offsets, sizes], ...]]
        #                          for tensors, [key] for ShardedObjects
        self.storage: list = []  # [key, offsets (None for objects), start, length]
        self.bytes_written = 0

    def _write_chunk(self, key: str, t: torch.Tensor, offsets: tuple[int, ...], span: Optional[Span] = None):
        """One torch.save record of chunk ``t``. With ``span`` (where ``t``'s exact bytes are
        stored in an input file) the record is written around a hole that the kernel fills from
        the input (``_CrcFile.arm``): the tensor's bytes never pass through a user-space write()."""
        from torch.utils.serialization import config as ser_config

        f = self._f
        start = f.tell()
        t = t.contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # torch.save writes a view's whole storage: keep only this chunk's bytes
        hole = span is not None and t.numel() > 0 and skip_data_seeks_over_storage()
        if hole:
            if span.length != t.numel() * t.element_size():
                raise AssertionError(f"{key}: span of {span.length} bytes for a {tuple(t.shape)} {t.dtype} chunk")
            f.arm(span, t.view(-1).view(torch.uint8).numpy())
        # zip CRC32 costs ~20% of the conversion time; torch.load does not need it, and .distcp
        # truncation is caught by sizes against the metadata (TorchDistReader._check_files); the
        # checksum manifest covers every byte of the file
        old = ser_config.save.compute_crc32
        ser_config.save.compute_crc32 = False
        try:
            if hole:
                with torch.serialization.skip_data():
                    torch.save(t, f)
                if f._hole is not None:
                    raise AssertionError(f"{key}: torch.save did not skip the storage it was to skip")
            else:
                torch.save(t, f)
        finally:
            ser_config.save.compute_crc32 = old
        length = f.tell() - start
        self.bytes_written += length
        self.storage.append([key, list(offsets), start, length])

    def add_chunks(self, key: str, shape, dtype: torch.dtype, chunks, spans=None, whole: bool = True) -> None:
        """Write the global tensor ``key`` of ``shape`` as the given (offsets, tensor) chunks
        (consumed lazily; together they must tile the tensor exactly, or with ``whole=False`` a
        part of it whose other chunks other files hold: :func:`write_metadata` checks the union).
        ``spans``, one per chunk: where each chunk's exact bytes lie in an input file, to be
        copied in the kernel."""
        md, n = [], 0
        spans = iter(spans) if spans is not None else None
        for off, x in chunks:
            if x.dtype != dtype:
                raise ValueError(f"{key}: chunk dtype {x.dtype} != {dtype}")
            self._write_chunk(key, x, off, next(spans) if spans is not None else None)
            md.append([list(off), list(x.shape)])
            n += x.numel()
        if whole and n != torch.Size(shape).numel():
            raise AssertionError(f"{key}: chunks cover {n} of {torch.Size(shape).numel()} elements")
        self.entries.append([key, str(dtype), list(shape), md])

    def add_object(self, key: str, obj) -> None:
        """A megatron ShardedObject (e.g. a module's ``_extra_state``): torch.save([obj]) bytes."""
        buf = io.BytesIO()
        torch.save([obj], buf)
        self.add_bytes(key, buf.getvalue())

    def add_bytes(self, key: str, data: bytes) -> None:
        """A ShardedObject from its stored bytes (``TorchDistReader.read_bytes``), copied verbatim."""
        start = self._f.tell()
        self._f.write(data)
        self.bytes_written += len(data)
        self.storage.append([key, None, start, self._f.tell() - start])
        self.entries.append([key])

    def close(self) -> dict:
        """fsync the file; the record for :func:`write_metadata`."""
        self._f.close()
        return {"rel": self.rel, "entries": self.entries, "storage": self.storage,
                "bytes": self.bytes_written, "crc32": self._f.crc}


def write_metadata(path: str, records: list[dict], common: dict) -> None:
    """``common.pt``, ``metadata.json`` and the pickled ``Metadata`` of a torch_dist directory whose
    ``.distcp`` files were written by :class:`TorchDistWriter` (``records`` in file order). A
    tensor's chunks may come from several files (a MoE layer's experts split between them): each
    chunk must be stored once, and together they must hold as many elements as the tensor (a
    guard against a piece planned twice or not at all; the writers' plans tile it)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, StorageMeta, TensorProperties,
                                                       TensorStorageMetadata)

    sd, storage, covered = {}, {}, {}
    for rec in records:
        for key, *tensor in rec["entries"]:
            if not tensor:
                if key in sd:
                    raise ValueError(f"duplicate key {key}")
                sd[key] = BytesStorageMetadata()
                continue
            dtype, shape, chunks = tensor
            props, size = TensorProperties(dtype=_DTYPES[dtype]), torch.Size(shape)
            md = sd.setdefault(key, TensorStorageMetadata(props, size, []))
            if not isinstance(md, TensorStorageMetadata) or (md.properties.dtype, md.size) != (props.dtype, size):
                raise ValueError(f"{key}: its files disagree on what it is ({dtype} {list(shape)} here)")
            md.chunks.extend(ChunkStorageMetadata(torch.Size(o), torch.Size(z)) for o, z in chunks)
            covered[key] = covered.get(key, 0) + sum(math.prod(z) for _, z in chunks)
        for key, off, start, length in rec["storage"]:
            idx = MetadataIndex(key) if off is None else MetadataIndex(key, torch.Size(off))
            if idx in storage:
                raise ValueError(f"{key}: chunk at {off} is stored twice")
            storage[idx] = _StorageInfo(rec["rel"], start, length)
    for key, n in covered.items():  # a guard against a piece planned twice or not at all
        if n != sd[key].size.numel():
            raise AssertionError(f"{key}: its chunks cover {n} of {sd[key].size.numel()} elements")
    layout.write_common_state(path, common)
    with open(os.path.join(path, "metadata.json"), "w") as f:
        json.dump(MEGATRON_METADATA, f)
    # checkpoint_id: the directory's own name, not ``path``: that is a staging dir renamed afterwards,
    # and a random temp name in .metadata would make every run's bytes (and checksums.json) differ
    md = Metadata(state_dict_metadata=sd, planner_data=None, storage_data=storage,
                  storage_meta=StorageMeta(checkpoint_id=os.path.basename(os.path.normpath(path))))
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(md, f)  # our own Metadata object; readers unpickle it with the allow-list
    # last, over every file of the directory: readers verify the whole checkpoint against it. The
    # data files' CRCs were taken while writing them (_CrcFile); only the small files are read.
    # (A unit marker left in a staging dir by an older megatron-ling has no crc32: that file is read.)
    known = {rec["rel"]: [rec["bytes"], rec["crc32"]] for rec in records if "crc32" in rec}
    rest = [n for n in manifest.checkpoint_files(path) if n not in known]
    manifest.write_manifest(path, {**known, **manifest.hash_files(path, rest)})
