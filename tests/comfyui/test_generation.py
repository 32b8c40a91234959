"""Inside a real ComfyUI (imported in this process, ``--cpu``): Ovis-U1 generation has one path, ComfyUI's own.

Acceptance: the pack's nodes (Encode Condition → Refiner → MMDiT Sampler → core VAEDecode) and a hand-built core graph
(SamplerCustomAdvanced + euler + the Ovis-U1 Scheduler + CFGGuider / DualCFGGuider) both give the golden image of the
official code, text-to-image and edit, within the golden's image tolerance. A model patch on the MODEL reaches the
MMDiT Sampler's run; ModelSampling nodes work or are refused; a foreign CONDITIONING and saving the MODEL are refused
with messages that say why; other samplers, a KSampler scheduler, a batch, img2img, EasyCache and tiled decoding run.

Run: COMFYUI_PATH=~/.cache/comfy-0.33.0/ComfyUI ~/.cache/comfy-0.33.0/venv/bin/python -m pytest tests/comfyui
(and the same for 0.3.64 and 0.18.1); skipped without COMFYUI_PATH.
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
from tests.pack import node_classes
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


def assert_official(image: torch.Tensor, case: str):
    assert image.shape[0] == 1
    assert_golden_image(uint8(image[0]), tensors(case)["output_image_uint8"])


def assert_sane(image: torch.Tensor):
    assert torch.isfinite(image).all() and image.std() > 1e-3, "blank or non-finite image"


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    pack = comfy_in_process(tmp_path_factory.mktemp("models"))
    import comfy_extras.nodes_custom_sampler as custom
    import comfy_extras.nodes_easycache as easycache
    import comfy_extras.nodes_model_advanced as advanced
    import nodes as core

    assert hasattr(core, "VAEDecodeTiled"), f"'nodes' is not ComfyUI's nodes.py: {core.__file__}"
    encoder, model, vae = load(pack)
    return dict(pack=pack, core=core, custom=custom, easycache=easycache, advanced=advanced, encoder=encoder,
                model=model, vae=vae, error=pack_error(pack))


def pack_error(pack):
    """The pack's own OvisU1InputError (the pack's copy of the library, imported as ComfyUI imports a node pack)."""
    import sys

    return sys.modules[f"{pack.__name__}.ovis_u1"].OvisU1InputError


def pack_node(comfy, name, **kwargs):
    return call(node_classes(comfy["pack"])[name], **kwargs)


def t2i_inputs(comfy, batch=1, case="t2i"):
    p = case_params(case)
    (latent,) = call(comfy["core"].EmptyLatentImage, width=p["width"], height=p["height"], batch_size=batch)
    positive, middle, negative = pack_node(comfy, "OvisU1EncodeCondition", encoder=comfy["encoder"],
                                           prompt=p["prompt"], mode="text-to-image", latent=latent)
    return p, positive, middle, negative, latent


def edit_inputs(comfy, scale: int = 1):
    """The golden edit through the pack's nodes; ``scale`` > 1 upscales its image first (another edit size)."""
    p = case_params("edit")
    image = torch.from_numpy(np.array(Image.open(TINY_A / "cases" / "edit" / "input.png").convert("RGB")))
    image = (image.float() / 255.0)[None]
    if scale != 1:
        image = F.interpolate(image.movedim(-1, 1), scale_factor=scale, mode="bilinear").movedim(1, -1).clamp(0, 1)
    resized, context, latent = pack_node(comfy, "OvisU1EditContextEncoder", vae=comfy["vae"], image=image,
                                         seed=p["vae_sample_seed"])
    positive, middle, negative = pack_node(comfy, "OvisU1EncodeCondition", encoder=comfy["encoder"],
                                           prompt=p["prompt"], mode="edit", image=resized, context=context)
    return p, positive, middle, negative, latent


def mmdit_sampler(comfy, p, positive, negative, latent, model=None, middle=None, **overrides):
    kwargs = dict(model=model or comfy["model"], positive=positive, negative=negative, latent=latent,
                  seed=p["seed"], steps=p["steps"], txt_cfg=p["txt_cfg"], img_cfg=p.get("img_cfg", 1.5),
                  timestep_shift="config")
    if middle is not None:
        kwargs["middle"] = middle
    (out,) = pack_node(comfy, "OvisU1Sampler", **{**kwargs, **overrides})
    return out


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


def scheduler(comfy, p, latent, steps=None, denoise=1.0):
    (sigmas,) = pack_node(comfy, "OvisU1Scheduler", model=comfy["model"], latent=latent, steps=steps or p["steps"],
                          timestep_shift="config", denoise=denoise)
    return sigmas


# --------------------------------------------------------------------------------------------- acceptance
def test_text_to_image_through_the_pack_nodes_is_the_official_image(comfy):
    p, positive, middle, negative, latent = t2i_inputs(comfy)
    refined = pack_node(comfy, "OvisU1Refiner", model=comfy["model"], positive=positive, negative=negative)
    assert_official(decode(comfy, mmdit_sampler(comfy, p, refined[0], refined[2], latent)), "t2i")
    # without the Refiner the MODEL refines the conditioning itself
    assert_official(decode(comfy, mmdit_sampler(comfy, p, positive, negative, latent)), "t2i")


