"""Image generation and editing: Encode Condition → Refiner → MMDiT Sampler → VAE Decode, the Edit Context Encoder,
and VAE Encode. The nodes only adapt types; all model logic is in ``ovis_u1``."""

from __future__ import annotations

import dataclasses

import torch

from ovis_u1 import Condition, EditContext, OvisU1InputError, Refined
from ovis_u1.inputs import check_not_empty
from ovis_u1.model import MAX_CFG, MAX_SIZE, MIN_SIZE, SIZE_MULTIPLE
from ovis_u1.sampling import unpack_latents
from ovis_u1.vae import latent_to_vae

from . import comfy_bridge as bridge
from . import estimates
from .image import check_finite, from_decoded, from_pil, to_pil, to_vae_pixels
from .loader import MODEL_TYPE
from .native import conditioning_layout

CONDITION_TYPE = "OVIS_U1_CONDITION"
REFINED_TYPE = "OVIS_U1_REFINED"
CONTEXT_TYPE = "OVIS_U1_CONTEXT"
MODES = {"text-to-image": "t2i", "edit": "edit"}
SHIFT = {"config": None, "on": True, "off": False}


MODEL_INPUT = (MODEL_TYPE, {"tooltip": "The Ovis-U1 model from 'Ovis-U1 Model Loader'."})


def _size_input(what: str) -> tuple:
    return ("INT", {"default": 1024, "min": MIN_SIZE, "max": MAX_SIZE, "step": SIZE_MULTIPLE,
                    "tooltip": f"{what} in pixels, a multiple of {SIZE_MULTIPLE}."})


def _vae_decode_memory(latent_shape, dtype) -> int:
    return estimates.vae_decode_memory(latent_shape[-2], latent_shape[-1], bridge.dtype_size(dtype))


def _vae_encode_memory(pixel_shape, dtype) -> int:
    return estimates.vae_encode_memory(pixel_shape[-2], pixel_shape[-1], bridge.dtype_size(dtype))


def _compute_dtype(model) -> torch.dtype:
    return getattr(model, "dtype", None) or torch.float32


