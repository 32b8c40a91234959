"""The checkpoint's VAE as ComfyUI's VAE, and the edit source encoded with it.

VAEDecode, VAEDecodeTiled and VAEEncode run ComfyUI's own code on ``OvisU1CoreVAE``; the Edit Context Encoder asks
it for the one thing core's VAE does not do, a seeded sample of the posterior (the official edit's context).
"""

from __future__ import annotations

import torch
from torch import nn

import comfy.model_management as mm
import comfy.sd

from ...ovis_u1 import OvisU1InputError, estimates
from ...ovis_u1.inputs import check_host_image, check_latent
from ...ovis_u1.model import sample_edit_latent

from .memory import patcher_class, weight_bytes


class OvisU1FirstStage(nn.Module):
    """The first-stage interface ``comfy.sd.VAE`` calls: encode → posterior mean (as ComfyUI's SD VAEs), decode; each
    computes in the dtype ComfyUI hands its input in (its ``vae_dtype``), on the input's device."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def encode(self, pixels):
        mean, _ = self.vae.encode(pixels, dtype=pixels.dtype)
        return mean

    def decode(self, latent, **kwargs):
        return self.vae.decode(latent, dtype=latent.dtype)


class OvisU1CoreVAE(comfy.sd.VAE):
    """A core VAE over the checkpoint's VAE, on ComfyUI's VAE device in ComfyUI's VAE dtype.

    ``comfy.sd.VAE.__init__`` builds its first-stage model from a state dict, which it cannot do for the pack's VAE
    (its widths need not be SDXL's: the test checkpoints are tiny), and given none it warns "No VAE weights detected".
    So it is not called: what it sets before reading weights (ComfyUI 0.18.1 and 0.33.0) is set here, the SD defaults
    as class attributes (tests/comfyui/test_core_inputs.py checks that none is missing), the rest in ``__init__``.

    Device and dtype are chosen as the end of ``comfy.sd.VAE.__init__`` chooses them: ``vae_device()`` (the GPU, the
    CPU with ``--cpu-vae``), ``vae_offload_device()`` and ``vae_dtype(device, working_dtypes)``. fp32, the dtype of
    the official decode, is the only working dtype, so it stays the default and only ``--bf16-vae`` / ``--fp16-vae``
    pick another; the weights are converted to it, as core converts its VAEs. ``disable_dynamic``: the patcher is a
    plain ``ModelPatcher`` (what ``ModelPatcher.clone(disable_dynamic=True)`` asks of a rebuild). What core's nodes
    hand it is checked once by the library (``ovis_u1.inputs``) before core's code or the VAE sees it.
    """

    downscale_ratio = upscale_ratio = 8
    latent_dim, output_channels, pad_channel_value, crop_input = 2, 3, None, True
    disable_offload = not_video = handles_tiling = False
    size = downscale_index_formula = upscale_index_formula = extra_1d_channel = format_encoded = None
    audio_sample_rate = 44100

    def __init__(self, vae, disable_dynamic: bool = False):
        widths = tuple(vae.params.block_out_channels)
        self.memory_used_encode = lambda shape, dtype: estimates.vae_encode_memory(shape[2], shape[3],
                                                                                   mm.dtype_size(dtype), widths)
        self.memory_used_decode = lambda shape, dtype: estimates.vae_decode_memory(shape[2], shape[3],
                                                                                   mm.dtype_size(dtype), widths)
        self.latent_channels = vae.params.latent_channels
        self.working_dtypes = [torch.float32]
        self.first_stage_model = OvisU1FirstStage(vae).eval()
        self.device = mm.vae_device()
        self.vae_dtype = mm.vae_dtype(self.device, self.working_dtypes)
        self.first_stage_model.to(self.vae_dtype)
        mm.archive_model_dtypes(self.first_stage_model)  # the dtypes ComfyUI's dynamic loader restores
        self.output_device = mm.intermediate_device()
        self.patcher = patcher_class(disable_dynamic)(self.first_stage_model, load_device=self.device,
                                                      offload_device=mm.vae_offload_device(), size=weight_bytes(vae))

    process_input = staticmethod(lambda image: image * 2.0 - 1.0)  # IMAGE in [0, 1] → the VAE's [-1, 1]
    process_output = staticmethod(lambda image: image.add_(1.0).div_(2.0).clamp_(0.0, 1.0))  # and back, in place

    def encode(self, pixel_samples):
        return super().encode(check_host_image(pixel_samples, "VAEEncode pixels"))

    def encode_tiled(self, pixel_samples, *args, **kwargs):  # tiles: no size cap
        return super().encode_tiled(check_host_image(pixel_samples, "VAEEncodeTiled pixels", None), *args, **kwargs)

    def decode(self, samples_in, *args, **kwargs):
        return super().decode(check_latent(samples_in, "VAEDecode samples", self.latent_channels), *args, **kwargs)

    def decode_tiled(self, samples, *args, **kwargs):
        return super().decode_tiled(check_latent(samples, "VAEDecodeTiled samples", self.latent_channels), *args,
                                    **kwargs)


def make_core_vae(ovis, disable_dynamic: bool = False) -> OvisU1CoreVAE:
    return OvisU1CoreVAE(ovis.vae, disable_dynamic)


def ovis_vae_of(vae, name: str = "vae"):
    """The pack's VAE module of a VAE input; another VAE is an error naming the input."""
    if not isinstance(vae, OvisU1CoreVAE):
        raise OvisU1InputError(f"{name}: this VAE is {type(vae).__name__}, not Ovis-U1's; connect the 'vae' output of "
                               "'Ovis-U1 Model Loader' (the edit context is a seeded sample of its posterior)")
    return vae.first_stage_model.vae


def encode_edit_source(vae: OvisU1CoreVAE, source, seed: int) -> torch.Tensor:
    """The raw VAE latent of an edit source at its edit size (``ovis_u1.model.sample_edit_latent``), with the VAE
    loaded by ComfyUI's model management and computed where core's VAEEncode computes: on ``vae.device`` in
    ``vae.vae_dtype``, wherever ComfyUI left its weights (a partial load casts the rest there layer by layer).
    On the intermediate device."""
    module = ovis_vae_of(vae)
    width, height = source.size
    mm.load_models_gpu([vae.patcher], memory_required=vae.memory_used_encode((1, 3, height, width), vae.vae_dtype))
    latent = sample_edit_latent(module, source, seed, device=vae.device, dtype=vae.vae_dtype)
    return latent.to(mm.intermediate_device())
