"""The MMDiT as ComfyUI's MODEL: a ``comfy.model_base.BaseModel`` whose ``diffusion_model`` is the MMDiT itself.

``diffusion_model`` is the loaded MMDiT (``OvisU1MMDiT``, the library's MMDiT with ComfyUI's call convention), its
modules named as in the checkpoint below ``visual_generator.backbone.`` — so ComfyUI's LoRA keys
(``diffusion_model.double_blocks.0.img_attn.qkv``), model patches, attention overrides, caches and compile reach it
as they reach core models (comfy/ldm/flux/model.py is the pattern).

Flow matching as in FLUX (``CONST``: denoised = x − σ·v, so ComfyUI's Euler step is the official
x ← x + (σ_next − σ)·v) with Ovis-U1's shift (none for Ovis-U1-3B, whose config turns it off). The official starting
noise is drawn in bf16; ComfyUI draws fp32 from the same generator, of which bf16 draws are the rounding, so the noise
scaling rounds it: the same seed gives the official image.

Conditioning (see ``conditioning``): the LLM hidden states are the cross-attention input; the token refiner
(time-independent) runs once per conditioning in ``extra_conds``, never per step, unless the Refiner node ran it. An
edit's source latent arrives as ``reference_latents`` (raw VAE latent, scaled by the latent format), as FLUX Kontext
takes it; its ``img_in`` projection is made once per conditioning too.
"""

from __future__ import annotations

import math

import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_sampling
import comfy.patcher_extension
import comfy.supported_models_base

from ...ovis_u1 import OvisU1InputError, attention, estimates, operations
from ...ovis_u1.inputs import NOT_SAVABLE, check_context_size, check_latent_size, not_flow_matching
from ...ovis_u1.mmdit import MMDiT, PositionCache
from ...ovis_u1.sampling import image_tokens, in_noise_precision, pack_latents, shift_mu, unpack_latents
from ...ovis_u1.vae import scale_latent, unscale_latent

from .host import load_device, offload_device
from .attention import comfy_kernel, is_comfy
from .conditioning import mark_of
from .free_parameters import patch_on_load
from .memory import patcher_class, weight_bytes

DEFAULT_TEXT_TOKENS = 512  # a condition of unknown length: the prompt with the visual tokens of its image
SAMPLED_LATENT = "the sampled latent's (KSampler 'latent_image', the MMDiT Sampler's 'latent')"
TIME_SCALE = "ovis_u1_time_scale"  # transformer_options: what the sampling object multiplies the flow time by


class OvisU1LatentFormat(comfy.latent_formats.SDXL):
    """SDXL's latent format (previews, channel count) with the checkpoint's own scaling and shift factors."""

    def __init__(self, scaling_factor: float = 0.13025, shift_factor: float | None = None):
        super().__init__()
        self.scale_factor = scaling_factor
        self.shift_factor = shift_factor

    def process_in(self, latent):
        return scale_latent(latent, self.scale_factor, self.shift_factor)

    def process_out(self, latent):
        return unscale_latent(latent, self.scale_factor, self.shift_factor)


class OvisU1ModelSampling(comfy.model_sampling.ModelSamplingFlux, comfy.model_sampling.CONST):
    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return super().noise_scaling(sigma, in_noise_precision(noise), latent_image, max_denoise)


class OvisU1ModelConfig(comfy.supported_models_base.BASE):
    unet_config = {"image_model": "ovis_u1", "disable_unet_model_creation": True}
    latent_format = comfy.latent_formats.SDXL
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]
    memory_usage_factor = 1.0

    def __init__(self, params, compute_dtype: torch.dtype, storage_dtype: torch.dtype):
        super().__init__(dict(self.unet_config))
        vae = params.vae
        self.latent_format = OvisU1LatentFormat(vae.scaling_factor, vae.shift_factor)
        mmdit = params.mmdit
        # KSampler's own schedulers shift for 1024² (the Ovis-U1 schedule shifts per size: MMDiT Sampler, Scheduler)
        mu = shift_mu(image_tokens(1024, 1024), mmdit.base_shift, mmdit.max_shift) if mmdit.timestep_shift else 0.0
        self.sampling_settings = {"shift": mu}
        self.manual_cast_dtype = None if storage_dtype == compute_dtype else compute_dtype


