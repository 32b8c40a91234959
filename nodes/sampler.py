"""Ovis-U1 MMDiT Sampler (the official recipe on ComfyUI's sampling) and Ovis-U1 Scheduler (its SIGMAS)."""

from __future__ import annotations

import torch

from ..ovis_u1 import OvisU1InputError
from ..ovis_u1.model import MAX_CFG

from . import comfy_bridge as bridge

SHIFT = {"config": None, "on": True, "off": False}
SHIFT_INPUT = (list(SHIFT), {
    "default": "config",
    "tooltip": "Resolution-dependent shift of the schedule towards noise. config: as the checkpoint's config.json "
               "says (Ovis-U1-3B: off); on / off: override it.",
})
MODEL_INPUT = ("MODEL", {"tooltip": "The 'model' output of 'Ovis-U1 Model Loader' (LoRAs and patches apply)."})
LATENT_INPUT = ("LATENT", {
    "tooltip": "The latent to sample; its size is the image size (text-to-image: EmptyLatentImage, the same one as on "
               "Encode Condition; edit: the 'latent' of the Edit Context Encoder).",
})


def _shift(timestep_shift):
    if timestep_shift not in SHIFT:
        raise OvisU1InputError(f"timestep_shift {timestep_shift!r} is unknown: use one of {', '.join(SHIFT)}")
    return SHIFT[timestep_shift]


class OvisU1Sampler:
    DESCRIPTION = (
        "The official Ovis-U1 sampling in one node, run by ComfyUI's own sampler (so LoRAs, patches and caches on the "
        "MODEL apply): euler over the Ovis-U1 schedule with classifier-free guidance. Text-to-image: txt_cfg guides "
        "towards the prompt. Edit (connect middle): img_cfg towards the source image, txt_cfg towards the instruction."
    )
    CATEGORY = "Ovis-U1"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The sampled latent; decode it with VAEDecode and the loader's 'vae'.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL_INPUT,
                "positive": ("CONDITIONING", {"tooltip": "'positive' of 'Ovis-U1 Encode Condition' (or the Refiner)."}),
                "negative": ("CONDITIONING", {"tooltip": "'negative' of 'Ovis-U1 Encode Condition' (or the Refiner)."}),
                "latent": LATENT_INPUT,
                "seed": ("INT", {
                    "default": 42, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                    "tooltip": "Seed of the starting noise (official demo: 42).",
                }),
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000,
                                  "tooltip": "Number of Euler steps (official: 50)."}),
                "txt_cfg": ("FLOAT", {
                    "default": 5.0, "min": 0.0, "max": MAX_CFG, "step": 0.1, "round": 0.01,
                    "tooltip": "Text guidance scale (official: 5 for text-to-image, 6 for edit); 1 = no guidance.",
                }),
                "img_cfg": ("FLOAT", {
                    "default": 1.5, "min": 0.0, "max": MAX_CFG, "step": 0.1, "round": 0.01,
                    "tooltip": "Image guidance scale of an edit (official: 1.5); not used for text-to-image.",
                }),
                "timestep_shift": SHIFT_INPUT,
            },
            "optional": {
                "middle": ("CONDITIONING", {
                    "tooltip": "Edit: 'middle' of 'Ovis-U1 Encode Condition' (the image-only branch). Not needed for "
                               "text-to-image.",
                }),
            },
        }

    def sample(self, model, positive, negative, latent, seed=42, steps=50, txt_cfg=5.0, img_cfg=1.5,
               timestep_shift="config", middle=None):
        return (bridge.sampling.sample(model, positive, negative, latent, seed, steps, txt_cfg, img_cfg,
                                       _shift(timestep_shift), middle=middle),)


class OvisU1Scheduler:
    DESCRIPTION = (
        "The official Ovis-U1 time schedule as SIGMAS for SamplerCustomAdvanced: linear from 1 to 0, bent by the "
        "resolution-dependent shift when the checkpoint's config turns it on (Ovis-U1-3B: off)."
    )
    CATEGORY = "Ovis-U1"
    RETURN_TYPES = ("SIGMAS",)
    OUTPUT_TOOLTIPS = ("steps + 1 noise levels from 1 to 0, for SamplerCustomAdvanced's sigmas.",)
    FUNCTION = "schedule"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL_INPUT,
                "latent": LATENT_INPUT,
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "Number of steps (official: 50)."}),
                "timestep_shift": SHIFT_INPUT,
                "denoise": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "Below 1: only the last part of the schedule (image-to-image on a VAE-encoded latent).",
                }),
            },
        }

    def schedule(self, model, latent, steps=50, timestep_shift="config", denoise=1.0):
        shift = _shift(timestep_shift)
        if denoise <= 0.0:
            return (torch.zeros(0),)  # as BasicScheduler: nothing to do
        return (bridge.sampling.schedule(model, latent, steps, shift, denoise),)
