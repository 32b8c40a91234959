"""Ovis-U1 MMDiT Sampler (the official recipe on ComfyUI's sampling) and Ovis-U1 Scheduler (its SIGMAS)."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..ovis_u1.model import MAX_CFG

from .comfy_bridge import sampling

SHIFT = {"config": None, "on": True, "off": False}


def shift_input():
    return io.Combo.Input("timestep_shift", options=list(SHIFT), default="config", tooltip=(
        "Resolution-dependent shift of the schedule towards noise. config: as the checkpoint's config.json says "
        "(Ovis-U1-3B: off); on / off: override it."))


def model_input():
    return io.Model.Input("model", tooltip="The 'model' output of 'Ovis-U1 Model Loader' (LoRAs and patches apply).")


def latent_input():
    return io.Latent.Input("latent", tooltip=(
        "The latent to sample; its size is the image size (text-to-image: EmptyLatentImage, the same one as on Encode "
        "Condition; edit: the 'latent' of the Edit Context Encoder)."))


class OvisU1Sampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OvisU1Sampler", display_name="Ovis-U1 MMDiT Sampler", category="Ovis-U1",
            description=(
                "The official Ovis-U1 sampling in one node, run by ComfyUI's own sampler (so LoRAs, patches and "
                "caches on the MODEL apply): euler over the Ovis-U1 schedule with classifier-free guidance. "
                "Text-to-image: txt_cfg guides towards the prompt. Edit (connect middle): img_cfg towards the source "
                "image, txt_cfg towards the instruction."
            ),
            search_aliases=["KSampler", "text to image", "instruct edit", "generate image", "unified"],
            inputs=[
                model_input(),
                io.Conditioning.Input("positive", tooltip="'positive' of 'Ovis-U1 Encode Condition' (or the Refiner)."),
                io.Conditioning.Input("negative", tooltip="'negative' of 'Ovis-U1 Encode Condition' (or the Refiner)."),
                latent_input(),
                io.Int.Input("seed", default=42, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the starting noise (official demo: 42)."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Number of Euler steps (official: 50)."),
                io.Float.Input("txt_cfg", default=5.0, min=0.0, max=MAX_CFG, step=0.1, round=0.01, tooltip=(
                    "Text guidance scale (official: 5 for text-to-image, 6 for edit); 1 = no guidance.")),
                io.Float.Input("img_cfg", default=1.5, min=0.0, max=MAX_CFG, step=0.1, round=0.01, tooltip=(
                    "Image guidance scale of an edit (official: 1.5); not used for text-to-image.")),
                shift_input(),
                io.Conditioning.Input("middle", optional=True, tooltip=(
                    "Edit: 'middle' of 'Ovis-U1 Encode Condition' (the image-only branch). Not needed for "
                    "text-to-image.")),
            ],
            outputs=[io.Latent.Output(tooltip="The sampled latent; decode it with VAEDecode and the loader's 'vae'.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, seed: int, steps: int, txt_cfg: float, img_cfg: float,
                timestep_shift: str, middle=None) -> io.NodeOutput:
        return io.NodeOutput(sampling.sample(model, positive, negative, latent, seed, steps, txt_cfg, img_cfg,
                                             SHIFT[timestep_shift], middle=middle))


class OvisU1Scheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OvisU1Scheduler", display_name="Ovis-U1 Scheduler", category="Ovis-U1",
            description=(
                "The official Ovis-U1 time schedule as SIGMAS for SamplerCustomAdvanced: linear from 1 to 0, bent by "
                "the resolution-dependent shift when the checkpoint's config turns it on (Ovis-U1-3B: off)."
            ),
            search_aliases=["sigmas", "schedule", "flow matching scheduler"],
            inputs=[
                model_input(),
                latent_input(),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Number of steps (official: 50)."),
                shift_input(),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=(
                    "Below 1: only the last part of the schedule (image-to-image on a VAE-encoded latent).")),
            ],
            outputs=[io.Sigmas.Output(tooltip="steps + 1 noise levels from 1 to 0, for SamplerCustomAdvanced's "
                                              "sigmas.")],
        )

    @classmethod
    def execute(cls, model, latent, steps: int, timestep_shift: str, denoise: float) -> io.NodeOutput:
        if denoise <= 0.0:
            return io.NodeOutput(torch.zeros(0))  # as BasicScheduler: nothing to do
        return io.NodeOutput(sampling.schedule(model, latent, steps, SHIFT[timestep_shift], denoise))
