"""The official Ovis-U1 recipe on ComfyUI's own sampling (through the MODEL's patcher, so LoRAs, patches, caches,
progress, previews and interruption work as for core models): the token refiner on CONDITIONING, and one call that
does what SamplerCustomAdvanced does with euler, the Ovis-U1 schedule and the official guidance (``generate_img``):
text-to-image ``uncond + txt_cfg·(cond − uncond)`` = CFGGuider(cfg=txt_cfg); edit ``no_both + img_cfg·(no_txt −
no_both) + txt_cfg·(cond − no_txt)`` = DualCFGGuider's regular style (cond1 = positive, cond2 = middle).
"""

from __future__ import annotations

import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from comfy_extras.nodes_custom_sampler import Guider_DualCFG  # core's DualCFGGuider

from ...ovis_u1 import estimates
from ...ovis_u1.inputs import check_cfg
from ...ovis_u1.sampling import flow_sigmas

from .host import latent_size
from .conditioning import MARK, guidance_mode, mark_of
from .core_model import ovis_model_of

SAMPLER = "euler"  # the official Euler step x ← x + (t_next − t)·v


def _sigmas(inner, latent, steps: int, timestep_shift: bool | None, denoise: float = 1.0):
    """The official schedule for the latent's size (``ovis_u1.sampling.flow_sigmas``) of the MODEL's inner model."""
    width, height = latent_size(latent)
    return flow_sigmas(inner.diffusion_model.params, width, height, steps, timestep_shift, denoise)


def schedule(model, latent, steps: int, timestep_shift: bool | None = None, denoise: float = 1.0):
    """The official schedule for the latent's size as SIGMAS (steps: ComfyUI validated the node's range)."""
    return _sigmas(ovis_model_of(model), latent, steps, timestep_shift, denoise)


def sample(model, positive, negative, latent, seed: int, steps: int, txt_cfg: float, img_cfg: float,
           timestep_shift: bool | None = None, middle=None) -> dict:
    """One Ovis-U1 generation on ComfyUI's sampling; returns the LATENT (raw VAE latent)."""
    sigmas = _sigmas(ovis_model_of(model), latent, steps, timestep_shift)
    if guidance_mode(positive, negative, middle) == "t2i":
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(check_cfg("txt_cfg", txt_cfg))
    else:
        guider = Guider_DualCFG(model)
        guider.set_conds(positive, middle, negative)
        guider.set_cfg(check_cfg("txt_cfg", txt_cfg), check_cfg("img_cfg", img_cfg))
    out = dict(latent)
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    callback = latent_preview.prepare_callback(model, steps)
    samples = guider.sample(noise, latent_image, comfy.samplers.sampler_object(SAMPLER), sigmas,
                            denoise_mask=latent.get("noise_mask"), callback=callback,
                            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out["samples"] = samples.to(mm.intermediate_device())
    out.pop("noise_mask", None)
    return out


def refine(model, conditioning, name: str):
    """The token refiner of the MODEL (with its patches) on every entry of a CONDITIONING that is not refined yet:
    the states become the refined tokens and ``pooled_output`` their pooled vector."""
    inner = ovis_model_of(model)
    todo = [entry for entry in conditioning if not mark_of(entry, name).get("refined")]
    if not todo:
        return conditioning
    p = inner.diffusion_model.params
    memory = estimates.refiner_request_memory(p, [states.shape[1] for states, _ in todo],
                                              mm.dtype_size(inner.get_dtype_inference()))
    mm.load_models_gpu([model], memory_required=memory)
    device = model.load_device
    out = []
    for states, options in conditioning:
        mark = options[MARK]
        if not mark.get("refined"):
            tokens, pooled = inner.refine(states, device, model.model_options.get("transformer_options"))
            states = tokens.to(mm.intermediate_device())
            options = {**options, "pooled_output": pooled.to(mm.intermediate_device()),
                       MARK: {**mark, "refined": True}}
        out.append([states, options])
    return out