def test_text_to_image_through_a_core_graph_is_the_official_image(comfy):
    p, positive, middle, negative, latent = t2i_inputs(comfy)
    (guider,) = call(comfy["custom"].CFGGuider, model=comfy["model"], positive=positive, negative=negative,
                     cfg=p["txt_cfg"])
    assert_official(decode(comfy, sample_custom(comfy, guider, latent, scheduler(comfy, p, latent), p["seed"])), "t2i")


def test_edit_through_the_pack_nodes_is_the_official_image(comfy):
    p, positive, middle, negative, latent = edit_inputs(comfy)
    refined = pack_node(comfy, "OvisU1Refiner", model=comfy["model"], positive=positive, negative=negative,
                        middle=middle)
    out = mmdit_sampler(comfy, p, refined[0], refined[2], latent, middle=refined[1])
    assert_official(decode(comfy, out), "edit")


def test_edit_through_a_core_graph_is_the_official_image(comfy):
    p, positive, middle, negative, latent = edit_inputs(comfy)
    (guider,) = call(comfy["custom"].DualCFGGuider, model=comfy["model"], cond1=positive, cond2=middle,
                     negative=negative, cfg_conds=p["txt_cfg"], cfg_cond2_negative=p["img_cfg"], style="regular")
    out = sample_custom(comfy, guider, latent, scheduler(comfy, p, latent), p["seed"])
    assert_official(decode(comfy, out), "edit")


def test_a_model_patch_reaches_the_mmdit_sampler(comfy):
    p, positive, middle, negative, latent = t2i_inputs(comfy)
    seen = []

    def wrapper(apply_model, args):
        seen.append(args["input"].shape)
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched = comfy["model"].clone()
    patched.set_model_unet_function_wrapper(wrapper)
    assert_official(decode(comfy, mmdit_sampler(comfy, p, positive, negative, latent, model=patched)), "t2i")
    # every step, cond and uncond (one batch, or one call each when their text lengths differ)
    assert len(seen) in (p["steps"], 2 * p["steps"]), seen


def test_refiner_runs_once_per_conditioning_not_per_step(comfy, monkeypatch):
    p, positive, middle, negative, latent = t2i_inputs(comfy)
    mmdit = comfy["model"].model.diffusion_model
    calls = []
    original = mmdit.refine
    monkeypatch.setattr(mmdit, "refine", lambda txt: calls.append(txt.shape) or original(txt))
    mmdit_sampler(comfy, p, positive, negative, latent, steps=5)
    assert len(calls) == 2, calls  # positive and negative, once each, for 5 steps
    calls.clear()
    refined = pack_node(comfy, "OvisU1Refiner", model=comfy["model"], positive=positive, negative=negative)
    mmdit_sampler(comfy, p, refined[0], refined[2], latent, steps=5)
    assert len(calls) == 2, calls  # in the Refiner, none in the sampler


def test_the_diffusion_model_is_the_mmdit_under_its_checkpoint_names(comfy):
    names = set(comfy["model"].model.diffusion_model.state_dict())
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "txt_in.input_embedder.weight",
            "final_layer.linear.weight"} <= names, sorted(names)[:20]
    import safetensors

    from tests.golden import CHECKPOINT

    prefix = "visual_generator.backbone."
    checkpoint = set()
    for path in CHECKPOINT.glob("*.safetensors"):
        with safetensors.safe_open(str(path), "pt") as f:
            checkpoint |= {k[len(prefix):] for k in f.keys() if k.startswith(prefix)}
    assert names == checkpoint


# ------------------------------------------------------------------------------------- refusals, ModelSampling
def test_a_foreign_conditioning_is_refused_with_its_origin(comfy):
    p, positive, middle, negative, latent = t2i_inputs(comfy)
    t5 = [[torch.randn(1, 12, 4096), {"pooled_output": torch.randn(1, 768)}]]
    with pytest.raises(comfy["error"], match=r"positive: this CONDITIONING did not come from .*T5"):
        mmdit_sampler(comfy, p, t5, negative, latent)
    (guider,) = call(comfy["custom"].CFGGuider, model=comfy["model"], positive=t5, negative=negative, cfg=2.0)
    with pytest.raises(comfy["error"], match=r"did not come from .*T5"):
        sample_custom(comfy, guider, latent, scheduler(comfy, p, latent), p["seed"])


def test_swapped_wires_are_named(comfy):
    p, positive, middle, negative, latent = edit_inputs(comfy)
    with pytest.raises(comfy["error"], match=r"positive: expected the 'positive' output .*'negative' output"):
        mmdit_sampler(comfy, p, negative, positive, latent, middle=middle)
    with pytest.raises(comfy["error"], match=r"middle: an edit needs the image-only branch"):
        mmdit_sampler(comfy, p, positive, negative, latent)


