"""Scaled fp8 weight storage: each matrix stored as float8_e4m3fn values and one scale, ``weight = values · scale``.

Unscaled e4m3fn keeps a weight's own magnitude, and most weights of a network are a few hundredths: below 2⁻⁶ (the
smallest normal e4m3 number) only subnormals are left, with fewer significant bits the smaller the value. Dividing a
matrix by a scale first moves its largest magnitude to just under e4m3's maximum (448), so its values use the normal
range (3 mantissa bits everywhere down to 2⁻⁶ of the largest). The scale is made here, at load time, from the
checkpoint's own weights.

The scale is a power of two: dividing by it and multiplying by it are exact in every float dtype (only the exponent
changes), so a stored weight dequantizes to the same number in bf16, fp16 and fp32, whichever side multiplies
(``values.to(dtype) * scale.to(dtype)``, as ComfyUI's ``comfy_kitchen`` dequantizes a ``TensorCoreFP8Layout``), and
a weight that already is an e4m3 value times a power of two survives the round trip unchanged. It costs at most one
binade: the largest magnitude lands in [224, 448] instead of exactly 448.

One scale per tensor, not per output channel: with power-of-two scales the two store the same values except where a
row's largest weight is a binade or more below the tensor's, 0.01 % of the stored values of the mid-size checkpoint
(bench/mid_checkpoint.py), and their weight error is the same (2.6 % rms, unscaled e4m3fn 3.0 %); the t2i renders
(256², 4 steps) differ as two noisy samples do (README, "Memory and speed"). One scale per tensor is what ComfyUI's fp8
layout and its scaled matmul take (comfy/quant_ops.py ``TensorCoreFP8E4M3Layout``; ``torch._scaled_mm`` with a
per-tensor scale), so inside ComfyUI the same stored values run through ComfyUI's own path.

The stored form is that of ComfyUI's scaled-fp8 checkpoints (comfy/ops.py ``mixed_precision_ops``, its
``_load_from_state_dict``; comfy/utils.py ``convert_old_quants``): next to ``<layer>.weight`` (the e4m3fn values), a
float32 ``<layer>.weight_scale`` and a ``<layer>.comfy_quant`` marker (the JSON ``{"format": "float8_e4m3fn"}`` as
uint8 bytes). Layers that read that form hold ComfyUI's quantized tensor; the pack's own manual cast
(:mod:`ovis_u1.operations`) reads it as a ``weight_scale`` buffer.
"""

from __future__ import annotations

import json

import torch
from torch import Tensor

SCALED_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(SCALED_DTYPE).max  # 448
SCALE_KEY = "weight_scale"
MARKER_KEY = "comfy_quant"
MARKER_FORMAT = "float8_e4m3fn"  # the format name ComfyUI's marker gives e4m3fn (comfy/quant_ops.py QUANT_ALGOS)
PER_CHANNEL = False  # one scale per tensor (see the module docstring); True: one per output channel (row)


def fp8_scale(weight: Tensor, per_channel: bool = PER_CHANNEL) -> Tensor:
    """The smallest power of two ``s`` with ``max|weight| / s ≤ 448`` (float32; 1 for an all-zero tensor), one for
    the tensor (shape ``()``) or, ``per_channel``, one per output channel (shape ``(out, 1, …)``, broadcasting)."""
    if per_channel:
        magnitude = weight.detach().abs().float()
        amax = magnitude.reshape(magnitude.shape[0], -1).amax(dim=1).reshape(-1, *([1] * (weight.dim() - 1)))
    else:  # max(|min|, |max|): max|weight| without a copy of the matrix
        amax = torch.stack(torch.aminmax(weight.detach())).abs().amax().float()
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    return torch.where(amax > 0, scale, torch.ones_like(scale))


QUANTIZE_CHUNK = 1 << 18  # values divided and rounded at a time: no second full-width copy of a matrix


def quantize(weight: Tensor, scale: Tensor) -> Tensor:
    """``weight / scale`` rounded to e4m3fn (exact division: ``scale`` is a power of two), ``weight`` (at least 1-D)
    a few rows at a time."""
    out = torch.empty(weight.shape, dtype=SCALED_DTYPE, device=weight.device)
    scale = scale.to(weight.device)
    rows = max(1, QUANTIZE_CHUNK // max(1, weight[0].numel())) if weight.numel() else 1
    for first in range(0, weight.shape[0], rows):
        part = slice(first, first + rows)
        divided = weight[part].float() / (scale[part] if scale.dim() else scale)
        out[part] = divided.clamp_(-FP8_MAX, FP8_MAX).to(SCALED_DTYPE)
    return out


def dequantize(values: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The weight ``values · scale`` in ``dtype`` (exact: ``values`` fit every float dtype and ``scale`` is a power
    of two), on ``values``' device."""
    return values.to(dtype) * scale.to(device=values.device, dtype=dtype)


def marker() -> Tensor:
    """The ``comfy_quant`` entry that says a layer's weight is scaled e4m3fn."""
    return torch.tensor(list(json.dumps({"format": MARKER_FORMAT}).encode()), dtype=torch.uint8)


def scaled_entries(key: str, weight: Tensor) -> dict[str, Tensor]:
    """The state-dict entries that store ``weight`` (under ``key``, ``<layer>.weight``) as scaled e4m3fn."""
    layer = key[: -len("weight")]
    scale = fp8_scale(weight)
    return {key: quantize(weight, scale), layer + SCALE_KEY: scale, layer + MARKER_KEY: marker()}


def pop_scale(state: dict[str, Tensor], prefix: str) -> Tensor | None:
    """A layer's scale out of its state-dict entries (None: not scaled), the marker taken out with it."""
    state.pop(prefix + MARKER_KEY, None)
    return state.pop(prefix + SCALE_KEY, None)


def hold_scaled(state: dict[str, Tensor], prefix: str, make) -> None:
    """A layer's scaled entries in ``state`` replaced by the one weight ``make(values, scale)`` (a host's quantized
    tensor, for layers that do not read the stored form themselves)."""
    scale = pop_scale(state, prefix)
    if scale is not None:
        state[prefix + "weight"] = make(state[prefix + "weight"], scale)
