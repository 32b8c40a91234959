"""Where the pack runs in ComfyUI: its model folders, devices and dtypes, progress and interruption, and the size
of a LATENT."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch

from ...ovis_u1 import OvisU1InputError, operations
from ...ovis_u1.checkpoint import find_model_dirs, model_dir_named

MODEL_FOLDER = "ovis_u1"
IN_COMFYUI = True  # the nodes load only inside ComfyUI (V3 schema)

log = logging.getLogger("ComfyUI-Ovis-U1")


# ------------------------------------------------------------------------------------------------ model folders
def register_model_folder() -> None:
    """Make ``models/ovis_u1`` a ComfyUI model folder; ``ovis_u1:`` entries of extra_model_paths.yaml add to it."""
    folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER))


def model_roots() -> list[Path]:
    """The folders searched for Ovis-U1 checkpoint folders, in priority order."""
    return [Path(p) for p in folder_paths.get_folder_paths(MODEL_FOLDER)]


def list_models() -> list[str]:
    """Names of the Ovis-U1 checkpoint folders (config.json with model_type ovis_u1) under the model roots."""
    return list(dict.fromkeys(p.name for p in find_model_dirs(model_roots())))


def resolve_model(name: str) -> Path | None:
    """The folder of the listed model ``name``; None for a name that is not one entry of a model root (an absolute
    path, ``..``, a path through a folder): see ``ovis_u1.checkpoint.model_dir_named``."""
    return model_dir_named(name, model_roots())


# --------------------------------------------------------------------------------------------- devices, dtypes
def load_device() -> torch.device:
    return mm.get_torch_device()


def offload_device(part: str = "llm") -> torch.device:
    return mm.vae_offload_device() if part == "vae" else mm.unet_offload_device()


def intermediate_device() -> torch.device:
    return mm.intermediate_device()


def auto_dtype() -> torch.dtype:
    """The dtype ComfyUI's model management recommends for the load device (bf16 where it is fast, else fp32; fp16 is
    left to an explicit choice, as for ComfyUI's other Qwen-based models). fp32 on a GPU is said on the console
    (``ovis_u1.operations.fp32_on_gpu_note``): it doubles the weights' memory, and the user may prefer fp16."""
    device = load_device()
    dtype = mm.unet_dtype(device, supported_dtypes=[torch.bfloat16, torch.float32])
    if dtype == torch.float32 and not mm.is_device_cpu(device):
        log.warning(operations.fp32_on_gpu_note(device))
    return dtype


def latent_size(latent, name: str = "latent") -> tuple[int, int]:
    """(width, height) in pixels of a LATENT of images."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or samples.shape[0] == 0:
        raise OvisU1InputError(f"{name}: expected a LATENT of images [B, 4, H/8, W/8]; connect an EmptyLatentImage or "
                               "the 'latent' output of 'Ovis-U1 Edit Context Encoder'")
    return samples.shape[-1] * 8, samples.shape[-2] * 8


# ------------------------------------------------------------------------------------ progress and interruption
def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException when the user pressed Cancel."""
    mm.throw_exception_if_processing_interrupted()


class Progress:
    """A ProgressBar on the running node, checking for interruption on every update."""

    def __init__(self, total: int):
        self.total = total
        self.bar = comfy.utils.ProgressBar(total)

    def update(self, done: int) -> None:
        check_interrupt()
        self.bar.update_absolute(done, self.total)

    def finish(self) -> None:
        """Fill the bar (generation may stop before ``total``); never interrupts finished work."""
        self.bar.update_absolute(self.total, self.total)
