"""Inside a real ComfyUI (imported in this process, ``--cpu``): Ovis-U1 through ComfyUI's own sampling.

Acceptance of the native path: SamplerCustomAdvanced + euler + the Ovis-U1 Scheduler + CFGGuider (text-to-image) /
DualCFGGuider (edit) + core VAEDecode gives the pack's own sampler's image for the golden parameters, within 1 uint8
level on at most 0.1 % of the values; and the same graph with other samplers, a KSampler scheduler, a batch of 2,
denoise 0.6 on a VAEEncode'd image, EasyCache and VAEDecodeTiled runs, finite and not blank.

Run: COMFYUI_PATH=~/.cache/comfy-0.18.1/ComfyUI ~/.cache/comfy-0.18.1/venv/bin/python -m pytest tests/comfyui
(and the same for 0.3.64); skipped without COMFYUI_PATH.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.comfyui.test_memory import COMFYUI_PATH, comfy_in_process, load
from tests.golden import TINY_A, assert_golden_image, case_params, requires_golden, tensors

pytestmark = [
    requires_golden,
    pytest.mark.skipif(not COMFYUI_PATH, reason="in-ComfyUI tests need COMFYUI_PATH=/path/to/ComfyUI and a Python "
                                               "with ComfyUI's requirements"),
]


def call(cls, **kwargs) -> tuple:
    """A node's function as the executor calls it: classic nodes through FUNCTION, V3 nodes through execute."""
    if hasattr(cls, "FUNCTION"):
        return tuple(getattr(cls(), cls.FUNCTION)(**kwargs))
    return tuple(cls.execute(**kwargs).args)


def uint8(image: torch.Tensor) -> np.ndarray:
    """SaveImage's conversion of an IMAGE."""
    return np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8)


def assert_same_image(native: torch.Tensor, own: torch.Tensor):
    a, b = uint8(native).astype(int), uint8(own).astype(int)
    assert a.shape == b.shape
    diff = np.abs(a - b)
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.001, (
        f"max |Δ| {diff.max()} on {(diff > 0).mean():.4%} of the values")


def assert_sane(image: torch.Tensor):
    assert torch.isfinite(image).all() and image.std() > 1e-3, "blank or non-finite image"


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    pack = comfy_in_process(tmp_path_factory.mktemp("models"))
    import comfy_extras.nodes_custom_sampler as custom
    import comfy_extras.nodes_easycache as easycache
    import nodes as core

    assert hasattr(core, "VAEDecodeTiled"), f"'nodes' is not ComfyUI's nodes.py: {core.__file__}"
    managed, model, vae = load(pack)
    return dict(pack=pack, core=core, custom=custom, easycache=easycache, managed=managed, model=model, vae=vae)


def pack_node(comfy, name, **kwargs):
    return call(comfy["pack"].NODE_CLASS_MAPPINGS[name], **kwargs)


def t2i_inputs(comfy, batch=1):
    p = case_params("t2i")
    _, positive, middle, negative = pack_node(comfy, "OvisU1EncodeCondition", model=comfy["managed"],
                                              prompt=p["prompt"], mode="text-to-image", width=p["width"],
                                              height=p["height"])
    (latent,) = call(comfy["core"].EmptyLatentImage, width=p["width"], height=p["height"], batch_size=batch)
    return p, positive, negative, latent


def sample_custom(comfy, guider, latent, sigmas, seed, sampler="euler"):
    custom = comfy["custom"]
    (noise,) = call(custom.RandomNoise, noise_seed=seed)
    (sampler_obj,) = call(custom.KSamplerSelect, sampler_name=sampler)
    out = call(custom.SamplerCustomAdvanced, noise=noise, guider=guider, sampler=sampler_obj, sigmas=sigmas,
               latent_image=latent)
    return out[0]


def decode(comfy, latent):
    (image,) = call(comfy["core"].VAEDecode, samples=latent, vae=comfy["vae"])
    return image