def _condition_memory(model, mode: str, width, height) -> int:
    """Activation estimate of Encode Condition (see ``estimates.condition_memory``): the condition image is resized
    to the preprocessor's pixel budget, and every branch carries its visual tokens plus the prompt."""
    p = model.model.params
    pixels = p.preprocess.max_pixels if hasattr(p, "preprocess") else 1024 * 1024
    if isinstance(width, int) and isinstance(height, int):
        pixels = min(pixels, width * height)
    patches = max(1, pixels // p.vision.patch_size**2)
    text = min(p.multimodal_max_length, patches // p.vision.hidden_stride**2 + 512)
    llm = p.llm_config
    return estimates.condition_memory(
        llm.get("hidden_size", p.hidden_size), llm.get("intermediate_size", 4 * p.hidden_size),
        llm.get("num_attention_heads", 16), p.vision.hidden_size, p.vision.intermediate_size, p.vision.num_heads,
        3 if mode == "edit" else 2, text, patches, bridge.dtype_size(_compute_dtype(model)),
        scores=estimates.pack_kernel_scores(getattr(model, "attention", "auto")),
    )


def _refiner_memory(model, condition: Condition) -> int:
    p = model.model.params.mmdit
    tokens = sum(states.shape[1] for states in condition.branches.values())
    return estimates.transformer_block_memory(tokens, p.hidden_size, 2 * int(p.hidden_size * p.mlp_ratio),
                                              p.num_heads, bridge.dtype_size(_compute_dtype(model)),
                                              score_tokens=max(s.shape[1] for s in condition.branches.values()),
                                              scores=estimates.pack_kernel_scores(getattr(model, "attention", "auto")))


def _vae_dtype(ovis) -> torch.dtype:
    return next(ovis.vae.parameters()).dtype


class OvisU1EncodeCondition:
    DESCRIPTION = (
        "Runs the prompt (and for edit the source image) through Ovis-U1's visual encoder and LLM once, producing "
        "the hidden states of every classifier-free-guidance branch the mode needs (text-to-image: prompt and "
        "unconditional; edit: prompt, image-only and unconditional)."
    )
    CATEGORY = "Ovis-U1"
    RETURN_TYPES = (CONDITION_TYPE, "CONDITIONING", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("condition", "positive", "middle", "negative")
    OUTPUT_TOOLTIPS = (
        "The LLM conditioning of every CFG branch, for 'Ovis-U1 Refiner'.",
        "Core CONDITIONING of the prompt branch (cond), for the diffusion_model of the loader: CFGGuider / "
        "KSampler positive, DualCFGGuider cond1. An edit carries the context latent when 'context' is connected.",
        "Core CONDITIONING of the image-only branch of an edit (no_txt, with the context latent): DualCFGGuider "
        "cond2. Text-to-image has none: the same as negative.",
        "Core CONDITIONING of the unconditional branch (no_both): negative of CFGGuider / KSampler / DualCFGGuider.",
    )
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL_INPUT,
                "prompt": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "What the image should show (text-to-image) or how to change the image (edit).",
                }),
                "mode": (list(MODES), {
                    "default": "text-to-image",
                    "tooltip": "text-to-image: draw from the prompt on a white canvas of width×height. edit: change "
                               "the connected image as the prompt says.",
                }),
                "width": _size_input("text-to-image canvas width (edit takes the size from the image)"),
                "height": _size_input("text-to-image canvas height (edit takes the size from the image)"),
            },
            "optional": {
                "image": ("IMAGE", {
                    "tooltip": "The image to edit (one image; edit mode only, ignored for text-to-image). Connect the "
                               "same image as to 'Ovis-U1 Edit Context Encoder', or its resized output.",
                }),
                "context": (CONTEXT_TYPE, {
                    "tooltip": "Edit only, for the core CONDITIONING outputs: the edit context from 'Ovis-U1 Edit "
                               "Context Encoder', attached to positive and middle as a reference latent (the "
                               "pack's own sampler takes it on its own input instead).",
                }),
            },
        }

    def encode(self, model, prompt, mode="text-to-image", width=1024, height=1024, image=None, context=None):
        if mode not in MODES:
            raise OvisU1InputError(f"mode {mode!r} is unknown: use one of {', '.join(MODES)}")
        mode = MODES[mode]
        source = to_pil(image, "image") if mode == "edit" and image is not None else None
        ovis = model.use("llm", _condition_memory(model, mode, width, height))
        condition = ovis.encode_condition(prompt, mode, image=source, width=width, height=height)
        device = bridge.intermediate_device()
        branches = {name: states.to(device) for name, states in condition.branches.items()}
        condition = dataclasses.replace(condition, branches=branches)
        reference = None
        if mode == "edit" and context is not None:
            if (context.width, context.height) != (condition.width, condition.height):
                raise OvisU1InputError(
                    f"context: the context is {context.width}×{context.height} but the condition was encoded for "
                    f"{condition.width}×{condition.height}: encode both from the same image"
                )
            latent = unpack_latents(context.tokens.float(), context.height, context.width)
            reference = latent_to_vae(latent, model.model.params.vae).to(device)
        elif mode == "edit":
            bridge.log.info("Ovis-U1: edit condition without context: the core CONDITIONING outputs carry no "
                            "reference latent (connect 'context', or attach one with ReferenceLatent)")
        native = conditioning_layout(condition, reference)
        return (condition, native["positive"], native["middle"], native["negative"])


class OvisU1Refiner:
    DESCRIPTION = (
        "Runs the MMDiT's token refiner on every branch of the condition. It does not depend on the timestep, so it "
        "runs once per prompt and the sampler reuses it at every step."
    )
    CATEGORY = "Ovis-U1"
    RETURN_TYPES = (REFINED_TYPE,)
    RETURN_NAMES = ("refined",)
    OUTPUT_TOOLTIPS = ("The refined text tokens of every CFG branch, for 'Ovis-U1 MMDiT Sampler'.",)
    FUNCTION = "refine"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL_INPUT,
                "condition": (CONDITION_TYPE, {"tooltip": "The output of 'Ovis-U1 Encode Condition'."}),
            }
        }

    def refine(self, model, condition: Condition):
        ovis = model.use("mmdit", _refiner_memory(model, condition))
        refined = ovis.refine(condition)
        device = bridge.intermediate_device()
        branches = {name: (tokens.to(device), pooled.to(device)) for name, (tokens, pooled) in refined.branches.items()}
        return (dataclasses.replace(refined, branches=branches),)


