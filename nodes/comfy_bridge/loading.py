"""A checkpoint folder → what the Model Loader gives: the encoder, the MMDiT as a core MODEL, the VAE as a core VAE,
built from ComfyUI's operations on the offload device (ComfyUI moves each part to the GPU when a node uses it).

Each part's patcher is rebuildable as core's loaders make theirs (comfy/sd.py ``load_diffusion_model``): its
``cached_patcher_init`` is ``load_patcher`` with the loader's arguments, which ``ModelPatcher.clone(disable_dynamic=
True)`` (ComfyUI ≥ 0.18) and multi-GPU deep clones call. A rebuild loads the whole folder again and keeps one part.
"""

from __future__ import annotations

import torch

from ...ovis_u1 import load_model

from . import file_slices
from .attention import comfy_kernel
from .core_model import OvisU1MMDiT, make_core_model
from .core_vae import make_core_vae
from .host import offload_device
from .memory import OvisU1Encoder, comfy_operations

PARTS = ("encoder", "model", "vae")  # the loader's outputs, in order


def load_ovis(path, dtype: torch.dtype, weight_dtype: str | None = None, attention: str = "auto"):
    """``ovis_u1.load_model`` with ComfyUI's operations, the MMDiT class of the core MODEL and the weight-storage
    choice, on the offload device. With ``attention`` auto the model attends with ComfyUI's selection (its flags);
    sdpa / flash_attn force the pack's own."""
    kwargs = {} if weight_dtype is None else {"weight_dtype": weight_dtype}
    ovis = load_model(path, device=offload_device(), dtype=dtype, attention=attention,
                      operations=comfy_operations(dtype, weight_dtype),
                      encoder_operations=comfy_operations(dtype, weight_dtype, fp8_matmul=False),
                      mmdit_class=OvisU1MMDiT,
                      mark_file_slice=file_slices.marker(),  # Dynamic VRAM reads the weights from their file
                      **kwargs)
    if attention == "auto":
        ovis.set_attention(comfy_kernel())
    return ovis


def load(path, dtype: torch.dtype, weight_dtype: str | None = None, attention: str = "auto", name: str = ""):
    """A checkpoint folder as (encoder, core MODEL, core VAE)."""
    ovis = load_ovis(path, dtype, weight_dtype=weight_dtype, attention=attention)
    outputs = tuple(make_part(ovis, part, dtype, attention, name) for part in PARTS)
    for part, output in zip(PARTS, outputs):
        make_rebuildable(patcher_of(output), path, dtype, weight_dtype, attention, part)
    return outputs


def load_patcher(path, dtype: torch.dtype, weight_dtype: str | None, attention: str, part: str,
                 disable_dynamic: bool = False):
    """The patcher of one part (``PARTS``) of the checkpoint folder loaded anew, as ``load`` made it: ComfyUI's
    ``cached_patcher_init`` factory of the three patchers. ``disable_dynamic``: a plain ``ModelPatcher``."""
    ovis = load_ovis(path, dtype, weight_dtype=weight_dtype, attention=attention)
    patcher = patcher_of(make_part(ovis, part, dtype, attention, disable_dynamic=disable_dynamic))
    return make_rebuildable(patcher, path, dtype, weight_dtype, attention, part)


def make_rebuildable(patcher, path, dtype: torch.dtype, weight_dtype: str | None, attention: str, part: str):
    """``patcher`` with ComfyUI's ``cached_patcher_init``: ``load_patcher`` and the arguments that load it again."""
    patcher.cached_patcher_init = (load_patcher, (path, dtype, weight_dtype, attention, part))
    return patcher


def make_part(ovis, part: str, dtype: torch.dtype, attention: str, name: str = "", disable_dynamic: bool = False):
    """One output of the loader over a loaded OvisU1: the encoder, the core MODEL (a patcher) or the core VAE."""
    if part == "encoder":
        return OvisU1Encoder(ovis, attention, name, dtype, disable_dynamic)
    if part == "model":
        return make_core_model(ovis, dtype, disable_dynamic)
    return make_core_vae(ovis, disable_dynamic)


def patcher_of(output):
    """The patcher ComfyUI manages an output of the loader by (the MODEL is one)."""
    return getattr(output, "patcher", output)
