"""Inside a real ComfyUI (in this process, ``--cpu``): LoRAs on Ovis-U1's MMDiT through core's LoraLoaderModelOnly.

A synthetic LoRA (random rank-4 factors on a double block's image qkv, a single block's linear2, a token-refiner MLP
layer of ``txt_in`` and ``final_layer.linear``) is saved as .safetensors in a ``loras`` folder registered with
folder_paths, in each layout trainers write (nodes/comfy_bridge/lora.py). Loaded with strength s by core's
LoraLoaderModelOnly, the pack's MMDiT Sampler gives the latent of a freshly loaded MODEL whose weights were merged by
hand, W + s·(alpha/rank)·B·A (alpha/rank = 1 without alpha), and not the latent of the MODEL without it. A LoRA that
matches no MMDiT layer is an error on the node; other models keep core's key table.

Run: COMFYUI_PATH=~/.cache/comfy-0.33.0/ComfyUI ~/.cache/comfy-0.33.0/venv/bin/python -m pytest tests/comfyui/test_lora.py
(and the same for 0.3.64 and 0.18.1; OVIS_U1_LAZY_LAYERS=1 for lazy layers); skipped without COMFYUI_PATH.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from tests.comfyui.test_generation import (  # noqa: F401  (comfy: the module's loaded ComfyUI + pack fixture)
    call, comfy, mmdit_sampler, pack_node, t2i_inputs)
from tests.comfyui import layers
from tests.comfyui.test_memory import COMFYUI_PATH, load
from tests.golden import requires_golden

pytestmark = [
    requires_golden,
    pytest.mark.skipif(not COMFYUI_PATH, reason="in-ComfyUI tests need COMFYUI_PATH=/path/to/ComfyUI and a Python "
                                               "with ComfyUI's requirements"),
]

LAYERS = ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear2",
          "txt_in.individual_token_refiner.blocks.0.mlp.fc1", "final_layer.linear")
RANK = 4
ALPHA = 8.0  # alpha/rank = 2 where a layout stores alpha
STRENGTH = 0.7
STEPS = 6
OFFICIAL = "visual_generator.backbone."


def peft(prefix):
    """PEFT's lora_A [rank, in] / lora_B [out, rank], no alpha (scale 1)."""
    def write(layer, a, b):
        return {f"{prefix}{layer}.lora_A.weight": a, f"{prefix}{layer}.lora_B.weight": b}
    return write


def down_up(prefix, alpha: float | None = ALPHA, underscores: bool = False):
    """lora_down / lora_up (+ alpha); up is stored divided by alpha/rank so that every layout means the same delta."""
    def write(layer, a, b):
        name = prefix + (layer.replace(".", "_") if underscores else layer)
        scale = 1.0 if alpha is None else alpha / RANK
        out = {f"{name}.lora_down.weight": a, f"{name}.lora_up.weight": b / scale}
        if alpha is not None:
            out[f"{name}.alpha"] = torch.tensor(alpha)
        return out
    return write


LAYOUTS = {
    "official_peft": peft(OFFICIAL),
    "official_down_up_alpha": down_up(OFFICIAL),
    "peft_whole_model": peft("base_model.model." + OFFICIAL),
    "peft_mmdit": peft("base_model.model."),
    "diffusers_transformer": peft("transformer."),
    "bare_names": peft(""),
    "comfyui_diffusion_model": down_up("diffusion_model.", alpha=None),
    "kohya_lora_unet": down_up("lora_unet_", underscores=True),
}


