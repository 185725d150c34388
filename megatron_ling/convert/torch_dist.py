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

``TorchDistWriter`` streams tensors into ``.distcp`` files (torch.save per chunk, exactly what
``FileSystemWriter`` writes) and pickles the matching ``Metadata`` at the end, so megatron's
``dist_checkpointing.load`` reshards it to any layout like a checkpoint it wrote itself.
"""
from __future__ import annotations

import io
import json
import os
import pickle

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import LoadPlan

from megatron_ling.checkpoint import layout, manifest
from megatron_ling.checkpoint.metadata import read_metadata
from megatron_ling.errors import LingConfigError

MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}


class _Sink:
    """The two LoadPlanner methods FileSystemReader.read_data calls: copy into one dest tensor."""

    def __init__(self, dest: torch.Tensor, base: tuple[int, ...]):
        self.dest, self.base = dest, base

    def resolve_tensor(self, req):
        t = self.dest
        for dim, (off, ln) in enumerate(zip(req.dest_offsets, req.lengths)):
            t = t.narrow(dim, off - self.base[dim], ln)
        return t

    def commit_tensor(self, req, tensor):
        pass

    def load_bytes(self, req, value):  # pragma: no cover - tensors only
        raise AssertionError("byte items are never requested")


class TorchDistReader:
    def __init__(self, path: str, verify_checksums: bool = True):
        self.path = layout.resolve(path)
        if verify_checksums:
            manifest.check(self.path)  # every file against checksums.json (threads), before any is used
        self._reader = FileSystemReader(self.path)
        self.metadata: Metadata = read_metadata(self.path)  # allow-list unpickler, never pickle.load
        self._reader.set_up_storage_reader(self.metadata, is_coordinator=True)
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
            self._reader.read_data(LoadPlan(items), _Sink(dest, offsets)).wait()
        except LingConfigError:
            raise
        except Exception as e:
            raise LingConfigError(f"checkpoint: cannot read tensor {key!r} ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}); a data file is corrupt") from None
        return dest


    def read_bytes(self, key: str) -> bytes:
        """The raw stored bytes of ShardedObject ``key`` (to copy it without unpickling)."""
        info = self.metadata.storage_data[self.objects[key]]
        with open(os.path.join(self.path, info.relative_path), "rb") as f:
            f.seek(info.offset)
            return f.read(info.length)

    def _load_chunk(self, index) -> torch.Tensor:
        info = self.metadata.storage_data[index]
        with open(os.path.join(self.path, info.relative_path), "rb") as f:
            f.seek(info.offset)
            buf = io.BytesIO(f.read(info.length))
        return torch.load(buf, map_location="cpu", weights_only=True)


class TorchDistWriter:
    """Streams tensors into a new torch_dist directory; ``close()`` writes the metadata last.

    Every ``add`` call writes one chunk immediately (memory: that chunk). ``expert_axis=True``
    writes a stacked ``[E, ...]`` tensor as E chunks, like megatron does at EP=E, so that an
    EP-sharded load reads only its own experts.
    """

    def __init__(self, path: str, file_size: int = 5 * 1024 ** 3):
        self.path = path
        os.makedirs(path, exist_ok=True)
        self.file_size = file_size
        self.state_dict_metadata: dict = {}
        self.storage_data: dict = {}
        self._n = 0
        self._f = None
        self._rel = None
        self.bytes_written = 0

    def _stream(self):
        if self._f is None or self._f.tell() >= self.file_size:
            if self._f is not None:
                self._f.close()
            self._rel = f"__0_{self._n}.distcp"
            self._n += 1
            self._f = open(os.path.join(self.path, self._rel), "wb")
        return self._f

    def _write_chunk(self, key: str, t: torch.Tensor, offsets: tuple[int, ...]):
        from torch.utils.serialization import config as ser_config

        f = self._stream()
        start = f.tell()
        t = t.contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # torch.save writes a view's whole storage: keep only this chunk's bytes
        # zip CRC32 costs ~20% of the conversion time; torch.load does not need it, and .distcp
        # truncation is caught by sizes against the metadata (TorchDistReader._check_files)
        old = ser_config.save.compute_crc32
        ser_config.save.compute_crc32 = False
        try:
            torch.save(t, f)
        finally:
            ser_config.save.compute_crc32 = old
        length = f.tell() - start
        self.bytes_written += length
        self.storage_data[MetadataIndex(key, torch.Size(offsets))] = _StorageInfo(self._rel, start, length)

    def add(self, key: str, t, expert_axis: bool = False) -> None:
        """Write tensor ``t`` under ``key``. With ``expert_axis``, ``t`` may also be a list of the
        per-expert tensors (never stacked in memory) of the global ``[E, ...]`` tensor."""
        if key in self.state_dict_metadata:
            raise ValueError(f"duplicate key {key}")
        chunks = []
        if expert_axis:
            for e, x in enumerate(t):  # a tensor or an iterable of per-expert tensors, consumed lazily
                x = x.unsqueeze(0)
                off = (e,) + (0,) * (x.dim() - 1)
                self._write_chunk(key, x, off)
                chunks.append(ChunkStorageMetadata(torch.Size(off), x.shape))
                dtype, shape = x.dtype, torch.Size((len(chunks),) + tuple(x.shape[1:]))
            self.state_dict_metadata[key] = TensorStorageMetadata(TensorProperties(dtype=dtype), shape, chunks)
            return
        else:
            off = (0,) * t.dim()
            self._write_chunk(key, t, off)
            chunks.append(ChunkStorageMetadata(torch.Size(off), t.shape))
        self.state_dict_metadata[key] = TensorStorageMetadata(TensorProperties(dtype=t.dtype), t.shape, chunks)

    def add_chunks(self, key: str, shape, dtype: torch.dtype, chunks) -> None:
        """Write the global tensor ``key`` of ``shape`` as the given (offsets, tensor) chunks
        (consumed lazily; together they must tile the tensor exactly)."""
        if key in self.state_dict_metadata:
            raise ValueError(f"duplicate key {key}")
        md, n = [], 0
        for off, x in chunks:
            if x.dtype != dtype:
                raise ValueError(f"{key}: chunk dtype {x.dtype} != {dtype}")
            self._write_chunk(key, x, off)
            md.append(ChunkStorageMetadata(torch.Size(off), x.shape))
            n += x.numel()
        if n != torch.Size(shape).numel():
            raise AssertionError(f"{key}: chunks cover {n} of {torch.Size(shape).numel()} elements")
        self.state_dict_metadata[key] = TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(shape), md)

    def add_object(self, key: str, obj) -> None:
        """A megatron ShardedObject (e.g. a module's ``_extra_state``): torch.save([obj]) bytes."""
        buf = io.BytesIO()
        torch.save([obj], buf)
        self.add_bytes(key, buf.getvalue())

    def add_bytes(self, key: str, data: bytes) -> None:
        """A ShardedObject from its stored bytes (``TorchDistReader.read_bytes``), copied verbatim."""
        if key in self.state_dict_metadata:
            raise ValueError(f"duplicate key {key}")
        f = self._stream()
        start = f.tell()
        f.write(data)
        self.storage_data[MetadataIndex(key)] = _StorageInfo(self._rel, start, f.tell() - start)
        self.state_dict_metadata[key] = BytesStorageMetadata()

    def close(self, common: dict) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None
        layout.write_common_state(self.path, common)
        with open(os.path.join(self.path, "metadata.json"), "w") as f:
            json.dump(MEGATRON_METADATA, f)
        md = Metadata(state_dict_metadata=self.state_dict_metadata, planner_data=None,
                      storage_data=self.storage_data, storage_meta=StorageMeta(checkpoint_id=self.path))
        with open(os.path.join(self.path, ".metadata"), "wb") as f:
            pickle.dump(md, f)
        manifest.write_manifest(self.path, manifest.hash_files(self.path, manifest.checkpoint_files(self.path)))
