"""Layers from an injected operations namespace (issue 10 item 1) and fp8 weight storage (item 3).

* Every part built with a *recording* namespace (torch.nn subclasses that record their construction) holds no
  weight-bearing torch.nn layer that did not come from the namespace, and every parameter is owned either by a
  recorded layer or by one of the pack's own norms / free parameters.
* The pack's headless manual cast reproduces the plain run exactly in fp32 (golden parity unchanged) and, with fp8
  weight storage, still gives finite, non-blank t2i and edit images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import ovis_u1
from ovis_u1 import mmdit as mmdit_module
from ovis_u1 import vae as vae_module
from ovis_u1 import vision as vision_module
from ovis_u1.config import load_params, params_from_dicts
from ovis_u1.mmdit import MMDiT
from ovis_u1.model import OvisU1, OvisU1InputError, fp8_keys
from ovis_u1.operations import compute_dtype, manual_cast, parse_weight_dtype
from ovis_u1.vae import AutoencoderKL
from ovis_u1.vision import VisualTokenizer
from tests.golden import CHECKPOINT, GOLDEN, TINY_A, assert_golden, assert_golden_image, case_params, requires_golden, tensors

pytestmark = requires_golden

LAYERS = ("Linear", "Conv2d", "GroupNorm", "LayerNorm", "Embedding", "RMSNorm")
TORCH_LAYERS = tuple(getattr(nn, name) for name in LAYERS) + (nn.Conv1d, nn.Conv3d)
# The pack's own modules with custom math (fp32 statistics); they cast their weights at use.
OWN_NORMS = (vision_module.RMSNorm, mmdit_module.RMSNorm, vae_module.GroupNorm32)
FREE_PARAMETERS = {"pos_embed", "cls_token"}  # used directly and cast at the use site


class Recording:
    """An operations namespace whose layers are torch.nn subclasses that remember every instance they build."""

    def __init__(self):
        self.built: list[nn.Module] = []
        for name in LAYERS:
            setattr(self, name, self._recorded(getattr(nn, name)))

    def _recorded(self, base: type) -> type:
        record = self.built

        def __init__(layer, *args, **kwargs):
            base.__init__(layer, *args, **kwargs)
            record.append(layer)

        return type(f"Recorded{base.__name__}", (base,), {"__init__": __init__})

    def classes(self) -> tuple[type, ...]:
        return tuple(getattr(self, name) for name in LAYERS)


def assert_all_layers_injected(root: nn.Module, ops: Recording, own=OWN_NORMS) -> None:
    recorded = ops.classes()
    plain = [n for n, m in root.named_modules() if isinstance(m, TORCH_LAYERS) and not isinstance(m, recorded)]
    assert not plain, f"torch.nn layers not built from operations: {plain[:8]}"
    for name, module in root.named_modules():
        direct = [p for p, _ in module.named_parameters(recurse=False)]
        if not direct or isinstance(module, recorded) or isinstance(module, own):
            continue
        assert set(direct) <= FREE_PARAMETERS, f"{name or type(root).__name__} owns parameters {direct} outside operations"
    ids = {id(m) for m in root.modules()}
    assert any(id(layer) in ids for layer in ops.built)


def tiny_params():
    return load_params(CHECKPOINT)


def full_params():
    return params_from_dicts(json.loads((GOLDEN / "full_size" / "config.json").read_text()))


# ------------------------------------------------------------------------------------------ recording test
@pytest.mark.parametrize(
    "build",
    [
        lambda p, ops: VisualTokenizer(p.vision, operations=ops),
        lambda p, ops: MMDiT(p.mmdit, operations=ops),  # includes the token refiner (txt_in)
        lambda p, ops: AutoencoderKL(p.vae, operations=ops),
    ],
    ids=["vision", "mmdit+refiner", "vae"],
)
def test_every_part_is_built_from_operations(build):
    ops = Recording()
    with torch.device("meta"):
        part = build(full_params(), ops)
    assert_all_layers_injected(part, ops)


def test_whole_model_outside_the_llm_is_built_from_operations():
    ops = Recording()
    with torch.device("meta"):
        model = OvisU1(full_params(), operations=ops)
    assert isinstance(model.vte, ops.Embedding)
    for name in ("visual_tokenizer", "visual_generator"):
        assert_all_layers_injected(getattr(model, name), ops)


def test_llm_is_built_from_operations():
    from ovis_u1.llm import build_llm

    ops = Recording()
    with torch.device("meta"):
        llm = build_llm(full_params().llm_config, attention="sdpa", operations=ops)
    recorded = ops.classes()
    plain = [n for n, m in llm.named_modules() if isinstance(m, TORCH_LAYERS) and not isinstance(m, recorded)]
    assert not plain, f"torch.nn layers not built from operations: {plain[:8]}"
    assert ops.built


def test_injected_layers_keep_the_full_size_keys():
    with torch.device("meta"):
        plain = OvisU1(full_params())
        injected = OvisU1(full_params(), operations=Recording())
    assert {k: tuple(v.shape) for k, v in injected.state_dict().items()} == {
        k: tuple(v.shape) for k, v in plain.state_dict().items()
    }


# ---------------------------------------------------------------------------------------- manual cast, fp8
def edit_input() -> Image.Image:
    return Image.open(TINY_A / "cases" / "edit" / "input.png")


def _t2i_latent(model) -> torch.Tensor:
    p = case_params("t2i")
    refined = model.refine(model.encode_condition(p["prompt"], "t2i", width=p["width"], height=p["height"]))
    return model.sample(refined, p["width"], p["height"], steps=p["steps"], txt_cfg=p["txt_cfg"], seed=p["seed"])


def test_manual_cast_in_fp32_equals_the_plain_run_and_the_goldens():
    plain = ovis_u1.load_model(CHECKPOINT, device="cpu", dtype=torch.float32)
    cast = ovis_u1.load_model(CHECKPOINT, device="cpu", dtype=torch.float32, operations=manual_cast)
    assert isinstance(cast.mmdit.img_in, manual_cast.Linear) and isinstance(cast.vte, manual_cast.Embedding)
    latent = _t2i_latent(cast)
    assert torch.equal(latent, _t2i_latent(plain))
    g = tensors("t2i")
    assert_golden(latent, g["vae_dec_input"], "vae_dec_input")
    assert_golden_image(cast.decode_to_pil(latent)[0], g["output_image_uint8"])
    p = case_params("edit")
    edit = cast.edit(edit_input(), p["prompt"], steps=p["steps"], img_cfg=p["img_cfg"], txt_cfg=p["txt_cfg"],
                     seed=p["seed"], context_seed=p["vae_sample_seed"])
    assert_golden_image(edit, tensors("edit")["output_image_uint8"])


@pytest.mark.parametrize("weight_dtype", ["fp8_e4m3fn", "fp8_e5m2"])
def test_fp8_storage_gives_finite_non_blank_images(weight_dtype):
    model = ovis_u1.load_model(CHECKPOINT, device="cpu", dtype=torch.bfloat16, weight_dtype=weight_dtype)
    fp8 = parse_weight_dtype(weight_dtype)
    state = model.state_dict()
    stored = {k for k, v in state.items() if v.dtype == fp8}
    assert stored == fp8_keys(model) and stored
    assert "visual_generator.backbone.img_in.weight" in stored and "vte.weight" in stored
    assert not any(k.startswith("visual_generator.vae.") for k in stored)
    assert all(v.dtype == torch.float32 for k, v in state.items() if k.startswith("visual_generator.vae."))
    assert compute_dtype(model.mmdit) == compute_dtype(model.visual_tokenizer) == torch.bfloat16

    latent = _t2i_latent(model)
    assert latent.dtype == torch.float32 and torch.isfinite(latent).all()
    t2i = model.decode_to_pil(latent)[0]
    edit = model.edit(edit_input(), "add a hat", steps=2, seed=1)
    for image in (t2i, edit):
        a = np.asarray(image)
        assert a.std() > 0  # a real picture, not a blank
    assert model.understand([], "Hello?", max_new_tokens=2).token_ids


def test_unknown_weight_dtype_names_the_choices():
    with pytest.raises(OvisU1InputError, match="fp8_e4m3fn, fp8_e5m2"):
        ovis_u1.load_model(CHECKPOINT, device="cpu", weight_dtype="int4")
    with pytest.raises(OvisU1InputError, match="cast"):
        ovis_u1.load_model(CHECKPOINT, device="cpu", weight_dtype="fp8_e4m3fn", operations=nn)
    assert parse_weight_dtype("default") is None and parse_weight_dtype(torch.float8_e5m2) is torch.float8_e5m2


def test_manual_cast_computes_with_weights_on_another_dtype():
    """A manual-cast layer computes in its input's dtype whatever the stored dtype (fp8 included)."""
    torch.manual_seed(0)
    ref = nn.Linear(8, 4)
    layer = manual_cast.Linear(8, 4)
    layer.load_state_dict(ref.state_dict())
    layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref(x.float())).abs().max() < 0.2
    table = manual_cast.Embedding(5, 3)
    table.weight.data = table.weight.data.to(torch.float8_e5m2)
    assert table(torch.tensor([1, 2])).dtype == torch.bfloat16
    assert table(torch.tensor([1]), out_dtype=torch.float32).dtype == torch.float32
