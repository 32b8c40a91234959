"""Ovis-U1 as ComfyUI's own model types: the MMDiT as a core MODEL, the checkpoint's VAE as a core VAE.

MODEL: a ``comfy.model_base.BaseModel`` whose diffusion model is the loaded MMDiT (the same module the pack's own
sampler runs, not a copy). Flow matching as in FLUX (``CONST``: denoised = x − σ·v, so ComfyUI's Euler step is the
official x ← x + (σ_next − σ)·v) with Ovis-U1's shift (none for Ovis-U1-3B, whose config turns it off; the resolution
dependent one of the config's base/max shift otherwise, at 1024² by default and exactly per size through the Ovis-U1
Scheduler node). The official starting noise is drawn in bf16; ComfyUI draws fp32 from the same generator, of which
bf16 draws are the rounding, so the noise scaling rounds it: the same seed gives the official image.

Conditioning: the LLM hidden states are the cross-attention input; the token refiner (time-independent) runs once
per conditioning in ``extra_conds`` before sampling, never per step. The edit context arrives as ComfyUI's
``reference_latents`` (raw VAE latents, scaled by the latent format), as FLUX Kontext and Qwen-Image-Edit take it.

VAE: ``comfy.sd.VAE`` cannot build the checkpoint's VAE from its state dict when its widths are not SDXL's (the test
checkpoints are tiny), so ``OvisU1CoreVAE`` is a ``comfy.sd.VAE`` whose first-stage model is the pack's own VAE;
VAEDecode, VAEDecodeTiled and VAEEncode then run ComfyUI's own code on it.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
from torch import nn

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_sampling
import comfy.patcher_extension
import comfy.sd
import comfy.supported_models_base

from ovis_u1 import attention
from ovis_u1.sampling import pack_latents, unpack_latents

from .. import estimates
from . import load_device, offload_device
from .attention import comfy_kernel, is_comfy
from .memory import patcher_class, weight_bytes

DEFAULT_SHIFT_TOKENS = 4096  # 1024×1024: the size the shift of KSampler's own schedulers is computed for


def shift_mu(params, num_tokens: int = DEFAULT_SHIFT_TOKENS) -> float:
    """FLUX's time-shift mu for ``num_tokens`` image tokens; 0 (no shift) when the checkpoint's config turns the
    shift off. Equal to what ``ovis_u1.sampling.flow_schedule`` bends the times by."""
    if not params.timestep_shift:
        return 0.0
    slope = (params.max_shift - params.base_shift) / (4096 - 256)
    return slope * num_tokens + (params.base_shift - slope * 256)


class OvisU1LatentFormat(comfy.latent_formats.SDXL):
    """SDXL's latent format (previews, channel count) with the checkpoint's own scaling and shift factors."""

    def __init__(self, scaling_factor: float = 0.13025, shift_factor: float | None = None):
        super().__init__()
        self.scale_factor = scaling_factor
        self.shift_factor = shift_factor

    def process_in(self, latent):
        if self.shift_factor is not None:
            latent = latent - self.shift_factor
        return latent * self.scale_factor

    def process_out(self, latent):
        latent = latent / self.scale_factor
        return latent if self.shift_factor is None else latent + self.shift_factor


class OvisU1ModelSampling(comfy.model_sampling.ModelSamplingFlux, comfy.model_sampling.CONST):
    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        # The official noise is torch.randn(..., dtype=bfloat16) from a seeded CPU generator: the bf16 rounding of
        # the fp32 draw ComfyUI makes with the same generator.
        return super().noise_scaling(sigma, noise.to(torch.bfloat16).to(noise.dtype), latent_image, max_denoise)


class OvisU1ModelConfig(comfy.supported_models_base.BASE):
    unet_config = {"image_model": "ovis_u1", "disable_unet_model_creation": True}
    latent_format = comfy.latent_formats.SDXL
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]
    memory_usage_factor = 1.0

    def __init__(self, ovis, compute_dtype: torch.dtype, storage_dtype: torch.dtype):
        super().__init__(dict(self.unet_config))
        vae = ovis.params.vae
        self.latent_format = OvisU1LatentFormat(vae.scaling_factor, vae.shift_factor)
        self.sampling_settings = {"shift": shift_mu(ovis.params.mmdit)}
        self.manual_cast_dtype = None if storage_dtype == compute_dtype else compute_dtype


class OvisU1DiffusionModel(nn.Module):
    """ComfyUI's diffusion-model call ``(x, timestep, context, **conds)`` on the MMDiT: latents [B, 4, 2h, 2w] are
    packed into 2×2 tokens, the edit context (``ref_latents``) is prepended as context tokens, the velocity is
    unpacked back. Wrappers of ``WrappersMP.DIFFUSION_MODEL`` (EasyCache) see the latent as the first argument."""

    def __init__(self, mmdit, dtype: torch.dtype, kernel: attention.Kernel | None = None):
        super().__init__()
        self.mmdit = mmdit
        self.dtype = dtype
        self.kernel = kernel or comfy_kernel()  # the loader's attention choice

    def kernel_for(self, transformer_options: dict | None = None) -> attention.Kernel:
        """The kernel of a pass: ComfyUI's selection with this sampling's ``transformer_options`` (its attention
        overrides), unless the loader forced one of the pack's own."""
        return comfy_kernel(transformer_options) if is_comfy(self.kernel) else self.kernel

    def forward(self, x, timestep, context, pooled=None, ref_latents=None, control=None, transformer_options={},
                **kwargs):
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._forward,
            self,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                     transformer_options),
        ).execute(x, timestep, context, pooled, ref_latents, control, transformer_options, **kwargs)

    def _forward(self, x, timestep, context, pooled=None, ref_latents=None, control=None, transformer_options={},
                 context_tokens=None, **kwargs):
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(
                f"Ovis-U1 needs width and height in multiples of 16 pixels; the latent is {x.shape[-1] * 8}×"
                f"{x.shape[-2] * 8}: pick e.g. {round(x.shape[-1] / 2) * 16}×{round(x.shape[-2] / 2) * 16}"
            )
        height, width = x.shape[-2] * 8, x.shape[-1] * 8
        tokens = pack_latents(x)
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
        cache = transformer_options.get(PerSamplingCache.KEY)
        positions = None
        if cache is not None:
            positions = cache.positions(self.mmdit, text.shape[1], height, width, bool(ref_latents), x.device)
        with attention.using(self.kernel_for(transformer_options)):
            prepared = self.mmdit.prepare(text, pooled.to(x.dtype), height, width, context=ctx, positions=positions,
                                          context_tokens=context_tokens)
            velocity = self.mmdit(tokens, timestep.to(x.dtype), prepared)
        return unpack_latents(velocity, height, width, channels=x.shape[1])


