"""The on-disk checkpoint layout: the one place that knows it (trainer, converters, Slurm resume
and test fixtures all go through here).

Megatron-LM compatible names::

    CKPT_DIR/iter_0000010/                      one torch_dist checkpoint (.metadata, __*.distcp,
                                                metadata.json, common.pt up to megatron-core 0.16)
    CKPT_DIR/release/                           an iteration-less checkpoint (Megatron's "release")
    CKPT_DIR/latest_checkpointed_iteration.txt  "10" or "release": written last, atomically
    CKPT_DIR/iter_0000010.tmp/                  a save in progress: renamed to iter_0000010 when complete

A user path (``checkpoint.resume``, ``ling-convert to-hf CKPT``) may be a run directory (holding
``checkpoints/``), a checkpoint directory (with or without a tracker) or one iteration directory;
:func:`resolve` turns each into one iteration directory with one set of rules. A directory *is* a
checkpoint when it holds ``.metadata`` (torch_dist) or ``common.pt`` (megatron's common state).
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Optional, Union

import torch

from megatron_ling.errors import LingConfigError

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
RUN_SUBDIR = "checkpoints"  # a run directory keeps its checkpoints here (Recipe.checkpoint_dir default)
COMMON_STATE = "common.pt"
_MARKERS = (".metadata", COMMON_STATE)
_ITER_RE = re.compile(r"^iter_(\d{7})$")

Iteration = Union[int, str]  # an iteration number or RELEASE


def iteration_dir(root: str, iteration: Iteration) -> str:
    """``root/iter_%07d`` (or ``root/release``)."""
    name = RELEASE if iteration == RELEASE else f"iter_{int(iteration):07d}"
    return os.path.join(root, name)


def tmp_dir(final: str) -> str:
    """Where a save of ``final`` is written before it is renamed into place."""
    return final + ".tmp"


def is_checkpoint(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, m)) for m in _MARKERS)


def parse_iteration(text: str) -> Optional[Iteration]:
    """Tracker text -> iteration (digits or ``release``); None if it is neither."""
    text = text.strip()
    if text == RELEASE:
        return RELEASE
    return int(text) if text.isdigit() else None


def latest_iteration(root: str) -> Optional[Iteration]:
    """Iteration named by ``root``'s tracker (None without a tracker). Raises LingConfigError when the
    tracker holds something else or names a directory that is not a complete checkpoint."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        return None
    with open(tracker) as f:
        text = f.read().strip()
    it = parse_iteration(text)
    if it is None:
        raise LingConfigError(f"checkpoint.dir: tracker {tracker} holds {text!r}, not an iteration number or "
                              f"{RELEASE!r}; fix or delete it")
    d = iteration_dir(root, it)
    if not os.path.isdir(d) or not is_checkpoint(d):
        raise LingConfigError(f"checkpoint.dir: tracker {tracker} names iteration {it} but {d} is missing or holds "
                              f"no .metadata/{COMMON_STATE} (incomplete save?); pass an existing iter_* directory")
    return it


def list_iterations(root: str) -> list[int]:
    """Numbers of the complete ``iter_*`` directories under ``root`` (``.tmp`` saves excluded), sorted."""
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for d in os.listdir(root)
                  if (m := _ITER_RE.match(d)) and is_checkpoint(os.path.join(root, d)))


def resolve(path: str, field: str = "checkpoint") -> str:
    """A run directory, a checkpoint directory (tracker or not) or an iteration directory -> the one
    iteration directory to load. Tracker first; without one the newest complete iteration (or
    ``release``). Raises LingConfigError naming ``field`` (the option the path came from)."""
    if not os.path.isdir(path):
        raise LingConfigError(f"{field}: {path} is not a directory; pass a run directory, a checkpoint "
                              f"directory (with {TRACKER}) or one of its iter_* directories")
    if is_checkpoint(path):
        return path
    it = latest_iteration(path)
    if it is not None:
        return iteration_dir(path, it)
    its = list_iterations(path)
    if its:
        return iteration_dir(path, its[-1])
    if is_checkpoint(iteration_dir(path, RELEASE)):
        return iteration_dir(path, RELEASE)
    run_ckpts = os.path.join(path, RUN_SUBDIR)
    if os.path.isdir(run_ckpts):
        return resolve(run_ckpts, field)
    raise LingConfigError(f"{field}: {path} holds neither a checkpoint (.metadata/{COMMON_STATE}) nor {TRACKER} "
                          f"nor iter_* directories; pass a run directory, a checkpoint directory or an iter_* "
                          f"directory")


