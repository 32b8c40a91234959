"""Inside a real ComfyUI (imported in this process, ``--cpu``), the branches a GPU that computes in fp8 takes (issue 22,
items 2 and 3): ComfyUI's fp8 matmul reaches the MMDiT and never the encoder parts, and a generated token converts
each fp8 weight of the LLM once and no table.

On a CPU ``comfy.ops.pick_operations`` never hands out its fp8 matmul (``fp8_ops``): it needs
``comfy.model_management.supports_fp8_compute`` (true on Ada/Hopper/Blackwell cards, or with ComfyUI's own
``--supports-fp8-compute`` flag, which model management reads into ``SUPPORT_FP8_OPS`` at import) and ``--fast
fp8_matrix_mult`` (``args.fast``). Both are set here as a user of such a card has them, and ``comfy.ops.fp8_linear``
is replaced by a spy that records every layer it would multiply in fp8 (weight stored in e4m3fn) and then declines,
so the layer takes the plain cast and the CPU computes as usual (ComfyUI falls back the same way when fp8_linear
returns None). The same in ComfyUI 0.3.64, 0.18.1 and 0.33.0 (each has ``fp8_ops``, ``disable_fast_fp8`` and the
flag), with ordinary and lazily built layers.
"""

from __future__ import annotations

import sys

import pytest
import torch

from tests.comfyui.test_memory import COMFYUI_PATH, load, pack, ready, run_part  # noqa: F401  (pack: the fixture)
from tests.golden import requires_golden

pytestmark = [
    requires_golden,
    pytest.mark.skipif(not COMFYUI_PATH, reason="in-ComfyUI tests need COMFYUI_PATH=/path/to/ComfyUI and a Python "
                                               "with ComfyUI's requirements"),
]

ENCODER_PARTS = ("llm.", "visual_tokenizer.", "vte")


@pytest.fixture
def fast_fp8(pack, monkeypatch):  # noqa: F811
    """``--supports-fp8-compute`` and ``--fast fp8_matrix_mult``, as on a card that computes in fp8."""
    import comfy.model_management as mm
    import comfy.ops
    from comfy.cli_args import PerformanceFeature, args

    monkeypatch.setattr(mm, "SUPPORT_FP8_OPS", True)
    monkeypatch.setattr(args, "fast", set(args.fast) | {PerformanceFeature.Fp8MatrixMultiplication})
    device = mm.get_torch_device()
    assert comfy.ops.pick_operations(torch.float8_e4m3fn, torch.bfloat16, load_device=device) is comfy.ops.fp8_ops


@pytest.fixture
def fp8_matmuls(monkeypatch):
    """The layers ComfyUI's fp8 matmul takes (in call order), through a spy on ``comfy.ops.fp8_linear``."""
    import comfy.ops

    taken = []

    def spy(layer, input):
        if layer.weight.dtype == torch.float8_e4m3fn:  # what fp8_linear multiplies in fp8; it declines the rest
            taken.append(layer)
        return None

    monkeypatch.setattr(comfy.ops, "fp8_linear", spy)
    return taken


def module_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def fp8_linears(model: torch.nn.Module, prefix: str) -> set[str]:
    return {n for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, torch.nn.Linear)
            and m.weight is not None and m.weight.dtype == torch.float8_e4m3fn}


def test_the_fp8_matmul_takes_the_mmdit_and_never_the_encoder(pack, fast_fp8, fp8_matmuls):  # noqa: F811
    import comfy.ops

    from tests.comfyui.test_memory import library

    encoder, model, vae = load(pack, dtype="bf16", weight_dtype="fp8_e4m3fn")
    patchers = {"llm": encoder.patcher, "mmdit": model, "vae": vae.patcher}
    ovis = encoder.model
    run_part(pack, ready(encoder, patchers, "llm"), "llm")  # the LLM, the visual encoder and the embedding table
    ovis.understand(None, "What is this?", max_new_tokens=2)  # generated tokens
    in_encoder = {module_names(ovis)[id(m)] for m in fp8_matmuls}
    assert not in_encoder, f"ComfyUI's fp8 matmul took encoder layers: {sorted(in_encoder)[:5]}"
    for name, module in ovis.named_modules():
        if name.startswith(ENCODER_PARTS) and isinstance(module, torch.nn.Linear):
            assert not isinstance(module, comfy.ops.fp8_ops.Linear), name
            assert module.weight.dtype == torch.float8_e4m3fn, name  # fp8 storage stays

    run_part(pack, ready(encoder, patchers, "mmdit"), "mmdit")  # refiner + sampling
    taken = {module_names(ovis)[id(m)] for m in fp8_matmuls}
    kept_out = {key.removesuffix(".weight") for key in library(pack).model.FP8_KEPT_OUT}
    assert taken == fp8_linears(ovis, "visual_generator.backbone."), "the MMDiT's fp8 matrices take the fp8 matmul"
    assert taken and not taken & kept_out


@pytest.fixture
def conversions(monkeypatch):
    """(layer, bytes) of every weight ComfyUI's cast hands out in another dtype than it is stored in, through a spy
    on ``comfy.ops.cast_bias_weight`` (the cast of every comfy.ops layer and of the pack's reads outside them)."""
    import comfy.ops

    converted = []
    cast = comfy.ops.cast_bias_weight

    def counting(layer, *args, **kwargs):
        out = cast(layer, *args, **kwargs)
        if out[0] is not None and out[0].dtype != layer.weight.dtype:
            converted.append((layer, out[0].nbytes))
        return out

    monkeypatch.setattr(comfy.ops, "cast_bias_weight", counting)
    return converted


def test_a_generated_token_converts_each_fp8_weight_once_and_no_table(pack, conversions):  # noqa: F811
    encoder, _, _ = load(pack, dtype="bf16", weight_dtype="fp8_e4m3fn")
    ovis = encoder.load()
    llm = ovis.llm
    generate = sys.modules[f"{pack.__name__}.ovis_u1.llm"].generate
    with torch.inference_mode():
        embeds = llm.get_input_embeddings()(torch.arange(12, device=llm.model.norm.weight.device))
    marks = {}
    generate(llm, embeds, None, 3, on_token=lambda i, n: marks.setdefault(i, len(conversions)))
    step = conversions[marks[2]:marks[3]]  # the third token's step: its input's lookup, the layers, the head
    names = module_names(llm)
    converted = [names[id(layer)] for layer, _ in step]
    assert "model.embed_tokens" not in converted, "the token table was converted for a generated token"
    assert sorted(converted) == sorted(fp8_linears(llm, "model.")), "each fp8 matrix of the LLM is converted once"
