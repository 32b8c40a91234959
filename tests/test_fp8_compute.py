"""fp8 storage under ComfyUI's fp8 matmul (issue 15 item 6).

With ``--fast`` ComfyUI multiplies every Linear whose weight is stored in float8_e4m3fn in fp8, its input rounded to
e4m3 and clamped to ±448 (``comfy.ops.fp8_linear``). ``bench/bench_memory.py`` emulates that on the CPU; the layers
whose inputs do not survive it are kept out of fp8 storage (``ovis_u1.model.FP8_KEPT_OUT``), so the fp8 matmul never
takes them.

* The emulation equals the CPU's own ``torch._scaled_mm`` (scale 1, fp32 accumulation), and clamps the caller's
  input in place, as ComfyUI's does.
* The kept-out matrices stay in the compute dtype after ``load_model(..., weight_dtype="fp8_e4m3fn")``; every other
  matrix fp8 storage reaches is fp8.
* On the tiny model, the emulated fast path deviates less from bf16 weights with them kept out than without.
"""

from __future__ import annotations

import pytest
import torch

import ovis_u1
from bench.bench_memory import (FP8_INPUT_LIMIT, deviation, fast_fp8_operations, fp8_keep_out, load_fast_fp8,
                                run_t2i)
from ovis_u1.config import load_params
from ovis_u1.model import FP8_KEPT_OUT, architecture_shapes, fp8_keys
from tests.golden import CHECKPOINT, requires_golden


def _scaled_mm_available() -> bool:
    one = torch.ones((), dtype=torch.float32)
    a = torch.zeros(16, 16, dtype=torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.skipif(not _scaled_mm_available(), reason="this torch has no CPU torch._scaled_mm for float8_e4m3fn")
def test_the_emulated_fp8_matmul_equals_torch_scaled_mm():
    torch.manual_seed(0)
    layer = fast_fp8_operations().Linear(64, 48)
    layer.weight.data = (torch.randn(48, 64) * 0.2).to(torch.float8_e4m3fn)
    layer.bias.data = torch.randn(48).to(torch.bfloat16)
    x = (torch.randn(2, 37, 64) * 200).to(torch.bfloat16)  # some values beyond ±448
    assert (x.abs() > FP8_INPUT_LIMIT).any()
    kept = x.clone()
    with torch.inference_mode():
        out = layer(x)

    one = torch.ones((), dtype=torch.float32)
    clamped = kept.clamp(-FP8_INPUT_LIMIT, FP8_INPUT_LIMIT).reshape(-1, 64)
    expected = torch._scaled_mm(clamped.to(torch.float8_e4m3fn), layer.weight.t(), scale_a=one, scale_b=one,
                                bias=layer.bias, out_dtype=torch.bfloat16).reshape(2, 37, 48)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    assert torch.equal(x, kept.clamp(-FP8_INPUT_LIMIT, FP8_INPUT_LIMIT))  # ComfyUI clamps the caller's tensor


def test_layers_without_an_e4m3fn_weight_take_the_plain_cast():
    torch.manual_seed(0)
    layer = fast_fp8_operations().Linear(16, 8)
    layer.weight.data = layer.weight.data.to(torch.bfloat16)
    layer.bias.data = layer.bias.data.to(torch.bfloat16)
    x = (torch.randn(3, 16) * 1000).to(torch.bfloat16)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    layer.weight.data = layer.weight.data.to(torch.float8_e5m2)  # fp8_linear takes only e4m3fn
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight.to(x.dtype), layer.bias))


@requires_golden
def test_the_kept_out_matrices_stay_in_the_compute_dtype():
    shapes = architecture_shapes(load_params(CHECKPOINT))
    model = ovis_u1.load_model(CHECKPOINT, device="cpu", dtype=torch.bfloat16, weight_dtype="fp8_e4m3fn")
    state = model.state_dict()
    assert FP8_KEPT_OUT and set(FP8_KEPT_OUT) <= set(state), "FP8_KEPT_OUT names keys the model does not have"
    for key in FP8_KEPT_OUT:
        assert state[key].dtype == torch.bfloat16, f"{key} is stored in {state[key].dtype}"
    stored = {k for k, v in state.items() if v.dtype == torch.float8_e4m3fn}
    assert stored == fp8_keys(model)
    with fp8_keep_out(False):
        everything = fp8_keys(model)
    assert everything - stored == set(FP8_KEPT_OUT)
    assert fp8_keys(model, shapes) == stored  # lazily built layers: the keys come from the architecture's shapes


@requires_golden
def test_the_encoder_parts_are_built_from_their_own_operations():
    """A host's namespace with the fp8 matmul (here the emulated ``--fast`` one) builds the MMDiT; the LLM, the visual
    encoder and the visual embedding table come from ``encoder_operations`` (here the pack's manual cast), as the
    ComfyUI bridge builds them: their inputs never pass through the fp8 matmul, their fp8 storage stays."""
    from ovis_u1.operations import manual_cast

    fast = fast_fp8_operations()
    model = ovis_u1.load_model(CHECKPOINT, device="cpu", dtype=torch.bfloat16, weight_dtype="fp8_e4m3fn",
                               operations=fast, encoder_operations=manual_cast)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears
    for name, layer in linears.items():
        assert isinstance(layer, fast.Linear) == name.startswith("visual_generator."), name
    stored = {k for k, v in model.state_dict().items() if v.dtype == torch.float8_e4m3fn}
    assert stored == fp8_keys(model) and any(k.startswith("llm.") for k in stored)


@requires_golden
def test_keeping_them_out_brings_the_fast_path_closer_to_bf16():
    size, steps = 256, 4  # the README's measurement (bench/bench_memory.py --quality)
    reference = run_t2i(ovis_u1.load_model(CHECKPOINT, device="cpu", dtype=torch.bfloat16), size, steps)
    kept_out = deviation(run_t2i(load_fast_fp8(CHECKPOINT), size, steps), reference)
    all_fp8 = deviation(run_t2i(load_fast_fp8(CHECKPOINT, keep_out=False), size, steps), reference)
    assert kept_out["image_mean"] < all_fp8["image_mean"], (kept_out, all_fp8)
    assert kept_out["latent_max"] < all_fp8["latent_max"], (kept_out, all_fp8)
