"""Inside a real ComfyUI (in this process, ``--cpu``): scaled fp8 storage (``weight_dtype`` fp8_e4m3fn_scaled) runs
through ComfyUI's own quantized tensors, renders the goldens within the bound of tests/test_fp8_scaled.py, takes
ComfyUI's scaled fp8 matmul on the MMDiT only (``--fast`` on a card that computes in fp8, forced here as in
tests/comfyui/test_encoder_fp8.py), and takes a LoRA as the dequantized weights do.

ComfyUI 0.18.1 and 0.33.0 both have ``comfy.quant_ops`` (``QuantizedTensor``, ``TensorCoreFP8E4M3Layout``) and
``comfy.ops.mixed_precision_ops``, whose Linear reads the stored form itself; 0.33.0's Embedding does too, 0.18.1's
does not (the bridge wraps its weight, as it wraps the Conv2d's on both). Eager and lazy layers (OVIS_U1_LAZY_LAYERS=1).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from tests.comfyui.test_generation import comfy, decode, mmdit_sampler, t2i_inputs, uint8  # noqa: F401
from tests.comfyui.test_lora import (  # noqa: F401  (fixtures)
    LAYERS, STRENGTH, _lora_files_readable_with_lazy_layers, loras, with_lora)
from tests.comfyui.test_memory import COMFYUI_PATH, load
from tests.golden import requires_golden, tensors
from tests.test_fp8_scaled import MAX_BOUND, MEAN_BOUND

pytestmark = [
    requires_golden,
    pytest.mark.skipif(not COMFYUI_PATH, reason="in-ComfyUI tests need COMFYUI_PATH=/path/to/ComfyUI and a Python "
                                               "with ComfyUI's requirements"),
]

SCALED = "fp8_e4m3fn_scaled"
ENCODER_PARTS = ("llm.", "visual_tokenizer.", "vte.")
MMDIT = "visual_generator.backbone."


def library(comfy):  # noqa: F811
    return sys.modules[f"{comfy['pack'].__name__}.ovis_u1"]


def scaled_layers(ovis, library) -> dict[str, torch.nn.Module]:
    """The layers whose weight scaled fp8 stores (the same matrices as fp8: ``fp8_keys``)."""
    return {key.removesuffix(".weight"): ovis.get_submodule(key.removesuffix(".weight"))
            for key in library.model.fp8_keys(ovis, library.model.architecture_shapes(ovis.params))}


def test_every_scaled_matrix_is_a_comfyui_quantized_tensor_with_the_library_scale(comfy):  # noqa: F811
    import comfy.quant_ops as quant_ops

    lib = library(comfy)
    encoder, _, _ = load(comfy["pack"], dtype="bf16", weight_dtype=SCALED)
    ovis = encoder.model
    layers = scaled_layers(ovis, lib)
    assert any(n.startswith(MMDIT) for n in layers) and "vte" in layers
    for name, layer in layers.items():
        weight = layer.weight
        assert isinstance(weight, quant_ops.QuantizedTensor), name
        assert weight._layout_cls in ("TensorCoreFP8E4M3Layout", quant_ops.TensorCoreFP8E4M3Layout), name
        values, scale = weight._qdata, weight._params.scale
        assert values.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32, name
        mantissa, _ = torch.frexp(scale)
        assert (mantissa == 0.5).all() and values.float().abs().max() >= lib.fp8.FP8_MAX / 2, name
    others = [n for n, m in ovis.named_modules() if n not in layers
              and isinstance(getattr(m, "weight", None), quant_ops.QuantizedTensor)]
    assert not others, f"quantized outside the fp8 matrices: {others[:5]}"


def test_comfyui_counts_the_scaled_weights_as_fp8_bytes(comfy):  # noqa: F811
    """The patchers' sizes (what ComfyUI budgets memory by) are those of fp8 storage: a quantized tensor's
    ``element_size`` is that of the dtype it dequantizes to, its ``nbytes`` the stored bytes."""
    scaled_encoder, scaled_model, scaled_vae = load(comfy["pack"], dtype="bf16", weight_dtype=SCALED)
    encoder, model, vae = load(comfy["pack"], dtype="bf16", weight_dtype="fp8_e4m3fn")
    assert scaled_encoder.patcher.size == encoder.patcher.size
    assert scaled_model.size == model.size and scaled_vae.patcher.size == vae.patcher.size


@pytest.fixture(scope="module")
def scaled_fp32(comfy):  # noqa: F811
    """Scaled fp8 weights computed in fp32 (the golden bound's setting): (encoder, MODEL, VAE)."""
    return load(comfy["pack"], dtype="fp32", weight_dtype=SCALED)


def test_the_scaled_model_renders_the_golden_within_the_bound(comfy, scaled_fp32):  # noqa: F811
    encoder, model, vae = scaled_fp32
    inputs = dict(comfy, encoder=encoder, model=model, vae=vae)
    p, positive, middle, negative, latent = t2i_inputs(inputs)
    image = uint8(decode(inputs, mmdit_sampler(inputs, p, positive, negative, latent))[0])
    diff = np.abs(image.astype(np.int32) - tensors("t2i")["output_image_uint8"].numpy().astype(np.int32))
    assert diff.mean() <= MEAN_BOUND and diff.max() <= MAX_BOUND, f"|Δ| mean {diff.mean():.2f}, max {diff.max()}"


@pytest.fixture
def fast_fp8(monkeypatch):
    """``--supports-fp8-compute`` and ``--fast fp8_matrix_mult``, as on a card that computes in fp8."""
    import comfy.model_management as mm
    from comfy.cli_args import PerformanceFeature, args

    monkeypatch.setattr(mm, "SUPPORT_FP8_OPS", True)
    monkeypatch.setattr(args, "fast", set(args.fast) | {PerformanceFeature.Fp8MatrixMultiplication})


def quantized_matmuls(ovis, layers) -> list[str]:
    """Spies on each layer's matmul: the names of those that multiplied a quantized input (ComfyUI's fp8 matmul)."""
    import comfy.quant_ops as quant_ops

    taken = []
    for name, layer in layers.items():
        if hasattr(layer, "_forward"):
            def spy(input, weight, bias, name=name, forward=layer._forward):
                if isinstance(input, quant_ops.QuantizedTensor):
                    taken.append(name)
                return forward(input, weight, bias)

            layer._forward = spy
    return taken


def test_with_fast_the_mmdit_multiplies_in_scaled_fp8_and_the_encoder_never(comfy, fast_fp8):  # noqa: F811
    lib = library(comfy)
    encoder, model, vae = load(comfy["pack"], dtype="fp32", weight_dtype=SCALED)
    ovis = encoder.model
    layers = scaled_layers(ovis, lib)
    mmdit = {n for n in layers if n.startswith(MMDIT)}
    linears = {n: layer for n, layer in layers.items() if hasattr(layer, "_forward")}  # mixed_precision_ops' Linear
    others = {"vte", "visual_tokenizer.backbone.preprocessor.patchifier.proj"}  # an Embedding and a Conv2d
    assert mmdit <= set(linears) and set(layers) - set(linears) == others
    for name, layer in linears.items():
        assert layer._full_precision_mm is name.startswith(ENCODER_PARTS), name
    taken = quantized_matmuls(ovis, layers)
    inputs = dict(comfy, encoder=encoder, model=model, vae=vae)
    p, positive, middle, negative, latent = t2i_inputs(inputs)
    assert not taken, f"the encoder multiplied in fp8: {taken[:5]}"
    image = uint8(decode(inputs, mmdit_sampler(inputs, p, positive, negative, latent))[0])
    assert set(taken) == mmdit
    assert np.isfinite(image.astype(np.float32)).all() and image.std() > 0


def test_a_lora_on_the_scaled_mmdit_is_the_lora_on_its_dequantized_weights(comfy, loras):  # noqa: F811
    """LoraLoaderModelOnly on the scaled MODEL against a bf16-free reference: a MODEL whose weights are the
    dequantized scaled ones with the LoRA merged by hand. ComfyUI patches a quantized weight by dequantizing it,
    adding the LoRA and quantizing the sum again (``mixed_precision_ops`` Linear ``convert_weight`` / ``set_weight``,
    its scale recalculated): the 4 patched matrices are rounded to e4m3 once more, the rest is the same numbers. The
    bound: a tenth of what the LoRA itself moves the latent."""
    import comfy.quant_ops as quant_ops

    p, positive, middle, negative, latent = t2i_inputs(comfy)
    _, scaled_model, _ = load(comfy["pack"], dtype="fp32", weight_dtype=SCALED)
    scaled_mmdit = scaled_model.model.diffusion_model
    dequantized = {name: module.weight.dequantize().float() for name, module in scaled_mmdit.named_modules()
                   if isinstance(getattr(module, "weight", None), quant_ops.QuantizedTensor)}  # before any patch
    base = mmdit_sampler(comfy, p, positive, negative, latent, model=scaled_model)["samples"]
    lora = with_lora(scaled_model, loras["names"]["official_peft"])
    out = mmdit_sampler(comfy, p, positive, negative, latent, model=lora)["samples"]

    _, reference, _ = load(comfy["pack"], dtype="fp32")
    mmdit = reference.model.diffusion_model
    with torch.no_grad():
        for name, weight in dequantized.items():
            mmdit.get_submodule(name).weight.data = weight
        for layer, (a, b) in loras["factors"].items():
            w = mmdit.get_submodule(layer).weight
            w.data = w.data + STRENGTH * (b @ a)
    expected = mmdit_sampler(comfy, p, positive, negative, latent, model=reference)["samples"]
    effect = (expected - base).abs().max()
    assert effect > 1e-2
    assert (out - expected).abs().max() <= 0.1 * effect, f"{(out - expected).abs().max():.4f} vs effect {effect:.4f}"
