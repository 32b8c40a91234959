"""Ovis-U1 Edit Context Encoder: the image to edit → what an edit needs, with the image checked and resized once."""

from __future__ import annotations

import torch

from ..ovis_u1.model import edit_source

from . import comfy_bridge as bridge
from .image import from_pil, to_pil


class OvisU1EditContextEncoder:
    DESCRIPTION = (
        "Resizes the image to edit to the size the official edit uses (its aspect ratio at about one megapixel) and "
        "encodes it with Ovis-U1's VAE (a seeded sample of the posterior, as the official edit draws it). Gives the "
        "resized image for Encode Condition, the source latent (context) for Encode Condition, and an empty latent "
        "at the edit size to sample."
    )
    CATEGORY = "Ovis-U1"
    RETURN_TYPES = ("IMAGE", "LATENT", "LATENT")
    RETURN_NAMES = ("resized_image", "context", "latent")
    OUTPUT_TOOLTIPS = (
        "The image at the edit size (the size of the result), for the image input of 'Ovis-U1 Encode Condition'.",
        "The source latent (raw VAE latent), for the context input of 'Ovis-U1 Encode Condition'.",
        "An empty latent at the edit size, to sample with 'Ovis-U1 MMDiT Sampler' (or a core sampler).",
    )
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("VAE", {"tooltip": "The 'vae' output of 'Ovis-U1 Model Loader'."}),
                "image": ("IMAGE", {"tooltip": "The image to edit (one image)."}),
                "seed": ("INT", {
                    "default": 42, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                    "control_after_generate": False,  # the frontend would add 'randomize' to any input named seed
                    "tooltip": "Seed of the VAE posterior sample of the image (the official edit draws it with the "
                               "sampling seed, 42 in the demo).",
                }),
            }
        }

    def encode(self, vae, image, seed=42):
        source = edit_source(to_pil(image, "image"))
        latent = bridge.core_vae.encode_edit_source(vae, source, seed)
        return (from_pil(source), {"samples": latent}, {"samples": torch.zeros_like(latent)})
