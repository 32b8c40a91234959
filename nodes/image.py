"""ComfyUI IMAGE (float [B, H, W, C] in 0..1) ↔ PIL images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..ovis_u1 import OvisU1InputError
from ..ovis_u1.inputs import check_host_image


def to_pil_list(image: torch.Tensor, name: str = "image") -> list[Image.Image]:
    """Every image of a batch as an RGB PIL image (``check_host_image``: alpha dropped, greyscale expanded): 0..1 →
    uint8 by rounding."""
    image = check_host_image(image, name, max_pixels=None)
    pixels = image.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8)
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