def check_context_size(reference_shape, latent_shape) -> None:
    if tuple(reference_shape[-2:]) != tuple(latent_shape[-2:]):
        raise ValueError(
            f"the edit context is {reference_shape[-1] * 8}×{reference_shape[-2] * 8} but the latent is "
            f"{latent_shape[-1] * 8}×{latent_shape[-2] * 8}: sample at the edit size (the 'latent' output of the Edit "
            "Context Encoder)"
        )


class PerSamplingCache:
    """What a denoising step needs that depends on shapes alone — the RoPE tables of [text, noise (, context)]
    (position ids, float64 angles) — made once per sampling run instead of at every step.

    One cache per run: ``per_sampling_cache`` (a ``WrappersMP.OUTER_SAMPLE`` wrapper of the core MODEL) puts a new
    one into the run's ``transformer_options`` and drops it when the run ends, so nothing outlives the run on the
    device, and runs of a shared model never see each other's. Keyed by text length, size, context and device:
    conditionings of different text lengths (positive / negative) get a table each, alternating freely. Not a dict,
    so that ComfyUI's per-step copies of ``transformer_options`` hand on the same object.
    """

    KEY = "ovis_u1_per_sampling"

    def __init__(self):
        self.tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def positions(self, mmdit, txt_len: int, height: int, width: int, with_context: bool, device):
        key = (id(mmdit), txt_len, height, width, with_context, str(device))
        if key not in self.tables:
            self.tables[key] = mmdit.positions(txt_len, height, width, with_context, device)
        return self.tables[key]


def per_sampling_cache(executor, *args, **kwargs):
    """``WrappersMP.OUTER_SAMPLE`` wrapper: a fresh ``PerSamplingCache`` for the run the guider starts."""
    options = executor.class_obj.model_options.setdefault("transformer_options", {})
    previous = options.get(PerSamplingCache.KEY)
    options[PerSamplingCache.KEY] = PerSamplingCache()
    try:
        return executor(*args, **kwargs)
    finally:
        if previous is None:
            options.pop(PerSamplingCache.KEY, None)
        else:
            options[PerSamplingCache.KEY] = previous


