"""ComfyUI IMAGE (float [B, H, W, C] in 0..1) ↔ PIL images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..ovis_u1 import OvisU1InputError
from ..ovis_u1.inputs import check_finite, check_not_empty


def _check(image, name: str) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise OvisU1InputError(f"{name}: expected an IMAGE tensor, got {type(image).__name__}")
    if image.ndim == 3:  # a single H×W×C image without the batch dimension
        image = image[None]
    if image.ndim != 4 or not 1 <= image.shape[-1] <= 4:
        raise OvisU1InputError(
            f"{name}: expected an IMAGE batch [B, H, W, C] with 1–4 channels, got shape {list(image.shape)}"
        )
    check_not_empty(image, name, "images", "connect an IMAGE that holds at least one image (e.g. from 'Load Image')")
    if not image.is_floating_point():
        raise OvisU1InputError(f"{name}: expected a float IMAGE with values 0..1, got {image.dtype}; convert it "
                               "(divide 8-bit values by 255)")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise OvisU1InputError(f"{name}: the image is empty ({image.shape[2]}×{image.shape[1]})")
    return check_finite(image, name, "the node that made this image computed NaN/inf; fix or replace that node "
                                      "(NaN is never treated as black here)")


def to_pil_list(image: torch.Tensor, name: str = "image") -> list[Image.Image]:
    """Every image of a batch as an RGB PIL image: 0..1 → uint8 by rounding; alpha dropped, greyscale expanded."""
    image = _check(image, name)
    pixels = image.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8)
    channels = pixels.shape[-1]
    if channels in (1, 2):  # greyscale (with alpha)
        pixels = pixels[..., :1].expand(*pixels.shape[:-1], 3)
    elif channels == 4:  # RGBA
        pixels = pixels[..., :3]
    return [Image.fromarray(np.ascontiguousarray(p.numpy()), "RGB") for p in pixels]


def to_pil(image: torch.Tensor, name: str = "image") -> Image.Image:
    """The one image of a batch of one; a larger batch is an error that names the input."""
    images = to_pil_list(image, name)
    if len(images) != 1:
        raise OvisU1InputError(
            f"{name}: got a batch of {len(images)} images, but this input takes one image; pick one "
            "(e.g. with the core 'ImageFromBatch' node) or run the node once per image"
        )
    return images[0]


def from_pil(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image → IMAGE [1, H, W, 3] float32 (as ComfyUI's LoadImage makes it)."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]
