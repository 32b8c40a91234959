"""The checkpoint's VAE as ComfyUI's VAE, and the edit source encoded with it.

VAEDecode, VAEDecodeTiled and VAEEncode run ComfyUI's own code on ``OvisU1CoreVAE``; the Edit Context Encoder asks
it for the one thing core's VAE does not do, a seeded sample of the posterior (the official edit's context).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

import comfy.model_management as mm
import comfy.sd

from ...ovis_u1 import OvisU1InputError, estimates
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
    (its widths need not be SDXL's: the test checkpoints are tiny). Given no weights it sets every attribute a VAE has
    to its default and stops; that call is made first, so attributes later ComfyUI versions add (0.33.0:
    ``format_encoded``, ``handles_tiling``) exist here too, and only what differs from the defaults is set after it.

    Device and dtype are chosen as the end of ``comfy.sd.VAE.__init__`` chooses them: ``vae_device()`` (the GPU, the
    CPU with ``--cpu-vae``), ``vae_offload_device()`` and ``vae_dtype(device, working_dtypes)``. fp32, the dtype of
    the official decode, is the only working dtype, so it stays the default and only ``--bf16-vae`` / ``--fp16-vae``
    pick another; the weights are converted to it, as core converts its VAEs. ``disable_dynamic``: the patcher is a
    plain ``ModelPatcher`` (what ``ModelPatcher.clone(disable_dynamic=True)`` asks of a rebuild).
    """

    def __init__(self, vae, disable_dynamic: bool = False):
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
        self.device = mm.vae_device()
        self.vae_dtype = mm.vae_dtype(self.device, self.working_dtypes)
        self.first_stage_model.to(self.vae_dtype)
        if hasattr(mm, "archive_model_dtypes"):  # ComfyUI ≥ 0.8: the dtypes its dynamic loader restores
            mm.archive_model_dtypes(self.first_stage_model)
        self.output_device = mm.intermediate_device()
        self.patcher = patcher_class(disable_dynamic)(self.first_stage_model, load_device=self.device,
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
