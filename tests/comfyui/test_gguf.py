"""Inside a real ComfyUI (in this process, ``--cpu``): a GGUF folder converted from the tiny golden checkpoint
(``python -m ovis_u1 quantize``, Q8_0) is listed and loaded by the Model Loader, renders the golden t2i within the
plain suite's bound, keeps its matrices as raw blocks under ComfyUI's patchers, and a LoRA on its MMDiT (core
LoraLoaderModelOnly) samples as the same LoRA merged by hand into the dequantized weights — both in a full load
(ComfyUI merges it: ``convert_weight`` / ``set_weight``) and in a partial load (the cast applies it after
dequantization).

Run: COMFYUI_PATH=~/.cache/comfy-0.33.0/ComfyUI ~/.cache/comfy-0.33.0/venv/bin/python -m pytest tests/comfyui/test_gguf.py
(and for 0.18.1; OVIS_U1_LAZY_LAYERS=1 for lazy layers); skipped without COMFYUI_PATH.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from safetensors.torch import save_file

from tests.comfyui.test_generation import call, comfy, mmdit_sampler, pack_node, t2i_inputs, decode, uint8  # noqa: F401
from tests.comfyui.test_lora import _lora_files_readable_with_lazy_layers, with_lora  # noqa: F401
from tests.comfyui.test_memory import COMFYUI_PATH
from tests.golden import CHECKPOINT, requires_golden, tensors
from tests.pack import node_classes
from tests.test_gguf import Q8_MAX_LEVELS, Q8_MEAN_LEVELS

pytestmark = [
    requires_golden,
    pytest.mark.skipif(not COMFYUI_PATH, reason="in-ComfyUI tests need COMFYUI_PATH=/path/to/ComfyUI and a Python "
                                               "with ComfyUI's requirements"),
]

NAME = "Ovis-U1-3B-Q8_0"
LAYER = "double_blocks.0.img_attn.qkv"  # quantized (FP8_KEPT_OUT keeps final_layer.linear out)
RANK, STRENGTH, STEPS = 4, 0.7, 3
# The LoRA merged by ComfyUI into the dequantized fp32 weight vs merged by hand: the same sums in another order.
LORA_ATOL = 1e-4


@pytest.fixture(scope="module")
def gguf(comfy, tmp_path_factory):
    """The converted folder in the registered models/ovis_u1, loaded by the Model Loader; and a LoRA file."""
    import folder_paths

    lib = importlib.import_module(f"{comfy['pack'].__name__}.ovis_u1")
    importlib.import_module(f"{lib.__name__}.quantize")
    root = tmp_path_factory.mktemp("gguf_models")
    folder_paths.add_model_folder_path("ovis_u1", str(root))
    lib.quantize.quantize(CHECKPOINT, root / NAME, "Q8_0", progress=False)
    encoder, model, vae = pack_node(comfy, "OvisU1ModelLoader", model=NAME, dtype="fp32", attention="auto")
    mmdit = model.model.diffusion_model
    g = torch.Generator().manual_seed(7)
    rows, cols = lib.gguf.quantization(mmdit.get_submodule(LAYER)).shape
    a, b = torch.randn(RANK, cols, generator=g) * 0.2, torch.randn(rows, RANK, generator=g) * 0.2
    loras = tmp_path_factory.mktemp("gguf_loras")
    folder_paths.add_model_folder_path("loras", str(loras))
    save_file({f"visual_generator.backbone.{LAYER}.lora_A.weight": a.contiguous(),
               f"visual_generator.backbone.{LAYER}.lora_B.weight": b.contiguous()}, str(loras / "gguf_lora.safetensors"))
    return dict(lib=lib, encoder=encoder, model=model, vae=vae, a=a, b=b)


def _with(comfy, gguf) -> dict:
    return {**comfy, "encoder": gguf["encoder"], "model": gguf["model"], "vae": gguf["vae"]}


def test_the_loader_lists_the_gguf_folder(comfy, gguf):
    options = node_classes(comfy["pack"])["OvisU1ModelLoader"].INPUT_TYPES()["required"]["model"][1]["options"]
    assert NAME in options


def test_weights_stay_quantized_under_comfyui(gguf):
    mmdit = gguf["model"].model.diffusion_model
    layer = mmdit.get_submodule(LAYER)
    assert layer.weight.dtype == torch.uint8 and gguf["lib"].gguf.quantization(layer) is not None
    assert gguf["encoder"].patcher.model_size() < sum(p.numel() * 4 for p in gguf["encoder"].model.llm.parameters()
                                                      if p.is_floating_point()) + gguf["encoder"].patcher.model_size()


def test_t2i_through_the_pack_nodes_is_within_the_bound(comfy, gguf):
    c = _with(comfy, gguf)
    p, positive, middle, negative, latent = t2i_inputs(c)
    image = decode(c, mmdit_sampler(c, p, positive, negative, latent))
    diff = (torch.from_numpy(uint8(image[0])).int() - tensors("t2i")["output_image_uint8"].int()).abs().float()
    assert diff.mean() <= Q8_MEAN_LEVELS and diff.max() <= Q8_MAX_LEVELS, f"{diff.mean():.2f} / {diff.max():.0f}"


def _sample(comfy, gguf, model=None):
    """The MMDiT Sampler on the golden t2i condition (the pack's nodes)."""
    c = _with(comfy, gguf)
    p, positive, middle, negative, latent = t2i_inputs(c)
    return mmdit_sampler(c, p, positive, negative, latent, model=model, steps=STEPS)["samples"]


def _merged_by_hand(comfy, gguf):
    """The same MODEL with the layer's dequantized weight + s·B·A as a plain dense weight."""
    layer = gguf["model"].model.diffusion_model.get_submodule(LAYER)
    dense = gguf["lib"].gguf.dequantized(layer, layer.weight, torch.float32) + STRENGTH * (gguf["b"] @ gguf["a"])
    raw = layer.weight
    try:
        layer.weight = torch.nn.Parameter(dense, requires_grad=False)
        return _sample(comfy, gguf)
    finally:
        layer.weight = raw


def test_lora_on_the_gguf_mmdit_merged_by_comfyui_equals_the_lora_on_its_dequantized_weights(comfy, gguf):
    """A full load: ComfyUI's patcher merges the LoRA through the layer's convert_weight / set_weight."""
    base = _sample(comfy, gguf)
    lora = _sample(comfy, gguf, with_lora(gguf["model"], "gguf_lora.safetensors"))
    again = _sample(comfy, gguf)  # loading the MODEL without the LoRA unpatches first: the blocks come back
    layer = gguf["model"].model.diffusion_model.get_submodule(LAYER)
    assert layer.weight.dtype == torch.uint8, "unpatching did not give the blocks back"
    assert torch.equal(again, base)
    merged = _merged_by_hand(comfy, gguf)
    assert (merged - base).abs().max() > 1e-2
    torch.testing.assert_close(lora, merged, rtol=LORA_ATOL, atol=LORA_ATOL)


def test_lora_on_a_partially_loaded_gguf_mmdit_is_applied_after_dequantization(comfy, gguf):
    """A partial load (lowvram): the LoRA stays a weight_function of the layer, applied in the cast to the dense
    weight."""
    import comfy.model_management as mm

    patched = with_lora(gguf["model"], "gguf_lora.safetensors")
    layer = patched.model.diffusion_model.get_submodule(LAYER)
    mm.unload_all_models()
    patched.patch_model(device_to=patched.load_device, lowvram_model_memory=1, load_weights=True)
    try:
        assert patched.model.model_lowvram and layer.weight_function and layer.weight.dtype == torch.uint8
        p = t2i_inputs(_with(comfy, gguf))[0]
        ovis = gguf["encoder"].model
        txt = {b: tensors("t2i")[f"{b}.txt"] for b in ("cond", "no_both")}
        refined = ovis.refine(gguf["lib"].Condition("t2i", p["width"], p["height"], txt))
        lora = ovis.sample(refined, p["width"], p["height"], steps=STEPS, txt_cfg=p["txt_cfg"], seed=p["seed"])
    finally:
        patched.unpatch_model(patched.offload_device)
    raw = layer.weight
    dense = gguf["lib"].gguf.dequantized(layer, raw, torch.float32) + STRENGTH * (gguf["b"] @ gguf["a"])
    try:
        layer.weight = torch.nn.Parameter(dense, requires_grad=False)
        merged = ovis.sample(refined, p["width"], p["height"], steps=STEPS, txt_cfg=p["txt_cfg"], seed=p["seed"])
    finally:
        layer.weight = raw
    torch.testing.assert_close(lora, merged, rtol=LORA_ATOL, atol=LORA_ATOL)