class OvisU1MMDiT(MMDiT):
    """The library's MMDiT with ComfyUI's diffusion-model call ``(x, timestep, context, **conds)``: latents
    [B, 4, 2h, 2w] are packed into 2×2 tokens, the edit context (``ref_latents``) joins as context tokens, the
    velocity is unpacked back. Wrappers of ``WrappersMP.DIFFUSION_MODEL`` (EasyCache) see the latent first.

    ``kernel`` (the loader's attention choice) and ``dtype`` (the weights' storage dtype, what ComfyUI's
    ``BaseModel.get_dtype`` reads) are set by ``make_core_model``."""

    kernel: attention.Kernel | None = None

    def kernel_for(self, transformer_options: dict | None = None) -> attention.Kernel:
        """ComfyUI's selection with this sampling's ``transformer_options`` (its attention overrides), unless the
        loader forced one of the pack's own kernels."""
        if self.kernel is None or is_comfy(self.kernel):
            return comfy_kernel(transformer_options)
        return self.kernel

    def forward(self, x, timestep, context, pooled=None, ref_latents=None, control=None, transformer_options={},
                **kwargs):
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._comfy_forward,
            self,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                     transformer_options),
        ).execute(x, timestep, context, pooled, ref_latents, control, transformer_options, **kwargs)

    def _comfy_forward(self, x, timestep, context, pooled=None, ref_latents=None, control=None,
                       transformer_options={}, context_tokens=None, **kwargs):
        width, height = check_latent_size(x.shape, SAMPLED_LATENT)  # what the API samples: nothing the MMDiT fails on
        ctx = None
        if ref_latents:
            check_context_size(ref_latents[0].shape, x.shape)
            if context_tokens is None:  # called outside a sampling run (extra_conds projects it once per run)
                ctx = pack_latents(ref_latents[0].to(device=x.device, dtype=x.dtype))
            else:
                context_tokens = context_tokens.to(device=x.device, dtype=x.dtype)
        else:
            context_tokens = None
        text = context.to(x.dtype)
        cache = transformer_options.get(PER_SAMPLING)
        positions = None
        if cache is not None:
            positions = cache.positions(self, text.shape[1], height, width, bool(ref_latents), x.device)
        # the flow time in [0, 1], whatever multiplier a ModelSampling node's object applied
        t = timestep.to(x.dtype) / transformer_options.get(TIME_SCALE, 1.0)
        with attention.using(self.kernel_for(transformer_options)):
            prepared = self.prepare(text, pooled.to(x.dtype), height, width, context=ctx, positions=positions,
                                    context_tokens=context_tokens)
            velocity = self.velocity(pack_latents(x), t, prepared)
        return unpack_latents(velocity, height, width, channels=x.shape[1])


PER_SAMPLING = "ovis_u1_per_sampling"  # transformer_options: the run's PositionCache


def per_sampling_cache(executor, *args, **kwargs):
    """``WrappersMP.OUTER_SAMPLE`` wrapper: a fresh ``PositionCache`` in the ``transformer_options`` of the run the
    guider starts, dropped when it ends, so nothing outlives the run on the device and runs of a shared model never
    see each other's. Not a dict, so ComfyUI's per-step copies of ``transformer_options`` hand on the same object."""
    options = executor.class_obj.model_options.setdefault("transformer_options", {})
    previous = options.get(PER_SAMPLING)
    options[PER_SAMPLING] = PositionCache()
    try:
        return executor(*args, **kwargs)
    finally:
        if previous is None:
            options.pop(PER_SAMPLING, None)
        else:
            options[PER_SAMPLING] = previous