def own_t2i(comfy, p, seed):
    managed = comfy["managed"]
    condition, *_ = pack_node(comfy, "OvisU1EncodeCondition", model=managed, prompt=p["prompt"], mode="text-to-image",
                              width=p["width"], height=p["height"])
    (refined,) = pack_node(comfy, "OvisU1Refiner", model=managed, condition=condition)
    (latent,) = pack_node(comfy, "OvisU1Sampler", model=managed, refined=refined, width=p["width"], height=p["height"],
                          steps=p["steps"], txt_cfg=p["txt_cfg"], seed=seed)
    (image,) = pack_node(comfy, "OvisU1VAEDecode", model=managed, samples=latent)
    return image


def scheduler(comfy, p, width=None, height=None, denoise=1.0):
    (sigmas,) = pack_node(comfy, "OvisU1Scheduler", model=comfy["managed"], width=width or p["width"],
                          height=height or p["height"], steps=p["steps"], denoise=denoise)
    return sigmas


# --------------------------------------------------------------------------------------------- acceptance
def test_text_to_image_equals_the_pack_sampler(comfy):
    p, positive, negative, latent = t2i_inputs(comfy)
    (guider,) = call(comfy["custom"].CFGGuider, model=comfy["model"], positive=positive, negative=negative,
                     cfg=p["txt_cfg"])
    native = decode(comfy, sample_custom(comfy, guider, latent, scheduler(comfy, p), p["seed"]))
    own = own_t2i(comfy, p, p["seed"])
    assert_same_image(native, own)
    for image in (native, own):  # both paths give the official image
        assert_golden_image(uint8(image[0]), tensors("t2i")["output_image_uint8"])


def edit_inputs(comfy, scale: int = 1):
    """The golden edit through the pack's nodes; ``scale`` > 1 upscales its image first (another edit size)."""
    p = case_params("edit")
    image = torch.from_numpy(np.array(Image.open(TINY_A / "cases" / "edit" / "input.png").convert("RGB")))
    image = (image.float() / 255.0)[None]
    if scale != 1:
        image = F.interpolate(image.movedim(-1, 1), scale_factor=scale, mode="bilinear").movedim(1, -1).clamp(0, 1)
    managed = comfy["managed"]
    context, resized, empty = pack_node(comfy, "OvisU1EditContextEncoder", model=managed, image=image,
                                        seed=p["vae_sample_seed"])
    condition, positive, middle, negative = pack_node(comfy, "OvisU1EncodeCondition", model=managed,
                                                      prompt=p["prompt"], mode="edit", image=resized, context=context)
    return p, context, condition, positive, middle, negative, empty


def test_edit_equals_the_pack_sampler(comfy):
    p, context, condition, positive, middle, negative, empty = edit_inputs(comfy)
    (guider,) = call(comfy["custom"].DualCFGGuider, model=comfy["model"], cond1=positive, cond2=middle,
                     negative=negative, cfg_conds=p["txt_cfg"], cfg_cond2_negative=p["img_cfg"], style="regular")
    sigmas = scheduler(comfy, p, width=context.width, height=context.height)
    native = decode(comfy, sample_custom(comfy, guider, empty, sigmas, p["seed"]))

    managed = comfy["managed"]
    (refined,) = pack_node(comfy, "OvisU1Refiner", model=managed, condition=condition)
    (latent,) = pack_node(comfy, "OvisU1Sampler", model=managed, refined=refined, steps=p["steps"],
                          txt_cfg=p["txt_cfg"], img_cfg=p["img_cfg"], seed=p["seed"], context=context)
    (own,) = pack_node(comfy, "OvisU1VAEDecode", model=managed, samples=latent)
    assert_same_image(native, own)
    for image in (native, own):  # both paths give the official image
        assert_golden_image(uint8(image[0]), tensors("edit")["output_image_uint8"])


def test_refiner_runs_once_per_conditioning_not_per_step(comfy, monkeypatch):
    p, positive, negative, latent = t2i_inputs(comfy)
    mmdit = comfy["managed"].model.mmdit
    calls = []
    original = mmdit.refine
    monkeypatch.setattr(mmdit, "refine", lambda txt: calls.append(txt.shape) or original(txt))
    (guider,) = call(comfy["custom"].CFGGuider, model=comfy["model"], positive=positive, negative=negative,
                     cfg=p["txt_cfg"])
    steps = dict(p, steps=5)
    sample_custom(comfy, guider, latent, scheduler(comfy, steps), p["seed"])
    assert len(calls) == 2, calls  # positive and negative, once each, for 5 steps