def test_saving_the_model_is_refused_and_writes_nothing(comfy, tmp_path, monkeypatch):
    import folder_paths
    from comfy_extras.nodes_model_merging import ModelSave

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    with pytest.raises(comfy["error"], match="cannot be saved as a single-file checkpoint"):
        call(ModelSave, model=comfy["model"], filename_prefix="diffusion_models/ovis")
    assert not [f for f in tmp_path.rglob("*") if f.is_file()]


def test_flow_model_sampling_nodes_work(comfy):
    p, positive, middle, negative, latent = t2i_inputs(comfy)
    (sd3,) = call(comfy["advanced"].ModelSamplingSD3, model=comfy["model"], shift=1.0)
    image = decode(comfy, mmdit_sampler(comfy, p, positive, negative, latent, model=sd3))
    official = tensors("t2i")["output_image_uint8"].numpy().astype(int)
    # the same flow time (σ, not 1000·σ); only the official bf16 rounding of the noise is ComfyUI's fp32 draw here
    assert np.abs(uint8(image[0]).astype(int) - official).mean() < 2.0


def test_a_non_flow_model_sampling_is_refused(comfy):
    p, positive, middle, negative, latent = t2i_inputs(comfy)
    (eps,) = call(comfy["advanced"].ModelSamplingDiscrete, model=comfy["model"], sampling="eps", zsnr=False)
    with pytest.raises(comfy["error"], match="not flow matching"):
        mmdit_sampler(comfy, p, positive, negative, latent, model=eps)


# ------------------------------------------------------------------------------- the rest of the ecosystem
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "res_multistep"])
def test_other_samplers(comfy, sampler):
    p, positive, middle, negative, latent = t2i_inputs(comfy)
    (guider,) = call(comfy["custom"].CFGGuider, model=comfy["model"], positive=positive, negative=negative,
                     cfg=p["txt_cfg"])
    assert_sane(decode(comfy, sample_custom(comfy, guider, latent, scheduler(comfy, p, latent), p["seed"], sampler)))


def test_ksampler_with_its_own_scheduler(comfy):
    p, positive, middle, negative, latent = t2i_inputs(comfy)
    (out,) = call(comfy["core"].KSampler, model=comfy["model"], seed=p["seed"], steps=4, cfg=p["txt_cfg"],
                  sampler_name="euler", scheduler="simple", positive=positive, negative=negative, latent_image=latent,
                  denoise=1.0)
    assert_sane(decode(comfy, out))


def test_batch_of_two_gives_two_images_the_first_as_its_single_run(comfy):
    p, positive, middle, negative, latent = t2i_inputs(comfy, batch=2)
    images = decode(comfy, mmdit_sampler(comfy, p, positive, negative, latent))
    assert images.shape[0] == 2 and not torch.equal(images[0], images[1])
    # ComfyUI draws the batch's noise in one call, so the first image is the single run of the seed
    assert_official(images[:1], "t2i")


def test_img2img_at_denoise_0_6_on_a_vae_encoded_image(comfy):
    p, positive, middle, negative, latent = t2i_inputs(comfy)
    source = decode(comfy, mmdit_sampler(comfy, p, positive, negative, latent, seed=p["seed"] + 1))
    (encoded,) = call(comfy["core"].VAEEncode, pixels=source, vae=comfy["vae"])
    (out,) = call(comfy["core"].KSampler, model=comfy["model"], seed=p["seed"], steps=5, cfg=p["txt_cfg"],
                  sampler_name="euler", scheduler="simple", positive=positive, negative=negative,
                  latent_image=encoded, denoise=0.6)
    assert_sane(decode(comfy, out))
    (guider,) = call(comfy["custom"].CFGGuider, model=comfy["model"], positive=positive, negative=negative,
                     cfg=p["txt_cfg"])
    sigmas = scheduler(comfy, p, encoded, denoise=0.6)
    assert_sane(decode(comfy, sample_custom(comfy, guider, encoded, sigmas, p["seed"])))


@pytest.mark.parametrize("cache", ["EasyCacheNode", "LazyCacheNode"])
def test_caches_and_tiled_decode(comfy, caplog, cache):
    p, positive, middle, negative, latent = edit_inputs(comfy)
    (cached,) = call(getattr(comfy["easycache"], cache), model=comfy["model"], reuse_threshold=0.2,
                     start_percent=0.15, end_percent=0.95, verbose=False)
    with caplog.at_level(logging.INFO):
        out = mmdit_sampler(comfy, p, positive, negative, latent, model=cached, middle=middle, steps=16)
    # the cache reaches the MMDiT: it skipped steps (its own summary line: "EasyCache - skipped N/M steps")
    found = re.findall(r"skipped (\d+)/(\d+) steps", caplog.text)
    assert found and int(found[-1][0]) > 0, f"{cache} skipped no step: {caplog.text[-2000:]}"
    (tiled,) = call(comfy["core"].VAEDecodeTiled, samples=out, vae=comfy["vae"], tile_size=64, overlap=16,
                    temporal_size=64, temporal_overlap=8)
    assert_sane(tiled)
    assert tiled.shape == decode(comfy, out).shape
