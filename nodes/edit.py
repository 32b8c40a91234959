"""Ovis-U1 Edit Context Encoder: the image to edit → what an edit needs, with the image checked and resized once."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..ovis_u1.model import edit_source

from .comfy_bridge import core_vae
from .image import from_pil, to_pil


class OvisU1EditContextEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OvisU1EditContextEncoder", display_name="Ovis-U1 Edit Context Encoder", category="Ovis-U1",
            description=(
                "Resizes the image to edit to the size the official edit uses (its aspect ratio at about one "
                "megapixel) and encodes it with Ovis-U1's VAE (a seeded sample of the posterior, as the official "
                "edit draws it). Gives the resized image for Encode Condition, the source latent (context) for "
                "Encode Condition, and an empty latent at the edit size to sample."
            ),
            search_aliases=["instruct edit", "image edit", "edit image", "VAE encode"],
            inputs=[
                io.Vae.Input("vae", tooltip="The 'vae' output of 'Ovis-U1 Model Loader'."),
                io.Image.Input("image", tooltip="The image to edit (one image)."),
                io.Int.Input("seed", default=42, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip=(
                    "Seed of the VAE posterior sample of the image (the official edit draws it with the sampling "
                    "seed, 42 in the demo)."),
                    control_after_generate=False),  # the frontend would add 'randomize' to any input named seed
            ],
            outputs=[
                io.Image.Output(display_name="resized_image", tooltip=(
                    "The image at the edit size (the size of the result), for the image input of 'Ovis-U1 Encode "
                    "Condition'.")),
                io.Latent.Output(display_name="context", tooltip=(
                    "The source latent (raw VAE latent), for the context input of 'Ovis-U1 Encode Condition'.")),
                io.Latent.Output(display_name="latent", tooltip=(
                    "An empty latent at the edit size, to sample with 'Ovis-U1 MMDiT Sampler' (or a core "
                    "sampler).")),
            ],
        )

    @classmethod
    def execute(cls, vae, image, seed: int) -> io.NodeOutput:
        source = edit_source(to_pil(image, "image"))
        latent = core_vae.encode_edit_source(vae, source, seed)
        return io.NodeOutput(from_pil(source), {"samples": latent}, {"samples": torch.zeros_like(latent)})
