"""Streaming safetensors I/O for HF checkpoints, plus blockwise FP8 (e4m3, 128x128).

Writing: every tensor's name, shape and dtype is known from config.json before any weight is
read, so the shard layout (``model-0000i-of-0000n.safetensors``) and each shard's safetensors
header are planned up front; tensors are then appended to the open shard in plan order as they
are produced. Memory stays at the tensors of one layer, not one shard.

Reading: ``HFReader`` checks every shard's header and size before conversion starts (a missing
or truncated shard is one clear error, not a crash half way), then reads tensors lazily.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct

import torch

from megatron_ling.convert.common import Span, WriteBehind, copy_range, pack_files, write_all
from megatron_ling.errors import LingConfigError

_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
             torch.float8_e4m3fn: "F8_E4M3"}
_ST_DTYPE_INV = {v: k for k, v in _ST_DTYPE.items()}
INDEX = "model.safetensors.index.json"
FP8_BLOCK = 128
FP8_MAX = 448.0
FP8_QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}


def nbytes(shape, dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------------- FP8
def fp8_scale_shape(shape) -> tuple[int, int]:
    return (math.ceil(shape[0] / FP8_BLOCK), math.ceil(shape[1] / FP8_BLOCK))


def fp8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 128x128 block: scale_inv = amax/448, q = w/scale_inv in e4m3 (DeepSeek-V3 / Ling FP8)."""
    r, c = w.shape
    br, bc = fp8_scale_shape(w.shape)
    x = torch.zeros(br * FP8_BLOCK, bc * FP8_BLOCK, dtype=torch.float32)
    x[:r, :c] = w.float()
    blocks = x.view(br, FP8_BLOCK, bc, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(br * FP8_BLOCK, bc * FP8_BLOCK)[:r, :c].contiguous(), scale_inv.contiguous()


def fp8_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    r, c = q.shape
    if tuple(scale_inv.shape) != fp8_scale_shape(q.shape):
        raise LingConfigError(f"FP8 scale_inv shape {tuple(scale_inv.shape)} does not match weight shape "
                              f"{tuple(q.shape)} with 128x128 blocks (expected {fp8_scale_shape(q.shape)})")
    s = scale_inv.float().repeat_interleave(FP8_BLOCK, 0)[:r].repeat_interleave(FP8_BLOCK, 1)[:, :c]
    return (q.float() * s).to(dtype)


def fp8_eligible(name: str, shape) -> bool:
    """Linear weights inside decoder/MTP layers, as in the official FP8 releases: not the
    embeddings, lm_head, norms or the fp32 router (its logits pick the experts)."""
    return (name.startswith("model.layers.") and name.endswith(".weight") and len(shape) == 2
            and not name.endswith("mlp.gate.weight"))


# -------------------------------------------------------------------------------- writer
class ShardPlan:
    """The planned shards of a list of (name, shape, dtype): files, each tensor's shard, headers.
    Deterministic in the plan and the shard size, so any process (or node) writes any shard."""

    def __init__(self, plan: list[tuple[str, tuple, torch.dtype]], shard_size: int):
        # a tensor is never split between shards
        files = pack_files(((i, [nbytes(shape, dtype)], False) for i, (_, shape, dtype) in enumerate(plan)),
                           shard_size)
        shards = [[(plan[i][0], tuple(plan[i][1]), plan[i][2]) for i, _, _ in pieces] for pieces, _ in files]
        n = len(shards)
        self.files = ["model.safetensors"] if n == 1 else \
            [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shards = shards
        self.where = {name: i for i, s in enumerate(shards) for name, _, _ in s}
        self.total_bytes = sum(nbytes(s, d) for _, s, d in plan)

    def shard_bytes(self, i: int) -> int:
        return sum(nbytes(s, d) for _, s, d in self.shards[i])

    def open_shard(self, out_dir: str, i: int) -> "ShardFile":
        return ShardFile(os.path.join(out_dir, self.files[i]), self.shards[i])

    def write_index(self, out_dir: str) -> None:
        """``model.safetensors.index.json`` (when there is more than one shard)."""
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {name: self.files[i] for name, i in sorted(self.where.items())}}
            with open(os.path.join(out_dir, INDEX), "w") as f:
                json.dump(index, f, indent=2)
                f.write("\n")


class ShardFile:
    """One safetensors file whose header is known up front; tensors are appended in header order
    and their bytes written straight from the tensor's memory (no intermediate copy)."""

    def __init__(self, path: str, entries: list[tuple[str, tuple, torch.dtype]]):
        self.path, self.entries = path, entries
        header, off = {}, 0
        for name, shape, dtype in entries:
            b = nbytes(shape, dtype)
            header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [off, off + b]}
            off += b
        header["__metadata__"] = {"format": "pt"}
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)
        self._f = open(path, "wb", buffering=0)  # unbuffered: ``copy`` moves the file offset itself
        write_all(self._f.write, struct.pack("<Q", len(h)) + h)
        self._pos = 0
        self._behind = WriteBehind(self._f.fileno())

    def write(self, name: str, t: torch.Tensor) -> None:
        self._check(name, tuple(t.shape), t.dtype, t.numel() * t.element_size())
        write_all(self._f.write, t.contiguous().view(-1).view(torch.uint8).numpy().data)
        self._pos += 1
        self._behind.wrote(self._f.tell())

    def copy(self, name: str, span) -> None:
        """The next planned tensor's bytes straight from ``span`` (a ``common.Span``: the
        tensor as stored in a .distcp file) without bringing them into this process:
        copy_file_range(2) where the kernel and filesystems allow, else sendfile(2), else pread
        and write. A user-space write() is the slow part of a conversion on many machines."""
        _, shape, dtype = self.entries[self._pos]
        self._check(name, shape, dtype, span.length)
        copy_range(span.fd, span.offset, span.length, self._f.fileno())
        self._pos += 1
        self._behind.wrote(self._f.tell())

    def _check(self, name: str, shape: tuple, dtype: torch.dtype, length: int) -> None:
        exp_name, exp_shape, exp_dtype = self.entries[self._pos]
        if name != exp_name or shape != exp_shape or dtype != exp_dtype or length != nbytes(shape, dtype):
            raise AssertionError(f"write order/shape mismatch: got {name} {shape} {dtype} ({length} bytes), "
                                 f"planned {exp_name} {exp_shape} {exp_dtype}")

    def close(self) -> None:
        """Check completeness, flush and fsync (a unit is done only once its bytes are durable)."""
        if self._pos != len(self.entries):
            raise AssertionError(f"shard {self.path} incomplete")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


