"""Layers that are built without weights and fill themselves when loaded.

ComfyUI under Dynamic VRAM (its default on NVIDIA) builds ``comfy.ops`` Linear and Embedding layers that way: the
constructor leaves ``weight = None`` and only the layer's own ``_load_from_state_dict`` creates the parameter
(``comfy/ops.py``, ``disable_weight_init._lazy_load_from_state_dict``). The loader must take the expected keys from
the architecture, not from the layers, and hand every weight to its layer's loading hook. This namespace does what
ComfyUI's lazy layers do, without ComfyUI, so the plain suite covers it (tests/comfyui runs the real ones with
OVIS_U1_LAZY_LAYERS=1).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ovis_u1
from ovis_u1.model import OvisU1, fp8_keys
from ovis_u1.config import load_params
from ovis_u1.operations import manual_cast
from tests.golden import CHECKPOINT, assert_golden, case_params, requires_golden, tensors

pytestmark = requires_golden


def _fill_from_state_dict(layer, state_dict, prefix, missing_keys, unexpected_keys, wants_bias: bool) -> None:
    for key, value in state_dict.items():  # torch hands a leaf layer only the keys under its prefix
        name = key[len(prefix):]
        if name == "weight":
            layer.weight = nn.Parameter(value, requires_grad=False)
        elif name == "bias" and wants_bias:
            layer.bias = nn.Parameter(value, requires_grad=False)
        else:
            unexpected_keys.append(key)
    if layer.weight is None:
        missing_keys.append(prefix + "weight")


class Lazy(manual_cast):
    """The pack's manual cast with Linear and Embedding built as ComfyUI builds them under Dynamic VRAM."""

    class Linear(manual_cast.Linear):
        def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
            nn.Module.__init__(self)
            self.in_features, self.out_features, self.wants_bias = in_features, out_features, bias
            self.weight = None
            self.bias = None

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                  error_msgs):
            _fill_from_state_dict(self, state_dict, prefix, missing_keys, unexpected_keys, self.wants_bias)

    class Embedding(manual_cast.Embedding):
        def __init__(self, num_embeddings, embedding_dim, padding_idx=None, *args, **kwargs):
            nn.Module.__init__(self)
            self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
            self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse = None, 2.0, False, False
            self.weight = None

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                  error_msgs):
            _fill_from_state_dict(self, state_dict, prefix, missing_keys, unexpected_keys, False)


def _t2i_latent(model) -> torch.Tensor:
    p = case_params("t2i")
    refined = model.refine(model.encode_condition(p["prompt"], "t2i", width=p["width"], height=p["height"]))
    return model.sample(refined, p["width"], p["height"], steps=p["steps"], txt_cfg=p["txt_cfg"], seed=p["seed"])


def test_lazy_layers_hold_no_weight_before_loading():
    with torch.device("meta"):
        model = OvisU1(load_params(CHECKPOINT), operations=Lazy)
    assert model.llm.model.layers[0].mlp.gate_proj.weight is None and model.vte.weight is None
    assert not any(k.endswith("gate_proj.weight") for k in model.state_dict())  # what the old loader expected from


def test_lazy_layers_load_and_reproduce_the_golden_t2i():
    model = ovis_u1.load_model(CHECKPOINT, device="cpu", dtype=torch.float32, operations=Lazy)
    assert isinstance(model.mmdit.img_in, Lazy.Linear) and model.mmdit.img_in.weight is not None
    latent = _t2i_latent(model)
    assert_golden(latent, tensors("t2i")["vae_dec_input"], "vae_dec_input")
    assert torch.equal(latent, _t2i_latent(ovis_u1.load_model(CHECKPOINT, device="cpu", dtype=torch.float32)))


@pytest.mark.parametrize("weight_dtype", ["fp8_e4m3fn"])
def test_lazy_layers_store_fp8(weight_dtype):
    model = ovis_u1.load_model(CHECKPOINT, device="cpu", dtype=torch.bfloat16, operations=Lazy,
                               weight_dtype=weight_dtype)
    stored = {k for k, v in model.state_dict().items() if v.dtype == torch.float8_e4m3fn}
    assert stored and stored == fp8_keys(model)
    assert "visual_generator.backbone.img_in.weight" in stored and "vte.weight" in stored
    assert torch.isfinite(_t2i_latent(model)).all()
