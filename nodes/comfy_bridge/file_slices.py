"""ComfyUI's file-slice mark on the weights the pack uses as they are stored, so that Dynamic VRAM reads them from the
file as it reads a core model's.

``comfy.utils.load_safetensors`` (ComfyUI 0.18 and later, under comfy-aimdo) records on the untyped storage of every
tensor it maps where its bytes lie: ``_comfy_tensor_file_slice``, a ``comfy.memory_management.TensorFileSlice``.
``comfy.memory_management.read_tensor_file_slice_into`` (called by ``model_management.cast_to_gathered`` when Dynamic
VRAM stages a weight) then reads those bytes from the file — into a CPU buffer (``seek`` / ``readinto`` of the
record's file under its lock; 0.18.1: in the loading thread only), into comfy-aimdo's pinned host buffer, or straight
into VRAM (``comfy_aimdo.host_buffer``: ``read_file_slice`` / ``read_file_to_device``, which take the file's
``fileno()``) — instead of copying a mapped page, so the weight need not be resident in RAM beside its pinned copy.

The pack maps the safetensors files itself (``ovis_u1.checkpoint.load_weights``: views of a private map for weights
used in their stored dtype, fresh tensors for converted ones) and puts the same record on each view through
``marker()``. The record's file is a plain unbuffered Python file of the shard, which every one of those readers
accepts; the records hold it, so it stays open exactly as long as a weight viewing it lives. ``OVIS_U1_FILE_SLICES=0``
leaves the views unmarked (ComfyUI then copies them from memory, as before).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import comfy.memory_management as memory_management
import torch

SWITCH = "OVIS_U1_FILE_SLICES"
MARK = "_comfy_tensor_file_slice"  # the storage attribute comfy.utils.load_safetensors sets


def _record_type():
    """``comfy.memory_management.TensorFileSlice`` where its fields are ones the marker can fill; else None."""
    record = memory_management.TensorFileSlice
    known = {"file_ref", "lock", "thread_id", "offset", "size"}  # 0.18.1: thread_id; 0.33.0: lock
    return record if set(record._fields) <= known else None


def marker() -> FileSliceMarker | None:
    """A ``mark_file_slice`` for one load; None for unknown record fields or ``OVIS_U1_FILE_SLICES=0``."""
    record = _record_type()
    if record is None or os.environ.get(SWITCH, "1").strip() == "0":
        return None
    return FileSliceMarker(record)


class FileSliceMarker:
    """Puts ComfyUI's file-slice record on the views of one load; one open file (and lock) per shard."""

    def __init__(self, record: type):
        self.record = record
        self.files: dict[Path, tuple[object, threading.Lock]] = {}

    def __call__(self, tensor: torch.Tensor, path: Path, offset: int, size: int) -> None:
        if path not in self.files:
            self.files[path] = (open(path, "rb", buffering=0), threading.Lock())
        file, lock = self.files[path]
        values = {"file_ref": file, "lock": lock, "thread_id": threading.get_ident(), "offset": offset, "size": size}
        setattr(tensor.untyped_storage(), MARK, self.record(**{f: values[f] for f in self.record._fields}))
