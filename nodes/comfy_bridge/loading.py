"""A checkpoint folder → what the Model Loader gives: the encoder, the MMDiT as a core MODEL, the VAE as a core VAE.

Inside ComfyUI the model is built from ComfyUI's operations (``memory.comfy_operations``) with the MMDiT class of the
core MODEL (``core_model.OvisU1MMDiT``), on the offload device: ComfyUI moves each part to the GPU when a node uses it.
"""

from __future__ import annotations

import torch

from ...ovis_u1 import load_model

from .host import IN_COMFYUI, offload_device
from .memory import OvisU1Encoder, comfy_operations

if IN_COMFYUI:
    from .attention import comfy_kernel
    from .core_model import OvisU1MMDiT, make_core_model
    from .core_vae import make_core_vae


def load_ovis(path, dtype: torch.dtype, weight_dtype: str | None = None, attention: str = "auto"):
    """``ovis_u1.load_model`` with ComfyUI's operations and the MMDiT class of the core MODEL (inside ComfyUI) and
    the weight-storage choice, on the offload device: ComfyUI moves each part to the GPU when a node uses it."""
    kwargs = {}
    if IN_COMFYUI:
        kwargs["operations"] = comfy_operations(dtype, weight_dtype)
        kwargs["encoder_operations"] = comfy_operations(dtype, weight_dtype, fp8_matmul=False)
        kwargs["mmdit_class"] = OvisU1MMDiT
    if weight_dtype is not None:
        kwargs["weight_dtype"] = weight_dtype
    return load_model(path, device=offload_device(), dtype=dtype, attention=attention, **kwargs)


def load(path, dtype: torch.dtype, weight_dtype: str | None = None, attention: str = "auto", name: str = ""):
    """A checkpoint folder as (encoder, core MODEL, core VAE); outside ComfyUI the last two are None."""
    ovis = load_ovis(path, dtype, weight_dtype=weight_dtype, attention=attention)
    if not IN_COMFYUI:
        return OvisU1Encoder(ovis, attention, name, dtype), None, None
    if attention == "auto":  # ComfyUI's selection (its flags); sdpa / flash_attn force the pack's own
        ovis.set_attention(comfy_kernel())
    return OvisU1Encoder(ovis, attention, name, dtype), make_core_model(ovis, dtype), make_core_vae(ovis)