def write_safetensors(out_dir: str, plan: list[tuple[str, tuple, torch.dtype]], shard_size: int, tensors) -> int:
    """Write ``tensors`` (an iterable of (name, tensor) in plan order) as planned shards + index, in
    one process; returns the bytes written. (The converters write shards from workers instead.)"""
    sp = ShardPlan(plan, shard_size)
    it = iter(tensors)
    for i in range(len(sp.files)):
        f = sp.open_shard(out_dir, i)
        for _ in sp.shards[i]:
            f.write(*next(it))
        f.close()
    sp.write_index(out_dir)
    return sp.total_bytes


# -------------------------------------------------------------------------------- reader
def _read_header(path: str) -> tuple[dict, int]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise LingConfigError(f"hf: {path} is truncated ({size} bytes); copy the shard again")
        n = struct.unpack("<Q", raw)[0]
        if 8 + n > size:
            raise LingConfigError(f"hf: {path} is truncated (header runs past the end); copy the shard again")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise LingConfigError(f"hf: {path} has a corrupt safetensors header; copy the shard again") from None
    end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"] or [0])
    if 8 + n + end > size:
        raise LingConfigError(f"hf: {path} is truncated ({size} bytes, its header needs {8 + n + end}); "
                              f"copy the shard again")
    return header, 8 + n


