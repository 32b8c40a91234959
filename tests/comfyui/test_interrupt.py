"""Inside a real ComfyUI (in this process, ``--cpu``): the user's Cancel reaches the pack's own norm layers as it
reaches ComfyUI's own layers (issue 22 item 7).

ComfyUI ≥ 0.18 checks for a pending interrupt at the start of every layer's forward (comfy/ops.py: ``run_every_op``
→ ``comfy.model_management.throw_exception_if_processing_interrupted``), so Cancel stops a long LLM, visual-encoder or
VAE pass within one layer. The pack's RMSNorm (LLM, visual encoder) and GroupNorm (VAE) are ComfyUI's layers joined
with the pack's own forward (``ovis_u1.operations.namespace_layer``); that forward must make the same check.
ComfyUI 0.3.64 has no per-op check: there neither its own layers nor the pack's raise, and the test asserts that.

Run: COMFYUI_PATH=~/.cache/comfy-0.33.0/ComfyUI ~/.cache/comfy-0.33.0/venv/bin/python -m pytest
tests/comfyui/test_interrupt.py (and the same for 0.18.1 and 0.3.64; OVIS_U1_LAZY_LAYERS=1 for lazy layers).
"""

from __future__ import annotations

import pytest
import torch

from tests.comfyui.test_memory import COMFYUI_PATH, library, pack, parts, ready, run_part  # noqa: F401 (pack: fixture)
from tests.golden import requires_golden

pytestmark = [
    requires_golden,
    pytest.mark.skipif(not COMFYUI_PATH, reason="in-ComfyUI tests need COMFYUI_PATH=/path/to/ComfyUI and a Python "
                                               "with ComfyUI's requirements"),
]

# The OvisU1 module's parts holding the pack's own norms, and the patcher that loads each (test_memory.PARTS).
PART_PATCHER = {"llm": "llm", "visual_tokenizer": "llm", "vae": "vae"}


def own_norm_classes(pack) -> tuple[type, ...]:
    lib = library(pack)
    return lib.llm.RMSNorm, lib.vision.RMSNorm, lib.vae.GroupNorm32


def first_own_norm(part: torch.nn.Module, own: tuple[type, ...]) -> torch.nn.Module:
    return next(m for m in part.modules() if isinstance(m, own))


def first_comfy_layer(part: torch.nn.Module, own: tuple[type, ...]) -> torch.nn.Module:
    """A layer of the part that is ComfyUI's alone (a Linear or Conv2d of comfy.ops)."""
    return next(m for m in part.modules() if hasattr(m, "comfy_cast_weights") and not isinstance(m, own)
                and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))


def example_input(layer: torch.nn.Module) -> torch.Tensor:
    """A small input the layer accepts, in the dtype of its weights that are not fp8 (the loader's fp32 here)."""
    generator = torch.Generator().manual_seed(0)
    if isinstance(layer, torch.nn.RMSNorm):
        return torch.randn(3, *layer.normalized_shape, generator=generator)
    if isinstance(layer, torch.nn.GroupNorm):
        return torch.randn(1, layer.num_channels, 4, 4, generator=generator)
    if isinstance(layer, torch.nn.Linear):
        return torch.randn(3, layer.in_features, generator=generator)
    return torch.randn(1, layer.in_channels, *(2 * k for k in layer.kernel_size), generator=generator)


def raises_when_cancelled(forward) -> bool:
    """Whether ``forward()`` raises ComfyUI's InterruptProcessingException while a Cancel is pending; the pending
    Cancel is cleared afterwards whatever happened (ComfyUI clears it when it raises)."""
    import comfy.model_management as mm

    mm.interrupt_current_processing(True)
    try:
        forward()
    except mm.InterruptProcessingException:
        return True
    finally:
        mm.interrupt_current_processing(False)
    return False


@pytest.mark.parametrize("part", PART_PATCHER)
def test_cancel_stops_the_packs_norms_as_it_stops_comfyuis_layers(pack, part):
    import comfy.ops

    encoder, patchers = parts(pack)
    ovis = ready(encoder, patchers, PART_PATCHER[part])
    own = own_norm_classes(pack)
    module = getattr(ovis, part)
    norm, core = first_own_norm(module, own), first_comfy_layer(module, own)
    x = example_input(norm)
    with torch.no_grad():
        before = norm(x)
        per_op_check = hasattr(comfy.ops, "run_every_op")  # ComfyUI ≥ 0.18; 0.3.64 checks between steps only
        assert raises_when_cancelled(lambda: core(example_input(core))) == per_op_check, "ComfyUI's own layer"
        assert raises_when_cancelled(lambda: norm(x)) == per_op_check, (
            f"{part}: the pack's {type(norm).__name__} {'ignores' if per_op_check else 'makes'} the per-op "
            f"interrupt check that ComfyUI's {type(core).__name__} {'makes' if per_op_check else 'does not make'}")
        assert torch.equal(norm(x), before), "the norm computes as before once the Cancel is cleared"
        out = run_part(pack, ovis, PART_PATCHER[part])
    assert torch.isfinite(out).all()
