"""Inside a real ComfyUI (imported in this process, ``--cpu``): what core nodes hand the pack's VAE and MODEL.

Core VAEEncode / VAEDecode and KSampler run ComfyUI's own code on the loader's VAE and MODEL, so nothing of the pack
sees their inputs before the VAE or the MMDiT does. Each bad input gets the pack's OvisU1InputError naming the node
input and the fix (before: raw torch errors inside the VAE or the MMDiT, NaN images without a word, a latent above
the API's 4096 px sampled, an 8000×8000 image taken to the VAE), or is handled as core handles it for its own VAEs
(a gray or gray + alpha image is encoded as gray RGB, as the library converts PIL's L and LA images). After
each case the same model still renders the golden text-to-image image through the pack's nodes and core VAEDecode.

Run: COMFYUI_PATH=~/.cache/comfy-0.33.0/ComfyUI ~/.cache/comfy-0.33.0/venv/bin/python -m pytest tests/comfyui
"""

from __future__ import annotations

import importlib
import logging
import resource
import sys

import pytest
import torch

from tests.comfyui.test_generation import (COMFYUI_PATH, assert_official, call, comfy, decode,  # noqa: F401
                                           mmdit_sampler, t2i_inputs)
from tests.golden import requires_golden

pytestmark = [
    requires_golden,
    pytest.mark.skipif(not COMFYUI_PATH, reason="in-ComfyUI tests need COMFYUI_PATH=/path/to/ComfyUI and a Python "
                                               "with ComfyUI's requirements"),
]


@pytest.fixture(autouse=True)
def still_golden(comfy):
    yield
    p, positive, _, negative, latent = t2i_inputs(comfy)
    assert_official(decode(comfy, mmdit_sampler(comfy, p, positive, negative, latent)), "t2i")


def refused(comfy, fn, *needles: str) -> str:
    with pytest.raises(comfy["error"]) as info:
        fn()
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def vae_encode(comfy, pixels):
    return call(comfy["core"].VAEEncode, vae=comfy["vae"], pixels=pixels)[0]["samples"]


def vae_decode(comfy, samples):
    return call(comfy["core"].VAEDecode, vae=comfy["vae"], samples={"samples": samples})[0]


def gray(height: int, width: int) -> torch.Tensor:
    return torch.linspace(0, 1, height * width).reshape(1, height, width, 1)


# -------------------------------------------------------------------------------------------- the core VAE
def test_the_core_vae_is_built_without_a_warning_and_with_every_attribute_of_a_core_vae(comfy, caplog):
    """Not through ``comfy.sd.VAE.__init__`` (an empty state dict warns "No VAE weights detected"), and no logger is
    touched to hide it; yet every attribute that ``__init__`` gives a core VAE is there, for core's methods to read."""
    sd = importlib.import_module("comfy.sd")
    core_vae = sys.modules[f"{comfy['pack'].__name__}.nodes.comfy_bridge.core_vae"]
    filters = list(logging.getLogger().filters)
    with caplog.at_level(logging.DEBUG):
        vae = core_vae.make_core_vae(comfy["encoder"].model)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert logging.getLogger().filters == filters
    with caplog.at_level(logging.WARNING):
        plain = sd.VAE(sd={})
    assert "No VAE weights detected" in caplog.text
    assert [k for k in vars(plain) if not hasattr(vae, k)] == []


# ---------------------------------------------------------------------------------------------- VAEEncode
BAD_IMAGES = {
    "1×1": (lambda: torch.rand(1, 1, 1, 3), ("1×1", "at least 8×8", "ImageScale")),
    "empty batch": (lambda: torch.rand(0, 64, 64, 3), ("empty batch", "at least one image")),
    "zero height": (lambda: torch.rand(1, 0, 64, 3), ("64×0", "at least 8×8")),
    "zero width": (lambda: torch.rand(1, 64, 0, 3), ("0×64", "at least 8×8")),
    "NaN": (lambda: torch.full((1, 64, 64, 3), float("nan")), ("NaN",)),
    "5 channels": (lambda: torch.rand(1, 64, 64, 5), ("5 channels", "RGB")),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_a_bad_image_through_vae_encode_is_named(comfy, case):
    make, needles = BAD_IMAGES[case]
    refused(comfy, lambda: vae_encode(comfy, make()), "VAEEncode pixels", *needles)


def test_an_image_above_the_size_cap_is_refused_before_the_vae_runs(comfy, monkeypatch):
    """8000×8000 (a view of one pixel: the test holds no 768 MB image) is refused by its shape, before ComfyUI is
    asked for memory or the VAE runs: the process's peak memory does not grow."""
    import comfy.model_management as mm

    asked = []
    monkeypatch.setattr(mm, "load_models_gpu", lambda *a, **k: asked.append(k))
    pixels = torch.zeros(1, 1, 1, 3).expand(1, 8000, 8000, 3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refused(comfy, lambda: vae_encode(comfy, pixels), "VAEEncode pixels", "8000×8000", "4096×4096", "ImageScale")
    assert asked == [] and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss == peak


def test_gray_and_gray_alpha_images_are_encoded_as_gray_rgb(comfy):
    """As ``ovis_u1.preprocess.to_rgb`` converts PIL's L and LA images (core's SD VAEs fail on them)."""
    image = gray(64, 64)
    rgb = vae_encode(comfy, image.expand(-1, -1, -1, 3))
    assert torch.equal(vae_encode(comfy, image), rgb)
    assert torch.equal(vae_encode(comfy, torch.cat([image, torch.rand_like(image)], dim=-1)), rgb)


# ---------------------------------------------------------------------------------------------- VAEDecode
BAD_LATENTS = {
    "16 channels": (lambda: torch.randn(1, 16, 8, 8), ("16 channels", "4")),
    "NaN": (lambda: torch.full((1, 4, 8, 8), float("nan")), ("NaN",)),
    "inf": (lambda: torch.full((1, 4, 8, 8), float("inf")), ("infinite",)),
    "zero width": (lambda: torch.randn(1, 4, 8, 0), ("[1, 4, 8, 0]",)),
}


@pytest.mark.parametrize("case", list(BAD_LATENTS))
def test_a_bad_latent_through_vae_decode_is_named(comfy, case):
    make, needles = BAD_LATENTS[case]
    refused(comfy, lambda: vae_decode(comfy, make()), "VAEDecode samples", *needles)


# ------------------------------------------------------------------------------------------ the MODEL
@pytest.mark.parametrize("width, needles", [(0, ("width 0", "64")), (4112, ("width 4112", "4096"))])
def test_a_latent_the_api_refuses_is_not_sampled(comfy, width, needles):
    p, positive, _, negative, _ = t2i_inputs(comfy)
    latent = {"samples": torch.zeros(1, 4, 8, width // 8)}
    refused(comfy, lambda: call(comfy["core"].KSampler, model=comfy["model"], seed=0, steps=1, cfg=1.0,
                                sampler_name="euler", scheduler="simple", positive=positive, negative=negative,
                                latent_image=latent, denoise=1.0), "KSampler 'latent_image'", *needles)