class HFReader:
    def __init__(self, hf_dir: str):
        if not os.path.isdir(hf_dir):
            raise LingConfigError(f"hf: {hf_dir} is not a directory; pass an HF model directory")
        self.dir = hf_dir
        idx = os.path.join(hf_dir, INDEX)
        if os.path.exists(idx):
            with open(idx) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
            weight_map = None
        else:
            raise LingConfigError(f"hf: {hf_dir} has neither {INDEX} nor model.safetensors; "
                                  f"pass a directory with safetensors weights")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self.meta: dict[str, tuple[str, list, torch.dtype]] = {}
        self._where: dict[str, tuple[int, int]] = {}
        for fn in files:
            p = os.path.join(hf_dir, fn)
            if not os.path.exists(p):
                raise LingConfigError(f"hf: shard {p} named in {INDEX} is missing; download it again")
            header, start = _read_header(p)
            for name, v in header.items():
                if name == "__metadata__":
                    continue
                if v["dtype"] not in _ST_DTYPE_INV:
                    raise LingConfigError(f"hf: tensor {name} in {fn} has unsupported dtype {v['dtype']}")
                dt = _ST_DTYPE_INV[v["dtype"]]
                b, e = v["data_offsets"]
                if e - b != nbytes(v["shape"], dt):
                    raise LingConfigError(f"hf: tensor {name} in {fn} has {e - b} bytes for shape {v['shape']} "
                                          f"{v['dtype']}; the shard is corrupt")
                self.meta[name] = (fn, v["shape"], dt)
                self._where[name] = (start + b, e - b)
        if weight_map:
            missing = [k for k, fn in weight_map.items() if k not in self.meta or self.meta[k][0] != fn]
            if missing:
                raise LingConfigError(f"hf: tensor {missing[0]} is listed in {INDEX} but not in its shard; "
                                      f"the download is inconsistent")
        self._handles: dict = {}

    def get(self, name: str) -> torch.Tensor:
        """One tensor, mapped from its shard (a private copy-on-write mapping of just this
        tensor's pages, unmapped when the tensor is freed): no read copy into fresh memory, which
        cost ~30% of from-hf (bench/convert.py), and no shard-sized mapping that would count as
        resident memory for as long as the shard is open."""
        fn, shape, dtype = self.meta[name]
        if fn not in self._handles:
            self._handles[fn] = os.open(os.path.join(self.dir, fn), os.O_RDONLY)
        off, n = self._where[name]
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        fd = self._handles[fn]
        lead = off % mmap.ALLOCATIONGRANULARITY
        if os.fstat(fd).st_size < off + n:  # mapping past the end would SIGBUS on first touch
            raise LingConfigError(f"hf: {fn} ended while reading {name}; the shard is truncated")
        mm = mmap.mmap(fd, lead + n, access=mmap.ACCESS_COPY, offset=off - lead)
        return torch.frombuffer(mm, dtype=torch.uint8, count=n, offset=lead).view(dtype).reshape(shape)

    def span(self, name: str) -> Span:
        """Where tensor ``name``'s bytes lie in its shard (what from-hf copies in the kernel when the
        tensor is stored as the checkpoint keeps it)."""
        fn = self.meta[name][0]
        if fn not in self._handles:
            self._handles[fn] = os.open(os.path.join(self.dir, fn), os.O_RDONLY)
        off, n = self._where[name]
        if os.fstat(self._handles[fn]).st_size < off + n:
            raise LingConfigError(f"hf: {fn} ended while reading {name}; the shard is truncated")
        return Span(self._handles[fn], off, n)

    def get_weight(self, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        """A weight, dequantized when the checkpoint stores it as FP8 with a ``_scale_inv``."""
        t = self.get(name)
        if t.dtype == torch.float8_e4m3fn:
            s = name + "_scale_inv"
            if s not in self.meta:
                raise LingConfigError(f"hf: FP8 tensor {name} has no {s}; the FP8 checkpoint is incomplete")
            return fp8_dequantize(t, self.get(s), dtype or torch.bfloat16)
        return t if dtype is None else t.to(dtype)

    def close(self):
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()