class OvisU1EditContextEncoder:
    DESCRIPTION = (
        "Resizes the image to edit to the size the official edit uses and encodes it with the checkpoint's VAE into "
        "the latent tokens the MMDiT attends to. The resized image is returned too."
    )
    CATEGORY = "Ovis-U1"
    RETURN_TYPES = (CONTEXT_TYPE, "IMAGE", "LATENT")
    RETURN_NAMES = ("context", "resized_image", "latent")
    OUTPUT_TOOLTIPS = (
        "The edit context, for the context input of 'Ovis-U1 MMDiT Sampler' (and of 'Ovis-U1 Encode Condition' "
        "for its core CONDITIONING outputs).",
        "The image at the edit size (the size of the result); wire it into 'Ovis-U1 Encode Condition'.",
        "An empty latent at the edit size, for the native path's KSampler / SamplerCustomAdvanced.",
    )
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL_INPUT,
                "image": ("IMAGE", {"tooltip": "The image to edit (one image)."}),
                "seed": ("INT", {
                    "default": 42, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                    "control_after_generate": False,  # the frontend would add 'randomize' to any input named seed
                    "tooltip": "Seed of the VAE posterior sample of the image (the official edit draws one).",
                }),
            }
        }

    def encode(self, model, image, seed=42):
        source = to_pil(image, "image")
        width, height = model.model.edit_size(source)
        ovis = model.use("vae", _vae_encode_memory((height, width), torch.float32))
        context = ovis.encode_context(source, seed=seed)
        device = bridge.intermediate_device()
        context = dataclasses.replace(context, tokens=context.tokens.to(device))
        channels = model.model.params.vae.latent_channels
        empty = torch.zeros(1, channels, context.height // 8, context.width // 8, device=device)
        return (context, from_pil(context.image), {"samples": empty})


def _sampling_memory(model, refined: Refined, width: int, height: int, with_context: bool) -> int:
    """Activation memory of one guided MMDiT step: every branch's text + image (+ context) tokens in one batch."""
    p = model.model.params.mmdit
    text = max(tokens.shape[1] for tokens, _ in refined.branches.values())
    return estimates.sampling_memory(p.hidden_size, p.mlp_ratio, p.num_heads, len(refined.branches), text, width,
                                     height, with_context, bridge.dtype_size(_compute_dtype(model)),
                                     scores=estimates.pack_kernel_scores(getattr(model, "attention", "auto")))


class OvisU1Sampler:
    DESCRIPTION = (
        "Flow-matching Euler sampling of the Ovis-U1 MMDiT with classifier-free guidance. Text-to-image: txt_cfg "
        "guides towards the prompt. Edit (connect the edit context): img_cfg towards the source image, txt_cfg "
        "towards the instruction. The result is an SDXL-VAE latent."
    )
    CATEGORY = "Ovis-U1"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = (
        "The raw SDXL-VAE latent [B, 4, H/8, W/8]; decode it with 'Ovis-U1 VAE Decode' (or VAEDecode with an SDXL VAE).",
    )
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL_INPUT,
                "refined": (REFINED_TYPE, {"tooltip": "The output of 'Ovis-U1 Refiner'."}),
                "width": _size_input("Output width for text-to-image (an edit takes the context's size)"),
                "height": _size_input("Output height for text-to-image (an edit takes the context's size)"),
                "steps": ("INT", {
                    "default": 50, "min": 1, "max": 1000,
                    "tooltip": "Number of Euler steps (official: 50).",
                }),
                "txt_cfg": ("FLOAT", {
                    "default": 5.0, "min": 0.0, "max": MAX_CFG, "step": 0.1, "round": 0.01,
                    "tooltip": "Text guidance scale (official: 5 for text-to-image, 6 for edit); 1 = no guidance.",
                }),
                "img_cfg": ("FLOAT", {
                    "default": 1.5, "min": 0.0, "max": MAX_CFG, "step": 0.1, "round": 0.01,
                    "tooltip": "Image guidance scale of an edit (official: 1.5); ignored for text-to-image.",
                }),
                "seed": ("INT", {
                    "default": 42, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                    "tooltip": "Seed of the starting noise (official demo: 42).",
                }),
                "timestep_shift": (list(SHIFT), {
                    "default": "config",
                    "tooltip": "Resolution-dependent shift of the schedule towards noise. config: as the checkpoint's "
                               "config.json says; on / off: override it.",
                }),
            },
            "optional": {
                "context": (CONTEXT_TYPE, {
                    "tooltip": "The edit context from 'Ovis-U1 Edit Context Encoder'; required for an edit condition, "
                               "not allowed for text-to-image.",
                }),
            },
        }

    def sample(self, model, refined: Refined, width=1024, height=1024, steps=50, txt_cfg=5.0, img_cfg=1.5, seed=42,
               timestep_shift="config", context: EditContext | None = None):
        if timestep_shift not in SHIFT:
            raise OvisU1InputError(f"timestep_shift {timestep_shift!r} is unknown: use one of {', '.join(SHIFT)}")
        if context is not None:
            width, height = context.width, context.height
        elif refined.mode == "t2i" and (width, height) != (refined.width, refined.height):
            bridge.log.warning("Ovis-U1: sampling %sx%s from a condition encoded for a %sx%s canvas; set the same size "
                               "on 'Ovis-U1 Encode Condition' for the official behaviour", width, height,
                               refined.width, refined.height)
        memory = 0
        if isinstance(width, int) and isinstance(height, int):  # else ovis.sample explains what is wrong
            memory = _sampling_memory(model, refined, width, height, context is not None)
        progress = bridge.Progress(steps, latent_preview=True)

        def callback(done, total, x, denoised):
            latent = unpack_latents(denoised[:1].float(), height, width) if progress.previews else None
            progress.update(done, latent)

        ovis = model.use("mmdit", memory)
        latent = ovis.sample(
            refined, width, height, context=context, steps=steps, txt_cfg=txt_cfg, img_cfg=img_cfg, seed=seed,
            timestep_shift=SHIFT[timestep_shift], callback=callback,
        )
        return ({"samples": latent.to(bridge.intermediate_device())},)