class OvisU1Model(comfy.model_base.BaseModel):
    """The MMDiT (with its token refiner) as a core MODEL."""

    def __init__(self, model_config: OvisU1ModelConfig, mmdit: OvisU1MMDiT):
        super().__init__(model_config, comfy.model_base.ModelType.FLUX, device=None)
        self.diffusion_model = mmdit
        self.model_sampling = OvisU1ModelSampling(model_config)
        # The model-condition keys, as core's Flux / QwenImage name them: ``_calc_cond_batch`` passes the sizes of
        # the conditions it batches under these, and ``extra_conds_shapes`` gives ``estimate_memory`` the same.
        self.memory_usage_factor_conds = ("c_crossattn", "ref_latents")
        mm.archive_model_dtypes(self.diffusion_model)  # the dtypes ComfyUI's dynamic loader restores

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        transformer_options = {**transformer_options, TIME_SCALE: time_scale(self.model_sampling)}
        return super()._apply_model(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def refine(self, states: torch.Tensor, device, transformer_options: dict | None = None):
        """The token refiner on LLM states [B, L, 2·hidden] → (tokens [B, L, hidden], pooled [B, hidden])."""
        mmdit = self.diffusion_model
        with torch.no_grad(), attention.using(mmdit.kernel_for(transformer_options)):
            return mmdit.refine(states.to(device=device, dtype=self.get_dtype_inference()))

    def extra_conds(self, **kwargs):
        out = {}
        states = kwargs.get("cross_attn", None)
        if states is not None:
            mark = mark_of([states, kwargs], "conditioning")
            device = kwargs.get("device", load_device())
            if mark.get("refined"):  # the Refiner node ran the token refiner already
                tokens, pooled = states, kwargs.get("pooled_output")
            else:  # the token refiner does not depend on the time: once here, not at every step
                tokens, pooled = self.refine(states, device)
            out["c_crossattn"] = comfy.conds.CONDRegular(tokens)  # never padded/repeated: joint attention
            out["pooled"] = comfy.conds.CONDRegular(pooled)
        references = kwargs.get("reference_latents", None)
        if references:
            reference = self.process_latent_in(references[0])
            out["ref_latents"] = comfy.conds.CONDList([reference])
            noise = kwargs.get("noise", None)
            if noise is not None and not (noise.shape[-1] % 2 or noise.shape[-2] % 2):  # else the forward explains
                check_context_size(reference.shape, noise.shape)
                # img_in of the context does not depend on the step either: once per conditioning, here
                device, dtype = kwargs.get("device", load_device()), self.get_dtype_inference()
                with torch.no_grad():
                    packed = pack_latents(reference.to(device=device, dtype=dtype))
                    tokens = self.diffusion_model.project_context(packed, dtype)
                out["context_tokens"] = comfy.conds.CONDRegular(tokens)
        return out

    def extra_conds_shapes(self, **kwargs):
        """What ``sampler_helpers.estimate_memory`` passes to ``memory_required`` per conditioning, under the keys and
        in the layout ``samplers._calc_cond_batch`` passes the real conditions' ``size()``: ``c_crossattn`` [1, L, C]
        (the refiner keeps the length), ``ref_latents`` as ``CONDList.size()`` reports the one reference used."""
        out = {}
        states = kwargs.get("cross_attn", None)
        if states is not None:
            out["c_crossattn"] = [1, states.shape[1], self.diffusion_model.params.hidden_size]
        references = kwargs.get("reference_latents", None)
        if references:
            r = references[0]
            out["ref_latents"] = [1, r.shape[1], math.prod(r.shape[2:])]
        return out

    def memory_required(self, input_shape, cond_shapes={}):
        """Activation bytes of one MMDiT forward over ``input_shape[0]`` rows, as ComfyUI asks for them: before
        sampling (``estimate_memory``: twice the noise batch, i.e. cond and uncond together, and the noise batch
        alone) and at every step for the batch it means to run (``_calc_cond_batch``). The longest text of the
        batch, and the edit context (as many tokens as the image) when any condition carries one."""
        p = self.diffusion_model.params
        texts = [s[1] for s in cond_shapes.get("c_crossattn", []) if len(s) > 1]
        text = max(texts, default=DEFAULT_TEXT_TOKENS)
        with_context = bool(cond_shapes.get("ref_latents"))
        return estimates.sampling_memory(p.hidden_size, p.mlp_ratio, p.num_heads, max(1, input_shape[0]), text,
                                         input_shape[-1] * 8, input_shape[-2] * 8, with_context,
                                         mm.dtype_size(self.get_dtype_inference()),
                                         scores=attention_scores(self.diffusion_model.kernel))

    def state_dict_for_saving(self, *args, **kwargs):
        # CheckpointSave / ModelSave: a single-file checkpoint of this MODEL is nothing a loader can read back (the
        # MMDiT without the LLM, visual encoder and tokenizer it is conditioned by).
        raise OvisU1InputError(NOT_SAVABLE)


def time_scale(model_sampling) -> float:
    """What ``model_sampling.timestep`` multiplies the flow time σ by (1 for Ovis-U1's own and ComfyUI's FLUX and
    AuraFlow samplings, 1000 for ModelSamplingSD3's), so that the MMDiT always gets the flow time it was trained on.
    A sampling object that is not flow matching (EPS, v-prediction: ModelSamplingDiscrete) is refused."""
    if not isinstance(model_sampling, comfy.model_sampling.CONST):
        raise not_flow_matching(type(model_sampling).__name__)
    return float(model_sampling.timestep(torch.ones(1)).item())


def attention_scores(kernel: attention.Kernel | None) -> str:
    """What the attention kernel of a sampling step holds of the score matrix (``estimates.SCORES_*``).

    The pack's own kernel when the loader forced one (``estimates.pack_kernel_scores``: only ``math`` builds the
    matrix); else the kernel ComfyUI selects as ``optimized_attention`` (comfy/ldm/modules/attention.py, in that
    order): sage, flash, xformers and PyTorch's SDPA build none; without them ComfyUI runs split or sub-quadratic
    attention, which hold a slice of queries at a time.
    """
    if kernel is not None and not is_comfy(kernel):
        return estimates.pack_kernel_scores(kernel.name)
    flags = ("sage_attention_enabled", "flash_attention_enabled", "xformers_enabled", "pytorch_attention_enabled")
    if any(getattr(mm, flag, lambda: False)() for flag in flags):
        return estimates.SCORES_NONE
    return estimates.SCORES_CHUNKED


def make_core_model(ovis, compute_dtype: torch.dtype, disable_dynamic: bool = False):
    """The MMDiT of a loaded OvisU1 (built with ``mmdit_class=OvisU1MMDiT``) as a core MODEL: a patcher over
    ``OvisU1Model``, sized by the MMDiT's own weights (a plain ``ModelPatcher`` with ``disable_dynamic``)."""
    mmdit = ovis.mmdit
    storage = operations.storage_dtype(mmdit, compute_dtype)
    mmdit.dtype = storage
    mmdit.kernel = ovis.attention
    config = OvisU1ModelConfig(ovis.params, compute_dtype, storage)
    model = OvisU1Model(config, mmdit)
    patcher = patcher_class(disable_dynamic)(model, load_device=load_device(), offload_device=offload_device(),
                                             size=weight_bytes(mmdit))
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, PER_SAMPLING,
                                 per_sampling_cache)
    patch_on_load(patcher)  # patches reach the QK-norm scales and cls_token on every load path
    return patcher


def ovis_model_of(model, name: str = "model") -> OvisU1Model:
    """The OvisU1Model of a MODEL input; another model's MODEL is an error naming the input."""
    inner = getattr(model, "model", None)
    if not isinstance(inner, OvisU1Model):
        kind = type(inner).__name__ if inner is not None else type(model).__name__
        raise OvisU1InputError(f"{name}: this MODEL is {kind}, not Ovis-U1's MMDiT; connect the 'model' output of "
                               "'Ovis-U1 Model Loader'")
    return inner
