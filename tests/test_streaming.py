"""Every weight read at compute time goes through the operations namespace's cast.

ComfyUI under Dynamic VRAM (and its lowvram path) keeps weights where only a layer's own cast reaches them and
streams them to the GPU layer by layer; a weight the library read directly (``layer.weight.to(x)``) would be copied
whole from host memory on every use, or not be there at all. Here a *sealed* namespace plays that memory manager on
the CPU: after loading, every parameter of the model is replaced by a meta tensor of its shape, and the real values
are reachable only through the namespace — its layers' own forwards, its ``cast_to`` (free parameters) and its
``cast_weights`` (a layer's weights read outside its forward). Any direct read fails (a meta tensor has no data).
Every part still computes exactly what the unsealed model computes.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from PIL import Image
from torch import nn

import ovis_u1
from ovis_u1 import llm as llm_module
from ovis_u1.operations import manual_cast
from tests.golden import CHECKPOINT, TINY_A, case_params, requires_golden

pytestmark = requires_golden

_REAL: dict[int, torch.Tensor] = {}  # id(sealed parameter) → its values


def _real(t: torch.Tensor) -> torch.Tensor:
    return _REAL.get(id(t), t)


@contextlib.contextmanager
def _revealed(layer: nn.Module):
    """The layer's own parameters hold their values for the duration of its forward (its own cast)."""
    sealed = {n: p for n, p in layer._parameters.items() if p is not None and id(p) in _REAL}
    for name, p in sealed.items():
        layer._parameters[name] = nn.Parameter(_REAL[id(p)], requires_grad=False)
    try:
        yield
    finally:
        layer._parameters.update(sealed)


def _sealed_layer(base: type) -> type:
    def forward(self, *args, **kwargs):
        with _revealed(self):
            return base.forward(self, *args, **kwargs)

    return type(f"Sealed{base.__name__}", (base,), {"forward": forward})


class Sealed:
    """The pack's manual-cast layers whose weights, once sealed, only the namespace reaches."""

    Linear = _sealed_layer(manual_cast.Linear)
    Conv2d = _sealed_layer(manual_cast.Conv2d)
    GroupNorm = _sealed_layer(manual_cast.GroupNorm)
    LayerNorm = _sealed_layer(manual_cast.LayerNorm)
    RMSNorm = _sealed_layer(manual_cast.RMSNorm)
    Embedding = _sealed_layer(manual_cast.Embedding)

    @staticmethod
    def cast_to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _real(t).to(device=like.device, dtype=like.dtype)

    @staticmethod
    @contextlib.contextmanager
    def cast_weights(layer: nn.Module, like: torch.Tensor):
        bias = getattr(layer, "bias", None)
        yield (_real(layer.weight).to(device=like.device, dtype=like.dtype),
               None if bias is None else _real(bias).to(device=like.device, dtype=like.dtype))


def seal(model: ovis_u1.OvisU1) -> None:
    """Replace every parameter by a meta tensor of its shape; the values stay reachable through Sealed only."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            stand_in = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            _REAL[id(stand_in)] = p.detach()
            module._parameters[name] = stand_in
    for part in (model.llm, model.visual_tokenizer, model.vte, model.mmdit, model.vae):
        part.execution_device = torch.device("cpu")  # as a memory manager says where a part computes


def run_every_part(model: ovis_u1.OvisU1) -> dict[str, object]:
    p = case_params("t2i")
    image = Image.open(TINY_A / "cases" / "edit" / "input.png")
    condition = model.encode_condition(p["prompt"], "t2i", width=p["width"], height=p["height"])
    latent = model.sample(model.refine(condition), p["width"], p["height"], steps=2, txt_cfg=p["txt_cfg"], seed=1)
    return {
        "answer": model.understand([image], "What is it?", max_new_tokens=4).token_ids,  # LLM, vision, tied head
        "condition": condition.branches["cond"],  # vision (+ pos_embed), indicator rows, LLM norms
        "latent": latent,  # refiner (cls_token), MMDiT (QK-norm scale)
        "decoded": model.vae_decode(latent),  # VAE GroupNorms
        "context": model.encode_context(image, seed=3).tokens,  # VAE encoder
    }


@pytest.fixture(scope="module")
def reference():
    model = ovis_u1.load_model(CHECKPOINT, device="cpu", dtype=torch.float32, operations=Sealed)
    return run_every_part(model)


def sealed_model() -> ovis_u1.OvisU1:
    model = ovis_u1.load_model(CHECKPOINT, device="cpu", dtype=torch.float32, operations=Sealed)
    seal(model)
    assert all(p.is_meta for p in model.parameters())
    return model


def test_every_part_reads_its_weights_only_through_the_namespace(reference):
    sealed = run_every_part(sealed_model())
    assert sealed["answer"] == reference["answer"]
    for key in ("condition", "latent", "decoded", "context"):
        assert torch.equal(sealed[key], reference[key]), key


def test_a_tied_head_reading_the_table_directly_fails(monkeypatch):
    """The check bites: the LM head as it was (``F.linear(x, table.to(x))``) cannot run once the table is sealed."""

    def direct(self, x):
        return torch.nn.functional.linear(x, self.weight.to(device=x.device, dtype=x.dtype))

    model = sealed_model()
    monkeypatch.setattr(llm_module.TiedLMHead, "forward", direct)
    with pytest.raises((RuntimeError, NotImplementedError)):
        model.understand([], "Hello?", max_new_tokens=2)