class OvisU1Native(comfy.model_base.BaseModel):
    """The MMDiT (with its token refiner) as a core MODEL."""

    def __init__(self, model_config: OvisU1ModelConfig, mmdit, storage_dtype: torch.dtype,
                 kernel: attention.Kernel | None = None):
        super().__init__(model_config, comfy.model_base.ModelType.FLUX, device=None)
        self.diffusion_model = OvisU1DiffusionModel(mmdit, storage_dtype, kernel)
        self.model_sampling = OvisU1ModelSampling(model_config)
        # The model-condition keys, as core's Flux / QwenImage name them: ``_calc_cond_batch`` passes the sizes of
        # the conditions it batches under these, and ``extra_conds_shapes`` gives ``estimate_memory`` the same.
        self.memory_usage_factor_conds = ("c_crossattn", "ref_latents")
        if hasattr(mm, "archive_model_dtypes"):  # ComfyUI ≥ 0.8: the dtypes its dynamic loader restores
            mm.archive_model_dtypes(self.diffusion_model)

    @property
    def mmdit(self):
        return self.diffusion_model.mmdit

    def compute_dtype(self) -> torch.dtype:
        """The dtype the MMDiT computes in (``get_dtype_inference`` of ComfyUI ≥ 0.8, written out for 0.3.64)."""
        return self.manual_cast_dtype or self.get_dtype()

    def extra_conds(self, **kwargs):
        out = {}
        states = kwargs.get("cross_attn", None)
        if states is not None:
            # The token refiner does not depend on the time: once here, not at every step.
            device, dtype = kwargs.get("device", load_device()), self.compute_dtype()
            with torch.no_grad(), attention.using(self.diffusion_model.kernel_for()):
                tokens, pooled = self.mmdit.refine(states.to(device=device, dtype=dtype))
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
                device, dtype = kwargs.get("device", load_device()), self.compute_dtype()
                with torch.no_grad():
                    packed = pack_latents(reference.to(device=device, dtype=dtype))
                    out["context_tokens"] = comfy.conds.CONDRegular(self.mmdit.project_context(packed, dtype))
        return out

    def extra_conds_shapes(self, **kwargs):
        """What ``sampler_helpers.estimate_memory`` passes to ``memory_required`` per conditioning, under the keys and
        in the layout ``samplers._calc_cond_batch`` passes the real conditions' ``size()``: ``c_crossattn`` [1, L, C]
        (the refiner keeps the length), ``ref_latents`` as ``CONDList.size()`` reports the one reference used."""
        out = {}
        states = kwargs.get("cross_attn", None)
        if states is not None:
            out["c_crossattn"] = [1, states.shape[1], self.mmdit.params.hidden_size]
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
        p = self.mmdit.params
        texts = [s[1] for s in cond_shapes.get("c_crossattn", []) if len(s) > 1]
        text = max(texts, default=DEFAULT_TEXT_TOKENS)
        with_context = bool(cond_shapes.get("ref_latents"))
        return estimates.sampling_memory(p.hidden_size, p.mlp_ratio, p.num_heads, max(1, input_shape[0]), text,
                                         input_shape[-1] * 8, input_shape[-2] * 8, with_context,
                                         mm.dtype_size(self.compute_dtype()),
                                         scores=attention_scores(_pack_kernel(self.diffusion_model)))


DEFAULT_TEXT_TOKENS = 512  # a condition of unknown length: the prompt with the visual tokens of its image


def attention_scores(pack_kernel: str | None = None) -> str:
    """What the attention kernel of a sampling step holds of the score matrix (``estimates.SCORES_*``).

    ``pack_kernel``: the pack's own kernel when the loader forces one (``estimates.pack_kernel_scores``: only
    ``math`` builds the matrix). None: the kernel ComfyUI selects as ``optimized_attention``
    (comfy/ldm/modules/attention.py, in that order): sage, flash, xformers and PyTorch's SDPA build none; without
    them ComfyUI runs split or sub-quadratic attention, which hold a slice of queries at a time.
    """
    if pack_kernel is not None:
        return estimates.pack_kernel_scores(pack_kernel)
    flags = ("sage_attention_enabled", "flash_attention_enabled", "xformers_enabled", "pytorch_attention_enabled")
    if any(getattr(mm, flag, lambda: False)() for flag in flags):
        return estimates.SCORES_NONE
    return estimates.SCORES_CHUNKED


