"""The only package of the pack that touches ComfyUI internals.

Every use is optional: without ComfyUI (CI, a plain Python shell) model folders come from
``ovis_u1.checkpoint.default_model_roots`` ($OVIS_U1_MODELS_DIR, ./models/ovis_u1, the surrounding ComfyUI's),
everything runs on the CPU in fp32, and there is no progress bar, no preview and no interruption. Inside ComfyUI the three parts of a loaded model (LLM + visual encoder, MMDiT, VAE) are built from ComfyUI's
operations (``comfy.ops``) and wrapped in patchers (``memory``), so ComfyUI's model management moves them to the GPU
when a node needs them, loads them partially and streams the rest when they do not fit, and offloads or frees them
when another model needs the memory. ``native`` makes the MMDiT a core MODEL and the VAE a core VAE.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ovis_u1.checkpoint import default_model_roots, find_model_dirs

try:  # ComfyUI's own modules; absent outside ComfyUI
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils
    import folder_paths
except ImportError:
    mm = None

MODEL_FOLDER = "ovis_u1"
IN_COMFYUI = mm is not None

log = logging.getLogger("ComfyUI-Ovis-U1")


# ------------------------------------------------------------------------------------------------ model folders
def register_model_folder() -> None:
    """Make ``models/ovis_u1`` a ComfyUI model folder; ``ovis_u1:`` entries of extra_model_paths.yaml add to it."""
    if IN_COMFYUI:
        folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER))


def model_roots() -> list[Path]:
    """The folders searched for Ovis-U1 checkpoint folders, in priority order."""
    if IN_COMFYUI:
        return [Path(p) for p in folder_paths.get_folder_paths(MODEL_FOLDER)]
    return default_model_roots()


def list_models() -> list[str]:
    """Names of the Ovis-U1 checkpoint folders (config.json with model_type ovis_u1) under the model roots."""
    return list(dict.fromkeys(p.name for p in find_model_dirs(model_roots())))


def resolve_model(name: str) -> Path | None:
    """The checkpoint folder called ``name``; failing that any folder of that name (so that loading it explains what
    is wrong with it); None when no root has it."""
    for path in find_model_dirs(model_roots()):
        if path.name == name:
            return path
    for root in model_roots():
        if (root / name).is_dir():
            return root / name
    return None


# --------------------------------------------------------------------------------------------- devices, dtypes
def load_device() -> torch.device:
    return mm.get_torch_device() if IN_COMFYUI else torch.device("cpu")


def offload_device(part: str = "llm") -> torch.device:
    if not IN_COMFYUI:
        return torch.device("cpu")
    return mm.vae_offload_device() if part == "vae" else mm.unet_offload_device()


def intermediate_device() -> torch.device:
    return mm.intermediate_device() if IN_COMFYUI else torch.device("cpu")


def auto_dtype() -> torch.dtype:
    """The dtype ComfyUI's model management recommends for the load device (bf16 where it is fast, else fp32; fp16 is
    left to an explicit choice, as for ComfyUI's other Qwen-based models)."""
    if not IN_COMFYUI:
        return torch.float32
    return mm.unet_dtype(load_device(), supported_dtypes=[torch.bfloat16, torch.float32])


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------------ progress and interruption
def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException when the user pressed Cancel."""
    if IN_COMFYUI:
        mm.throw_exception_if_processing_interrupted()


class Progress:
    """A ProgressBar on the running node, checking for interruption on every update; ``latent_preview=True`` also
    sends previews of the SDXL-VAE latents (scaled, [1, 4, h, w]) passed to ``update``."""

    def __init__(self, total: int, latent_preview: bool = False):
        self.total = total
        self.bar = comfy.utils.ProgressBar(total) if IN_COMFYUI else None
        self.previewer = None
        if self.bar is not None and latent_preview:
            try:
                import latent_preview
                from comfy.latent_formats import SDXL

                self.previewer = latent_preview.get_previewer(load_device(), SDXL())
            except (ImportError, AttributeError) as e:  # an older or newer ComfyUI without this API: no previews
                log.debug("Ovis-U1: latent previews unavailable (%s)", e)

    @property
    def previews(self) -> bool:
        return self.previewer is not None

    def update(self, done: int, latent: torch.Tensor | None = None) -> None:
        check_interrupt()
        if self.bar is None:
            return
        preview = None
        if self.previewer is not None and latent is not None and latent.ndim == 4 and latent.shape[1] == 4:
            preview = self.previewer.decode_latent_to_preview_image("JPEG", latent.float())
        self.bar.update_absolute(done, self.total, preview)

    def finish(self) -> None:
        """Fill the bar (generation may stop before ``total``); never interrupts finished work."""
        if self.bar is not None:
            self.bar.update_absolute(self.total, self.total)


from .memory import WEIGHT_DTYPES, ManagedModel, load_ovis  # noqa: E402  (needs the helpers above)
