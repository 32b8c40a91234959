"""The native path's ComfyUI-independent parts: the official schedule as SIGMAS, the CONDITIONING layout of every
CFG branch, and the guidance formula ComfyUI's DualCFGGuider computes (checked against the official one in tests).

With these, an Ovis-U1 image comes out of ComfyUI's own sampling: Encode Condition's CONDITIONING outputs →
CFGGuider (text-to-image, cfg = txt_cfg) or DualCFGGuider (edit: cond1 = positive, cond2 = middle, negative,
cfg_conds = txt_cfg, cfg_cond2_negative = img_cfg, style regular) → SamplerCustomAdvanced with these SIGMAS.
"""

from __future__ import annotations

import math

import torch

from ovis_u1 import Condition, OvisU1InputError
from ovis_u1.model import MAX_SIZE, MIN_SIZE, SIZE_MULTIPLE
from ovis_u1.sampling import flow_schedule

from .loader import MODEL_TYPE

SHIFT = {"config": None, "on": True, "off": False}
# Which official branch each CONDITIONING output carries, and which carry the edit context (SPEC §C.5: the noise of
# cond and no_txt attends to the source latent; no_both sees neither text nor image).
OUTPUT_BRANCHES = {
    "t2i": {"positive": "cond", "middle": "no_both", "negative": "no_both"},
    "edit": {"positive": "cond", "middle": "no_txt", "negative": "no_both"},
}
CONTEXT_BRANCHES = {"cond", "no_txt"}


def official_sigmas(mmdit_params, width: int, height: int, steps: int, timestep_shift: bool | None = None,
                    denoise: float = 1.0) -> torch.Tensor:
    """The official time schedule (1 → 0, steps + 1 values) for an image of width×height as SIGMAS; with
    ``denoise`` < 1 the last ``steps`` of a ``steps / denoise`` schedule, as ComfyUI's BasicScheduler does."""
    shift = mmdit_params.timestep_shift if timestep_shift is None else timestep_shift
    total = steps if denoise >= 1.0 else int(steps / denoise)
    num_tokens = math.ceil(height / 16) * math.ceil(width / 16)
    times = flow_schedule(total, num_tokens, shift, mmdit_params.base_shift, mmdit_params.max_shift)
    return torch.tensor(times[-(steps + 1):], dtype=torch.float32)


def conditioning_layout(condition: Condition, reference_latent: torch.Tensor | None = None) -> dict[str, list]:
    """CONDITIONING (``[[states, options]]``) for positive, middle and negative.

    ``states`` are the branch's LLM hidden states [1, L, 2·hidden] (the model's refiner runs on them); an edit's
    source latent (raw VAE latent [1, 4, h, w]) goes into ``reference_latents`` of cond and no_txt, as ComfyUI's
    ReferenceLatent node attaches it. Text-to-image has no image-only branch: middle is no_both, so DualCFGGuider
    reduces to plain CFG there.
    """
    outputs = {}
    for output, branch in OUTPUT_BRANCHES[condition.mode].items():
        options = {}
        if reference_latent is not None and condition.mode == "edit" and branch in CONTEXT_BRANCHES:
            options["reference_latents"] = [reference_latent]
        outputs[output] = [[condition.branches[branch], options]]
    return outputs


def dual_cfg_regular(positive, middle, negative, cfg_conds: float, cfg_cond2_negative: float):
    """What ``Guider_DualCFG.predict_noise`` (style regular) returns in ComfyUI 0.3.64 and 0.18.1 alike:
    ``cfg_function(middle, negative, cfg_cond2_negative) + (positive − middle)·cfg_conds``, with cfg_function
    ``uncond + (cond − uncond)·scale``."""
    return negative + (middle - negative) * cfg_cond2_negative + (positive - middle) * cfg_conds


def _size_input(what: str) -> tuple:
    return ("INT", {"default": 1024, "min": MIN_SIZE, "max": MAX_SIZE, "step": SIZE_MULTIPLE,
                    "tooltip": f"{what} in pixels, a multiple of {SIZE_MULTIPLE}."})


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
                "model": (MODEL_TYPE, {"tooltip": "The Ovis-U1 model from 'Ovis-U1 Model Loader' (for its config)."}),
                "width": _size_input("Image width (an edit: the edit size, the width of the context's latent)"),
                "height": _size_input("Image height (an edit: the edit size)"),
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "Number of steps (official: 50)."}),
                "timestep_shift": (list(SHIFT), {
                    "default": "config",
                    "tooltip": "Resolution-dependent shift towards noise. config: as the checkpoint's config.json "
                               "says; on / off: override it.",
                }),
                "denoise": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "Below 1: only the last part of the schedule (image-to-image on a VAE-encoded latent).",
                }),
            },
            "optional": {
                "latent": ("LATENT", {
                    "tooltip": "Take the size from this latent instead of width/height (an edit: the 'latent' of "
                               "the Edit Context Encoder).",
                }),
            },
        }

    def schedule(self, model, width=1024, height=1024, steps=50, timestep_shift="config", denoise=1.0, latent=None):
        if timestep_shift not in SHIFT:
            raise OvisU1InputError(f"timestep_shift {timestep_shift!r} is unknown: use one of {', '.join(SHIFT)}")
        if not isinstance(steps, int) or steps < 1:
            raise OvisU1InputError(f"steps {steps!r} must be a whole number of at least 1")
        if denoise <= 0.0:
            return (torch.zeros(0),)  # as BasicScheduler: nothing to do
        if latent is not None:
            samples = latent.get("samples") if isinstance(latent, dict) else None
            if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
                raise OvisU1InputError("latent: expected a LATENT of an image [B, 4, H/8, W/8]; connect the 'latent' "
                                       "output of 'Ovis-U1 Edit Context Encoder' or an EmptyLatentImage")
            height, width = samples.shape[-2] * 8, samples.shape[-1] * 8
        params = model.model.params.mmdit
        return (official_sigmas(params, width, height, steps, SHIFT[timestep_shift], denoise),)