def _pack_kernel(diffusion_model) -> str | None:
    """The pack kernel the loader forced on the MMDiT, None when ComfyUI's selection runs it: an
    ``attention.Kernel`` without a host function (``kernel.full``) is the pack's own, by name."""
    kernel = getattr(diffusion_model, "kernel", None)
    if kernel is None:  # the library's process-wide switch, where kernels are not chosen per model
        from ovis_u1 import attention

        backend = getattr(attention, "get_attention_backend", lambda: "auto")()
        return "math" if backend == "math" else None
    return kernel.name if getattr(kernel, "full", None) is None else None


def _storage_dtype(mmdit, compute_dtype: torch.dtype) -> torch.dtype:
    dtypes = {p.dtype for p in mmdit.parameters() if p.dtype.is_floating_point}
    fp8 = [d for d in dtypes if d.itemsize == 1]
    return fp8[0] if fp8 else compute_dtype


def make_core_model(ovis, compute_dtype: torch.dtype, weight_dtype: str | None = None):
    """The MMDiT as a core MODEL: a patcher over ``OvisU1Native``, sized by the MMDiT's own weights."""
    storage = _storage_dtype(ovis.mmdit, compute_dtype)
    config = OvisU1ModelConfig(ovis, compute_dtype, storage)
    native = OvisU1Native(config, ovis.mmdit, storage, ovis.attention)
    patcher = patcher_class()(native, load_device=load_device(), offload_device=offload_device(),
                              size=weight_bytes(ovis.mmdit))
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, PerSamplingCache.KEY,
                                 per_sampling_cache)
    return patcher


# --------------------------------------------------------------------------------------------------------- VAE
class OvisU1FirstStage(nn.Module):
    """The first-stage interface ``comfy.sd.VAE`` calls: encode → posterior mean (as ComfyUI's SD VAEs), decode."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def encode(self, pixels):
        mean, _ = self.vae.encode(pixels)
        return mean

    def decode(self, latent, **kwargs):
        return self.vae.decode(latent)


class OvisU1CoreVAE(comfy.sd.VAE):
    """A core VAE over the checkpoint's VAE (fp32, as the official decode).

    ``comfy.sd.VAE.__init__`` builds its first-stage model from a state dict, which it cannot do for the pack's VAE
    (its widths need not be SDXL's: the test checkpoints are tiny). Given no weights it sets every attribute a VAE has
    to its default and stops; that call is made first, so attributes later ComfyUI versions add (0.33.0:
    ``format_encoded``, ``handles_tiling``) exist here too, and only what differs from the defaults is set after it.
    """

    def __init__(self, vae):
        with _quiet_vae_warning():
            comfy.sd.VAE.__init__(self, sd={})
        widths = tuple(vae.params.block_out_channels) if hasattr(vae, "params") else estimates.SDXL_BLOCK_OUT
        self.memory_used_encode = lambda shape, dtype: estimates.vae_encode_memory(shape[2], shape[3],
                                                                                   mm.dtype_size(dtype), widths)
        self.memory_used_decode = lambda shape, dtype: estimates.vae_decode_memory(shape[2], shape[3],
                                                                                   mm.dtype_size(dtype), widths)
        self.latent_channels = vae.params.latent_channels if hasattr(vae, "params") else 4
        self.working_dtypes = [torch.float32]
        self.first_stage_model = OvisU1FirstStage(vae).eval()
        self.device = load_device()
        self.vae_dtype = next(vae.parameters()).dtype
        self.output_device = mm.intermediate_device()
        self.patcher = patcher_class()(self.first_stage_model, load_device=self.device,
                                       offload_device=mm.vae_offload_device(), size=weight_bytes(vae))

    def vae_output_dtype(self):
        return mm.intermediate_dtype() if hasattr(mm, "intermediate_dtype") else torch.float32


@contextlib.contextmanager
def _quiet_vae_warning():
    """``comfy.sd.VAE.__init__`` without weights warns that the VAE is not initialised; here it is, right after."""

    def drop(record: logging.LogRecord) -> bool:
        return "No VAE weights detected" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def make_core_vae(ovis) -> OvisU1CoreVAE:
    return OvisU1CoreVAE(ovis.vae)


def image_tokens(width: int, height: int) -> int:
    return math.ceil(height / 16) * math.ceil(width / 16)