def factors(mmdit) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A [rank, in], B [out, rank]) per layer, seeded, large enough to move the sample visibly."""
    g = torch.Generator().manual_seed(7)
    out = {}
    for layer in LAYERS:
        rows, cols = mmdit.get_submodule(layer).weight.shape
        out[layer] = (torch.randn(RANK, cols, generator=g) * 0.2, torch.randn(rows, RANK, generator=g) * 0.2)
    return out


@pytest.fixture(scope="module")
def loras(comfy, tmp_path_factory):
    """The LoRA in every layout, in a registered ``loras`` folder: {layout: file name}."""
    import folder_paths

    folder = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("loras", str(folder))
    lora = factors(comfy["model"].model.diffusion_model)
    names = {}
    for layout, write in LAYOUTS.items():
        tensors = {}
        for layer, (a, b) in lora.items():
            tensors.update({k: v.contiguous() for k, v in write(layer, a, b).items()})
        names[layout] = f"ovis_u1_test_{layout}.safetensors"
        save_file(tensors, str(folder / names[layout]))
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(RANK, 768),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(3072, RANK),
               "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.randn(RANK, 320),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.randn(320, RANK)},
              str(folder / "sdxl_lora.safetensors"))
    return dict(names=names, factors=lora, folder=folder)


@pytest.fixture(scope="module", autouse=True)
def _lora_files_readable_with_lazy_layers(comfy):
    """With OVIS_U1_LAZY_LAYERS=1 the Dynamic VRAM flag is set by hand (tests/comfyui/layers.py), and ComfyUI ≥ 0.18
    then reads every .safetensors through comfy-aimdo's mmap (``comfy.utils.load_torch_file``), which a CPU cannot
    initialise: the flag is lifted while LoraLoaderModelOnly reads the file, not while the LoRA is applied."""
    if not layers.LAZY:  # (and 0.3.64 has no comfy.memory_management)
        yield
        return
    import comfy.memory_management as memory_management
    import comfy.utils as comfy_utils

    original = comfy_utils.load_torch_file

    def load_torch_file(*args, **kwargs):
        memory_management.aimdo_enabled = False
        try:
            return original(*args, **kwargs)
        finally:
            memory_management.aimdo_enabled = True

    comfy_utils.load_torch_file = load_torch_file
    try:
        yield
    finally:
        comfy_utils.load_torch_file = original


def with_lora(model, name, strength=STRENGTH):
    import nodes as core

    (patched,) = call(core.LoraLoaderModelOnly, model=model, lora_name=name, strength_model=strength)
    return patched


@pytest.fixture(scope="module")
def reference(comfy, loras):
    """The t2i inputs; the latent of the MODEL without the LoRA; a fresh MODEL merged by hand and its latent."""
    p, positive, middle, negative, latent = t2i_inputs(comfy)
    shared = comfy["model"].model.diffusion_model
    before = {layer: shared.get_submodule(layer).weight.detach().clone() for layer in LAYERS}
    base = mmdit_sampler(comfy, p, positive, negative, latent, steps=STEPS)["samples"]

    _, merged_model, _ = load(comfy["pack"])  # its own weights: the shared MODEL stays as loaded
    merged = merged_model.model.diffusion_model
    assert merged is not shared
    with torch.no_grad():
        for layer, (a, b) in loras["factors"].items():
            weight = merged.get_submodule(layer).weight
            weight.data = weight.data + STRENGTH * (b @ a).to(weight.dtype)  # a new tensor, not the loaded one
    expected = mmdit_sampler(comfy, p, positive, negative, latent, model=merged_model, steps=STEPS)["samples"]
    return dict(p=p, positive=positive, negative=negative, latent=latent, base=base, merged_model=merged_model,
                expected=expected, before=before)


def assert_same_latent(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ layouts load
def test_the_merged_reference_differs_from_the_model_without_lora(reference):
    assert (reference["expected"] - reference["base"]).abs().max() > 1e-2


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lora_layout_samples_as_the_merged_model(comfy, loras, reference, layout):
    r = reference
    model = with_lora(comfy["model"], loras["names"][layout])
    patched = {key.rsplit(".", 1)[0][len("diffusion_model."):] for key in model.patches}
    assert patched == set(LAYERS), f"{layout}: patched {sorted(patched)}"
    out = mmdit_sampler(comfy, r["p"], r["positive"], r["negative"], r["latent"], model=model, steps=STEPS)
    assert not torch.allclose(out["samples"], r["base"], atol=1e-3), "the MMDiT Sampler did not see the LoRA"
    assert_same_latent(out["samples"], r["expected"])


def test_the_refiner_node_sees_the_lora(comfy, loras, reference):
    r = reference
    model = with_lora(comfy["model"], loras["names"]["official_peft"])
    lora = pack_node(comfy, "OvisU1Refiner", model=model, positive=r["positive"], negative=r["negative"])
    merged = pack_node(comfy, "OvisU1Refiner", model=r["merged_model"], positive=r["positive"],
                       negative=r["negative"])
    plain = pack_node(comfy, "OvisU1Refiner", model=comfy["model"], positive=r["positive"], negative=r["negative"])
    torch.testing.assert_close(lora[0][0][0], merged[0][0][0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(lora[0][0][0], plain[0][0][0], atol=1e-4)


def test_strength_zero_and_negative(comfy, loras, reference):
    r = reference
    name = loras["names"]["official_peft"]
    same = with_lora(comfy["model"], name, strength=0.0)
    out = mmdit_sampler(comfy, r["p"], r["positive"], r["negative"], r["latent"], model=same, steps=STEPS)
    assert_same_latent(out["samples"], r["base"])
    # −s then +s (two LoraLoaderModelOnly in a chain) cancel
    chained = with_lora(with_lora(comfy["model"], name, strength=-STRENGTH), name, strength=STRENGTH)
    out = mmdit_sampler(comfy, r["p"], r["positive"], r["negative"], r["latent"], model=chained, steps=STEPS)
    assert_same_latent(out["samples"], r["base"])


# -------------------------------------------------------------------------------------- refusal, delegation
def test_a_lora_of_another_model_is_an_error_naming_its_keys(comfy, loras):
    with pytest.raises(comfy["error"], match=r"matches no layer of Ovis-U1's MMDiT .*'lora_te1_text_model.*"
                                             r"Accepted: 'visual_generator\.backbone\.<layer>'"):
        with_lora(comfy["model"], "sdxl_lora.safetensors")


def test_core_key_table_is_unchanged_for_other_models_and_installed_once(comfy):
    import comfy.lora as core_lora

    bridge = sys.modules[f"{comfy['pack'].__name__}.nodes.comfy_bridge.lora"]
    wrapper = core_lora.model_lora_keys_unet
    loader = core_lora.load_lora
    assert bridge.install() and bridge.install()
    assert core_lora.model_lora_keys_unet is wrapper and core_lora.load_lora is loader
    assert not hasattr(wrapper.__wrapped__, bridge.MARK) and not hasattr(loader.__wrapped__, bridge.MARK)

    other = types.SimpleNamespace(state_dict=lambda: {"diffusion_model.blocks.0.attn.qkv.weight": torch.zeros(1)},
                                  model_config=types.SimpleNamespace(unet_config={}))
    assert wrapper(other, {}) == wrapper.__wrapped__(other, {})
    # a LoRA matching nothing of another model stays core's console warning
    assert loader({"foo.lora_A.weight": torch.zeros(1, 1)}, wrapper(other, {})) == {}


def test_the_shared_model_is_unchanged(comfy, reference):
    import comfy.model_management as mm

    mm.unload_all_models()  # core restores the weights it patched in place
    shared = comfy["model"].model.diffusion_model
    for layer, weight in reference["before"].items():
        assert torch.equal(shared.get_submodule(layer).weight, weight), layer
