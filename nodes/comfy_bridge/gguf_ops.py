"""GGUF-quantized layers (``ovis_u1.gguf``) under ComfyUI's memory management: the raw blocks are what ComfyUI moves,
counts and streams; this cast dequantizes them on the compute device, then applies the patches ComfyUI gave the layer
(a LoRA: ``weight_function`` under lowvram, ``weight_lowvram_function`` under Dynamic VRAM; comfy/ops.py
``cast_bias_weight`` applies both after its own cast) — to the dense weight, never to the blocks."""

from __future__ import annotations

import contextlib

import comfy.model_management as mm

from ...ovis_u1.gguf import dequantized


def _patches(layer, name: str) -> list:
    lowvram = getattr(layer, f"{name}_lowvram_function", None)
    return ([lowvram] if lowvram is not None else []) + list(getattr(layer, f"{name}_function", []))


@contextlib.contextmanager
def cast_quantized_weights(layer, like):
    weight = dequantized(layer, mm.cast_to(layer.weight, None, like.device), like.dtype)
    for patch in _patches(layer, "weight"):
        weight = patch(weight)
    bias = getattr(layer, "bias", None)
    bias = None if bias is None else mm.cast_to(bias, like.dtype, like.device, copy=True)
    for patch in _patches(layer, "bias") if bias is not None else ():
        bias = patch(bias)
    yield weight, bias