def write_tracker(root: str, iteration: Iteration) -> None:
    """Point ``root``'s tracker at ``iteration``: tmp file, fsync, os.replace (never half-written)."""
    path = os.path.join(root, TRACKER)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def begin_save(root: str, iteration: Iteration) -> str:
    """Create a fresh ``.tmp`` directory for a save of ``iteration`` (removing a killed earlier one)."""
    tmp = tmp_dir(iteration_dir(root, iteration))
    os.makedirs(root, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit_save(root: str, iteration: Iteration) -> str:
    """The save of ``iteration`` is complete: rename its ``.tmp`` directory into place (replacing a
    previous save of the same iteration), then update the tracker. Returns the iteration dir."""
    final = iteration_dir(root, iteration)
    if os.path.exists(final):
        shutil.rmtree(final)  # re-saving the same iteration (e.g. after a resume)
    os.replace(tmp_dir(final), final)
    write_tracker(root, iteration)
    return final


def prune(root: str, keep_last: int, saved: Iteration) -> None:
    """Delete the oldest iterations below ``saved`` (the one just written) so that ``keep_last``
    remain; never ``saved`` nor the one the tracker names. Iteration numbers are this run's order
    because a run refuses to write into a directory holding iterations newer than its start
    (:func:`newer_iterations`)."""
    if keep_last < 1:
        raise LingConfigError(f"checkpoint.keep_last: must be >= 1 or null, got {keep_last}")
    keep = {latest_iteration(root), saved}
    older = [it for it in list_iterations(root) if saved == RELEASE or it < int(saved)]
    for it in older[:max(0, len(older) - (keep_last - 1))]:
        if it not in keep:
            shutil.rmtree(iteration_dir(root, it), ignore_errors=True)


def newer_iterations(root: str, start: int) -> list[int]:
    """Complete iterations under ``root`` above ``start``: a run starting at ``start`` would
    overwrite them with its own saves of the same numbers (and ``keep_last`` would prune by them)."""
    return [it for it in list_iterations(root) if it > start]


def write_common_state(iter_dir: str, common: dict) -> None:
    torch.save(common, os.path.join(iter_dir, COMMON_STATE))


def has_common_state(d: str) -> bool:
    """Whether iteration dir ``d`` holds its common state: ``common.pt`` (megatron-core 0.16.1, the
    converter) or the ``common_state`` object listed in ``.metadata`` (0.19)."""
    if os.path.isfile(os.path.join(d, COMMON_STATE)):
        return True
    if not os.path.isfile(os.path.join(d, ".metadata")):
        return False
    from megatron_ling.checkpoint.metadata import read_metadata

    return any(k.split("/")[0] == "common_state" for k in read_metadata(d).state_dict_metadata)


def read_common_state(path: str) -> dict:
    """The common (non-sharded) state of the checkpoint ``path`` resolves to ({} if it has none),
    loaded with weights_only=True (plain data only, never arbitrary pickles).

    megatron-core 0.16.1 (and the converter's writer) keep it in ``common.pt``; 0.19 writes it as one
    ShardedObject ``common_state`` inside the .distcp files (dist_checkpointing/serialization.py:439)
    and reads ``common.pt`` only as its legacy format."""
    d = resolve(path)
    p = os.path.join(d, COMMON_STATE)
    if os.path.exists(p):
        return _load_plain(lambda: torch.load(p, map_location="cpu", weights_only=True), p)
    if not os.path.exists(os.path.join(d, ".metadata")):
        return {}
    return _read_common_state_object(d)


def _read_common_state_object(d: str) -> dict:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

    from megatron_ling.checkpoint.metadata import read_metadata

    reader = FileSystemReader(d)
    md = read_metadata(d)  # the allow-list reader: .metadata is a pickle
    keys = [k for k, v in md.state_dict_metadata.items()
            if isinstance(v, BytesStorageMetadata) and k.split("/")[0] == "common_state"]
    if not keys:
        return {}
    reader.set_up_storage_reader(md, is_coordinator=True)

    class _Bytes:  # the one LoadPlanner method read_data calls for a byte item
        raw = None

        def load_bytes(self, req, value):
            self.raw = value

    # Read the object's bytes ourselves: torch's default planner would unpickle them without
    # weights_only. megatron saves the state dict wrapped in a one-element list.
    sink = _Bytes()
    item = ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex(keys[0]), dest_offsets=torch.Size((0,)),
                    storage_index=MetadataIndex(keys[0]), storage_offsets=torch.Size((0,)), lengths=torch.Size((0,)))
    reader.read_data(LoadPlan([item]), sink).wait()

    def load():
        obj = torch.load(sink.raw, map_location="cpu", weights_only=True)
        return obj[0] if isinstance(obj, (list, tuple)) else obj

    return _load_plain(load, f"{d} ({keys[0]})")


def _load_plain(load, where: str) -> dict:
    try:
        return load()
    except Exception as e:
        raise LingConfigError(f"checkpoint: cannot load {where} with weights_only=True ({type(e).__name__}); "
                              f"it holds objects other than plain data") from None
