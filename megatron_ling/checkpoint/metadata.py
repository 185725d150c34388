"""The one reader of a torch_dist ``.metadata`` file: an allow-list unpickler.

torch's ``FileSystemReader.read_metadata`` (and so megatron-core's ``dist_checkpointing.load``)
runs ``pickle.load`` on ``.metadata``: a crafted file runs any code it names. Every place that
opens a checkpoint - the converter's reader, ``ling-convert verify``, the trainer's resume - reads
it here first. Only the classes torch's checkpoint metadata is made of may be named (the DCP
metadata / planner dataclasses, ``torch.Size``, dtypes, the layout helper); anything else is
refused in one line before a single object is built. Once a file passed this check, megatron's own
load of the same directory unpickles only those classes too.
"""
from __future__ import annotations

import os
import pickle

import torch

from megatron_ling.errors import LingConfigError

METADATA_FILE = ".metadata"

_DCP = "torch.distributed.checkpoint."
_ALLOWED = {
    _DCP + "metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    _DCP + "planner": {"SavePlan", "LoadPlan", "WriteItem", "ReadItem", "WriteItemType", "LoadItemType",
                       "TensorWriteData"},
    _DCP + "filesystem": {"_StorageInfo"},
    "torch": {"Size"},  # + every torch dtype (below)
    "torch.serialization": {"_get_layout"},  # a layout name -> torch.strided etc.
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                 torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of torch checkpoint metadata")


def read_metadata(iter_dir: str):
    """``iter_dir/.metadata`` as a ``torch.distributed.checkpoint.Metadata``, unpickled with the
    allow-list. Raises LingConfigError (one line) when it names anything else or is not a pickle."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = os.path.join(iter_dir, METADATA_FILE)
    try:
        with open(path, "rb") as f:
            md = _AllowListUnpickler(f).load()
    except OSError:
        raise
    except pickle.UnpicklingError as e:
        raise LingConfigError(f"checkpoint: refusing {path}: {e} (a crafted or foreign file; only checkpoints "
                              f"written by torch/megatron are read)") from None
    except Exception as e:  # truncated / not a pickle at all
        raise LingConfigError(f"checkpoint: cannot read {path} ({type(e).__name__}: {e}); the checkpoint is "
                              f"incomplete or corrupt") from None
    if not isinstance(md, Metadata):
        raise LingConfigError(f"checkpoint: {path} holds a {type(md).__name__}, not torch checkpoint metadata")
    return md
