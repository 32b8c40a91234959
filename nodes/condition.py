"""Ovis-U1 Encode Condition (prompt [+ image] → CONDITIONING of every guidance branch) and Ovis-U1 Refiner."""

from __future__ import annotations

import dataclasses

from ..ovis_u1 import OvisU1InputError, estimates

from . import comfy_bridge as bridge
from .comfy_bridge.conditioning import conditioning_outputs
from .image import to_pil
from .loader import ENCODER_TYPE

MODES = {"text-to-image": "t2i", "edit": "edit"}


class OvisU1EncodeCondition:
    DESCRIPTION = (
        "Runs the prompt (and for an edit the source image) through Ovis-U1's visual encoder and LLM once, giving "
        "the CONDITIONING of every classifier-free-guidance branch the mode needs: text-to-image prompt and "
        "unconditional; edit prompt, image-only and unconditional, the first two carrying the source latent."
    )
    CATEGORY = "Ovis-U1"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "middle", "negative")
    OUTPUT_TOOLTIPS = (
        "The prompt branch (official 'cond'): positive of 'Ovis-U1 MMDiT Sampler', CFGGuider, KSampler; cond1 of "
        "DualCFGGuider.",
        "The image-only branch of an edit (official 'no_txt', with the source latent): middle of the MMDiT Sampler, "
        "cond2 of DualCFGGuider. Text-to-image has none: the same as negative.",
        "The unconditional branch (official 'no_both'): negative of every sampler and guider.",
    )
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "encoder": (ENCODER_TYPE, {"tooltip": "The 'encoder' output of 'Ovis-U1 Model Loader'."}),
                "prompt": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "What the image should show (text-to-image) or how to change the image (edit).",
                }),
                "mode": (list(MODES), {
                    "default": "text-to-image",
                    "tooltip": "text-to-image: draw from the prompt on a white canvas of the latent's size. edit: "
                               "change the image as the prompt says.",
                }),
            },
            "optional": {
                "latent": ("LATENT", {
                    "tooltip": "Text-to-image: the latent you will sample (e.g. EmptyLatentImage); its size is the "
                               "canvas the prompt is drawn on. Not used for an edit.",
                }),
                "image": ("IMAGE", {
                    "tooltip": "Edit: the 'resized_image' of 'Ovis-U1 Edit Context Encoder' (one image).",
                }),
                "context": ("LATENT", {
                    "tooltip": "Edit: the 'context' of 'Ovis-U1 Edit Context Encoder' (the source latent), attached "
                               "to positive and middle.",
                }),
            },
        }

    def encode(self, encoder, prompt, mode="text-to-image", latent=None, image=None, context=None):
        if mode not in MODES:
            raise OvisU1InputError(f"mode {mode!r} is unknown: use one of {', '.join(MODES)}")
        mode = MODES[mode]
        source = reference = None
        if mode == "t2i":
            if latent is None:
                raise OvisU1InputError("latent: text-to-image draws on a canvas of the latent's size: connect the "
                                       "latent you will sample (e.g. EmptyLatentImage)")
            width, height = bridge.latent_size(latent, "latent")
        else:
            if image is None or context is None:
                missing = "image" if image is None else "context"
                raise OvisU1InputError(f"{missing}: an edit needs the 'resized_image' and the 'context' of 'Ovis-U1 "
                                       "Edit Context Encoder': connect both")
            width, height = bridge.latent_size(context, "context")
            source = to_pil(image, "image")
            reference = context["samples"][:1]
        memory = estimates.condition_request_memory(encoder.params, mode, width, height,
                                                    bridge.dtype_size(encoder.dtype), encoder.attention)
        ovis = encoder.load(memory)
        condition = ovis.encode_condition(prompt, mode, image=source, width=width, height=height)
        device = bridge.intermediate_device()
        condition = dataclasses.replace(condition, branches={name: states.to(device)
                                                             for name, states in condition.branches.items()})
        outputs = conditioning_outputs(condition, reference)
        return (outputs["positive"], outputs["middle"], outputs["negative"])


class OvisU1Refiner:
    DESCRIPTION = (
        "Runs the MMDiT's token refiner (with the MODEL's LoRAs and patches) on Encode Condition's CONDITIONING. It "
        "does not depend on the timestep, so it runs once per prompt; ComfyUI keeps its result while only the seed "
        "or the sampler settings change. Optional: the MODEL refines unrefined conditioning by itself."
    )
    CATEGORY = "Ovis-U1"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "middle", "negative")
    OUTPUT_TOOLTIPS = (
        "The refined prompt branch.",
        "The refined image-only branch (the refined negative when middle is not connected).",
        "The refined unconditional branch.",
    )
    FUNCTION = "refine"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The 'model' output of 'Ovis-U1 Model Loader' (LoRAs applied)."}),
                "positive": ("CONDITIONING", {"tooltip": "'positive' of 'Ovis-U1 Encode Condition'."}),
                "negative": ("CONDITIONING", {"tooltip": "'negative' of 'Ovis-U1 Encode Condition'."}),
            },
            "optional": {
                "middle": ("CONDITIONING", {"tooltip": "'middle' of 'Ovis-U1 Encode Condition' (edits)."}),
            },
        }

    def refine(self, model, positive, negative, middle=None):
        positive = bridge.sampling.refine(model, positive, "positive")
        negative = bridge.sampling.refine(model, negative, "negative")
        middle = negative if middle is None else bridge.sampling.refine(model, middle, "middle")
        return (positive, middle, negative)