# ------------------------------------------------------------------------------- the rest of the ecosystem
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "res_multistep"])
def test_other_samplers(comfy, sampler):
    p, positive, negative, latent = t2i_inputs(comfy)
    (guider,) = call(comfy["custom"].CFGGuider, model=comfy["model"], positive=positive, negative=negative,
                     cfg=p["txt_cfg"])
    assert_sane(decode(comfy, sample_custom(comfy, guider, latent, scheduler(comfy, p), p["seed"], sampler)))


def test_ksampler_with_its_own_scheduler(comfy):
    p, positive, negative, latent = t2i_inputs(comfy)
    (out,) = call(comfy["core"].KSampler, model=comfy["model"], seed=p["seed"], steps=4, cfg=p["txt_cfg"],
                  sampler_name="euler", scheduler="simple", positive=positive, negative=negative, latent_image=latent,
                  denoise=1.0)
    assert_sane(decode(comfy, out))


def test_batch_of_two_gives_two_images_the_first_as_its_single_run(comfy):
    p, positive, negative, latent = t2i_inputs(comfy, batch=2)
    (guider,) = call(comfy["custom"].CFGGuider, model=comfy["model"], positive=positive, negative=negative,
                     cfg=p["txt_cfg"])
    images = decode(comfy, sample_custom(comfy, guider, latent, scheduler(comfy, p), p["seed"]))
    assert images.shape[0] == 2 and not torch.equal(images[0], images[1])
    # ComfyUI draws the batch's noise in one call, so the first image is the single run of the seed
    assert_same_image(images[:1], own_t2i(comfy, p, p["seed"]))


def test_img2img_at_denoise_0_6_on_a_vae_encoded_image(comfy):
    p, positive, negative, _ = t2i_inputs(comfy)
    source = own_t2i(comfy, p, p["seed"] + 1)
    (latent,) = call(comfy["core"].VAEEncode, pixels=source, vae=comfy["vae"])
    (out,) = call(comfy["core"].KSampler, model=comfy["model"], seed=p["seed"], steps=5, cfg=p["txt_cfg"],
                  sampler_name="euler", scheduler="simple", positive=positive, negative=negative, latent_image=latent,
                  denoise=0.6)
    image = decode(comfy, out)
    assert_sane(image)
    (guider,) = call(comfy["custom"].CFGGuider, model=comfy["model"], positive=positive, negative=negative,
                     cfg=p["txt_cfg"])
    custom = decode(comfy, sample_custom(comfy, guider, latent, scheduler(comfy, p, denoise=0.6), p["seed"]))
    assert_sane(custom)


def test_easycache_and_tiled_decode(comfy, caplog):
    p, context, condition, positive, middle, negative, empty = edit_inputs(comfy)
    (cached,) = call(comfy["easycache"].EasyCacheNode, model=comfy["model"], reuse_threshold=0.2, start_percent=0.15,
                     end_percent=0.95, verbose=False)
    (guider,) = call(comfy["custom"].DualCFGGuider, model=cached, cond1=positive, cond2=middle, negative=negative,
                     cfg_conds=p["txt_cfg"], cfg_cond2_negative=p["img_cfg"], style="regular")
    with caplog.at_level(logging.INFO):
        latent = sample_custom(comfy, guider, empty,
                               scheduler(comfy, dict(p, steps=16), context.width, context.height), p["seed"])
    # EasyCache reaches the MMDiT: it skipped steps (its own summary line: "EasyCache - skipped N/M steps")
    found = re.findall(r"skipped (\d+)/(\d+) steps", caplog.text)
    assert found and int(found[-1][0]) > 0, f"EasyCache skipped no step: {caplog.text[-2000:]}"
    (tiled,) = call(comfy["core"].VAEDecodeTiled, samples=latent, vae=comfy["vae"], tile_size=64, overlap=16,
                    temporal_size=64, temporal_overlap=8)
    assert_sane(tiled)
    assert tiled.shape == decode(comfy, latent).shape