class OvisU1VAEDecode:
    DESCRIPTION = "Decodes SDXL-VAE latents into images with the Ovis-U1 checkpoint's own VAE (fp32)."
    CATEGORY = "Ovis-U1"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded images.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL_INPUT,
                "samples": ("LATENT", {"tooltip": "The latent to decode (from 'Ovis-U1 MMDiT Sampler')."}),
            }
        }

    def decode(self, model, samples):
        latent = samples["samples"] if isinstance(samples, dict) else None
        channels = model.model.params.vae.latent_channels
        if not isinstance(latent, torch.Tensor) or latent.ndim != 4 or latent.shape[1] != channels:
            shape = list(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
            raise OvisU1InputError(
                f"samples: expected an SDXL-VAE latent [B, {channels}, H/8, W/8], got {shape}; connect the output of "
                "'Ovis-U1 MMDiT Sampler' or 'Ovis-U1 VAE Encode'"
            )
        check_not_empty(latent, "samples", "latents", "there is nothing to decode: connect a LATENT that holds at "
                        "least one (from 'Ovis-U1 MMDiT Sampler' or 'Ovis-U1 VAE Encode')")
        check_finite(latent, "samples")  # NaN/inf latents are an error naming the input
        ovis = model.use("vae", _vae_decode_memory(latent.shape, _vae_dtype(model.model)))
        progress = bridge.Progress(latent.shape[0])
        images = []
        for i in range(latent.shape[0]):
            images.append(from_decoded(ovis.vae_decode(latent[i : i + 1])).to(bridge.intermediate_device()))
            progress.update(i + 1)
        return (torch.cat(images),)


class OvisU1VAEEncode:
    DESCRIPTION = "Encodes images into SDXL-VAE latents (the posterior mean) with the Ovis-U1 checkpoint's own VAE."
    CATEGORY = "Ovis-U1"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The raw SDXL-VAE latent [B, 4, H/8, W/8] (sides cropped to multiples of 8).",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL_INPUT,
                "image": ("IMAGE", {"tooltip": "The images to encode."}),
            }
        }

    def encode(self, model, image):
        pixels = to_vae_pixels(image, "image")
        ovis = model.use("vae", _vae_encode_memory(pixels.shape, _vae_dtype(model.model)))
        progress = bridge.Progress(pixels.shape[0])
        latents = []
        for i in range(pixels.shape[0]):
            latents.append(ovis.vae_encode(pixels[i : i + 1]).to(bridge.intermediate_device()))
            progress.update(i + 1)
        return ({"samples": torch.cat(latents)},)
