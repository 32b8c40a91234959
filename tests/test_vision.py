"""Golden parity of the image preprocessing (official modeling_ovis_u1.py Aimv2VisualTokenizer.preprocess_image, the
build_inputs / pipe_img_edit of the official test scripts, modeling_yak.py YakModel.process_image_aspectratio) and the
visual tokenizer (official modeling_aimv2.py AIMv2Model, modeling_ovis_u1.py Aimv2VisualTokenizer)."""

from __future__ import annotations

import dataclasses
import json
import warnings
from functools import lru_cache

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ovis_u1.config import load_params, params_from_dicts
from ovis_u1.preprocess import (
    condition_image,
    edit_target_size,
    preprocess_image,
    process_image_aspectratio,
    resize_for_edit,
    smart_resize,
    vae_pixel_values,
    white_canvas,
)
from ovis_u1.vision import (
    VisualGeometry,
    VisualTokenizer,
    grid_list,
    interpolate_pos_embed,
    visual_embeddings,
    window_index,
)
from tests.golden import CHECKPOINT, GOLDEN, TINY_A, assert_golden, manifest, requires_golden, tensors

PIXEL_ATOL = 1e-6  # manifest: pixel_values / vae_pixel_values / context.vae_enc_input


@lru_cache(maxsize=None)
def _checkpoint() -> dict[str, torch.Tensor]:
    return load_file(str(CHECKPOINT / "model.safetensors"))


def _vision_state_dict() -> dict[str, torch.Tensor]:
    prefix = "visual_tokenizer."
    return {k[len(prefix):]: v for k, v in _checkpoint().items() if k.startswith(prefix)}


def _tokenizer(**overrides) -> VisualTokenizer:
    vision = load_params(CHECKPOINT).vision
    if overrides:
        vision = dataclasses.replace(vision, **overrides)
    model = VisualTokenizer(vision)
    model.load_state_dict(_vision_state_dict(), strict=True)
    return model.eval()


def _pixels_equal(actual: Image.Image, expected_path) -> None:
    expected = Image.open(expected_path).convert("RGB")
    assert actual.size == expected.size, f"{expected_path.name}: size {actual.size} != {expected.size}"
    assert np.array_equal(np.asarray(actual), np.asarray(expected)), f"{expected_path.name}: pixels differ"


def _branch_inputs(case: str) -> tuple[int, int, dict[str, Image.Image]]:
    """(W, H, {branch: image handed to that branch}) as the official T2I / EDIT scripts build them (build_inputs
    of test_txt_to_img.py / test_img_edit.py)."""
    if case == "t2i":
        params = manifest()["cases"]["t2i"]["params"]
        w, h = params["width"], params["height"]
        return w, h, {"cond": white_canvas(w, h), "no_both": white_canvas(w, h)}
    resized = resize_for_edit(Image.open(TINY_A / "cases" / "edit" / "input.png"))
    w, h = resized.size
    return w, h, {"cond": resized, "no_txt": resized, "no_both": white_canvas(w, h)}


# ---------------------------------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------------------------------

def test_smart_resize_short_side_below_factor_scales_up():
    with pytest.warns(UserWarning):
        assert smart_resize(10, 50, 28, 3136, 10**6) == (28, 140)
    with pytest.warns(UserWarning):
        assert smart_resize(20, 20, 28, 3136, 10**6) == (56, 56)  # 28×28 then raised to min_pixels


def test_smart_resize_extreme_aspect_ratio_is_clamped():
    with pytest.warns(UserWarning):
        assert smart_resize(30, 9000, 28, 200704, 3211264) == (56, 6356)


def test_smart_resize_above_max_pixels_and_rounding():
    assert smart_resize(4000, 3000, 28, 200704, 3211264) == (2044, 1540)
    # banker's rounding: 70/28 = 2.5 → 2, 42/28 = 1.5 → 2
    assert smart_resize(70, 42, 28, 1, 10**9) == (56, 56)
    # β lands exactly on 8.0: 56·8/28 = 16 must not be ceiled to 17
    assert smart_resize(56, 56, 28, 200704, 3211264) == (448, 448)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        smart_resize(76, 100, 28, 200704, 3211264)  # no warning on ordinary sizes


def test_process_image_aspectratio_pads_when_one_pixel_short():
    # r = 96/47: int(r·47) = 95 < 96 → the crop zero-pads one row at the bottom (torchvision center_crop)
    img = Image.new("RGB", (32, 47), (200, 100, 50))
    out = process_image_aspectratio(img, 64, 96)
    assert out.size == (64, 96)
    arr = np.asarray(out)
    assert (arr[-1] == 0).all() and (arr[:-1] != 0).all()
    vae = vae_pixel_values(img, 64, 96)
    assert vae.shape == (1, 3, 96, 64) and (vae[0, :, -1] == -1).all()


@requires_golden
def test_preprocess_understand_image():
    ref = tensors("understand")
    pixel_values, grid_thws = preprocess_image(Image.open(TINY_A / "cases" / "understand" / "input.png"),
                                               load_params(CHECKPOINT).preprocess)
    assert_golden(grid_thws, ref["grid_thws"], "grid_thws")
    assert_golden(pixel_values, ref["pixel_values"], "pixel_values", atol=PIXEL_ATOL)


@requires_golden
def test_edit_target_size_and_resized_input():
    case = manifest()["cases"]["edit"]
    src = Image.open(TINY_A / "cases" / "edit" / "input.png")
    assert list(src.size) == case["params"]["image"]
    w, h = edit_target_size(*src.size)
    assert [h, w] == case["target_hw"]
    _pixels_equal(resize_for_edit(src), TINY_A / "cases" / "edit" / "input_resized.png")


@requires_golden
@pytest.mark.parametrize("case", ["t2i", "edit"])
def test_condition_branches(case):
    """Every conditioning branch: the ViT input image, its pixel_values / grid_thws and the VAE pixel values."""
    ref = tensors(case)
    pre = load_params(CHECKPOINT).preprocess
    expected_hw = manifest()["cases"][case]["vit_pre_resize_hw"]
    w, h, branches = _branch_inputs(case)
    assert set(branches) == set(expected_hw)
    for branch, image in branches.items():
        vit_input = condition_image(image, w, h, pre)
        assert [vit_input.height, vit_input.width] == expected_hw[branch]
        _pixels_equal(vit_input, TINY_A / "cases" / case / f"{branch}.vit_input.png")
        pixel_values, grid_thws = preprocess_image(vit_input, pre)
        assert_golden(grid_thws, ref[f"{branch}.grid_thws"], f"{branch}.grid_thws")
        assert_golden(pixel_values, ref[f"{branch}.pixel_values"], f"{branch}.pixel_values", atol=PIXEL_ATOL)
        assert_golden(vae_pixel_values(image, w, h), ref[f"{branch}.vae_pixel_values"], f"{branch}.vae_pixel_values",
                      atol=PIXEL_ATOL)
    assert_golden(vae_pixel_values(branches["cond"], w, h), ref["context.vae_enc_input"], "context.vae_enc_input",
                  atol=PIXEL_ATOL)


# ---------------------------------------------------------------------------------------------------------------------
# Visual tokenizer
# ---------------------------------------------------------------------------------------------------------------------

@requires_golden
def test_visual_tokenizer_understand_chain():
    ref = tensors("understand")
    model = _tokenizer()
    with torch.no_grad():
        features = model.encode(ref["pixel_values"], ref["grid_thws"])
        assert_golden(features, ref["vit_features_hidden_states_m1"], "vit_features_hidden_states_m1")
        merged = model.merge(features)
        assert_golden(merged, ref["vit_merged_features"], "vit_merged_features")
        logits = model.head_logits(merged)
        assert_golden(logits, ref["head_logits"], "head_logits")
        probs = model.tokenize(logits)
        assert_golden(probs, ref["visual_token_probs"], "visual_token_probs")
        assert_golden(model(ref["pixel_values"], ref["grid_thws"]), ref["visual_token_probs"], "forward")
        embeds = visual_embeddings(probs, torch.nn.Embedding.from_pretrained(_checkpoint()["vte.weight"]))
        assert_golden(embeds, ref["visual_embeds"], "visual_embeds")
        # post_trunk_norm is stored (and matches the reference output) but not part of the Ovis path
        assert_golden(model.backbone.trunk.post_trunk_norm(features), ref["vit_last_hidden_state_post_norm"],
                      "vit_last_hidden_state_post_norm")


@requires_golden
def test_several_images_attend_only_within_themselves():
    a, b = tensors("understand"), tensors("edit")
    model = _tokenizer()
    with torch.no_grad():
        fa = model.encode(a["pixel_values"], a["grid_thws"])
        fb = model.encode(b["cond.pixel_values"], b["cond.grid_thws"])
        both = model.encode(torch.cat([a["pixel_values"], b["cond.pixel_values"]]),
                            torch.cat([a["grid_thws"], b["cond.grid_thws"]]))
    assert_golden(both, torch.cat([fa, fb]), "two images in one call", atol=1e-5)


@requires_golden
def test_all_full_attention_equals_one_window_per_image():
    """With every block full, the window permutation has no effect; a window covering the image is the same thing."""
    ref = tensors("understand")
    with torch.no_grad():
        full = _tokenizer(fullatt_block_indexes=None).encode(ref["pixel_values"], ref["grid_thws"])
        one_window = _tokenizer(fullatt_block_indexes=(), window_size=14 * 2 * 64).encode(ref["pixel_values"],
                                                                                          ref["grid_thws"])
        windowed = _tokenizer(fullatt_block_indexes=()).encode(ref["pixel_values"], ref["grid_thws"])
    assert_golden(one_window, full, "one window == full", atol=1e-5)
    assert (windowed - full).abs().max() > 1e-3  # windows do restrict attention


def test_window_index_partial_windows():
    # two images: image 1 is 6×10 merged groups (windows 4×4 → 2×3 windows, partial at the edges), image 2 2×2
    order, lengths = window_index([(1, 12, 20), (1, 4, 4)], window=4, stride=2)
    assert lengths == [16 * 4, 16 * 4, 8 * 4, 8 * 4, 8 * 4, 4 * 4, 4 * 4]
    assert order[:4].tolist() == [0, 1, 2, 3] and order[4:8].tolist() == [10, 11, 12, 13]
    assert order[16:20].tolist() == [4, 5, 6, 7] and order[32:36].tolist() == [8, 9, 18, 19]
    assert sorted(order.tolist()) == list(range(64))
    assert order[-4:].tolist() == [60, 61, 62, 63]


def test_pos_embed_interpolation_identity_at_native_size():
    table = torch.randn(1, 64, 5)
    for method in ("one_dim", "two_dim"):
        assert_golden(interpolate_pos_embed(table, 8, 8, method), table[0], method, atol=1e-6)
    two = interpolate_pos_embed(table, 6, 10, "two_dim")
    assert two.shape == (60, 5)
    with pytest.raises(ValueError):
        interpolate_pos_embed(table, 8, 8, "three_dim")


@requires_golden
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward_close_to_fp32(dtype):
    ref = tensors("understand")
    model = _tokenizer().to(dtype)
    with torch.no_grad():
        features = model.encode(ref["pixel_values"].to(dtype), ref["grid_thws"])
        probs = model(ref["pixel_values"].to(dtype), ref["grid_thws"])
    assert features.dtype == dtype and probs.dtype == dtype
    assert torch.isfinite(features).all() and torch.isfinite(probs).all()
    expected = ref["vit_features_hidden_states_m1"]
    rel = ((features.float() - expected).norm() / expected.norm()).item()
    assert rel < 5e-2, f"{dtype}: relative error {rel:.3g}"
    assert (probs.float() - ref["visual_token_probs"]).abs().max() < 5e-2


def test_meta_build_matches_full_size_shapes():
    shapes_path = GOLDEN / "full_size" / "state_dict_shapes.json"
    if not shapes_path.exists():
        pytest.skip(f"{shapes_path} not found")
    prefix = "visual_tokenizer."
    expected = {k[len(prefix):]: v for k, v in json.loads(shapes_path.read_text())["shapes"].items()
                if k.startswith(prefix)}
    params = params_from_dicts(json.loads((GOLDEN / "full_size" / "config.json").read_text()))
    with torch.device("meta"):
        model = VisualTokenizer(params.vision)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected
    assert list(model.buffers()) == []


@requires_golden
def test_tiny_checkpoint_keys_match():
    prefix = "visual_tokenizer."
    stored = {k[len(prefix):]: tuple(v.shape) for k, v in _checkpoint().items() if k.startswith(prefix)}
    with torch.device("meta"):
        model = VisualTokenizer(load_params(CHECKPOINT).vision)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == stored


# ---------------------------------------------------------------------------------------------------------------------
# The per-grid RoPE tables (issue 22 item 7): bounded, on the CPU, freed with the model
# ---------------------------------------------------------------------------------------------------------------------

def _meta_tokenizer() -> VisualTokenizer:
    """The tiny model's visual encoder without weights: the geometry needs only its params."""
    with torch.device("meta"):
        return VisualTokenizer(load_params(CHECKPOINT).vision)


def _tables(geo: VisualGeometry) -> list[torch.Tensor]:
    return [geo.window_order, geo.inverse_order, geo.cos, geo.sin]


def _grids(n: int) -> list[list[list[int]]]:
    return [[[1, 4 * (i + 1), 8]] for i in range(n)]


@requires_golden
def test_rope_tables_keep_a_few_recent_grids_and_go_with_the_model():
    import gc
    import weakref

    model = _meta_tokenizer()
    grids = _grids(10)
    for grid in grids:
        model.geometry(grid, torch.device("cpu"))
    model.geometry(grids[6], torch.device("cpu"))  # used again: the most recent, kept
    for grid in _grids(12)[10:]:
        model.geometry(grid, torch.device("cpu"))
    assert 0 < len(model._geometry) <= 4, f"{len(model._geometry)} grids' tables kept"
    kept = [geo.cos.shape[0] for geo in model._geometry.values()]
    assert 7 * 4 * 8 in kept, "the grid used last but two was dropped before grids used earlier"
    tables = [weakref.ref(t) for geo in model._geometry.values() for t in _tables(geo)]
    del model
    gc.collect()
    assert all(ref() is None for ref in tables), "the tables outlive the model"


@requires_golden
def test_rope_tables_live_on_the_computation_device_only_for_the_call():
    """A forward on another device (the meta device stands in for a GPU) gets its tables there; what stays cached
    is on the CPU, out of the accelerator's memory."""
    model = _meta_tokenizer()
    geo = model.geometry(_grids(1)[0], torch.device("meta"))
    assert {t.device.type for t in _tables(geo)} == {"meta"}
    assert len(model._geometry) == 1
    assert {t.device.type for cached in model._geometry.values() for t in _tables(cached)} == {"cpu"}
    again = model.geometry(_grids(1)[0], torch.device("cpu"))
    reference = VisualGeometry.build(grid_list(_grids(1)[0]), model.params, torch.device("cpu"))
    assert torch.equal(again.cos, reference.cos) and torch.equal(again.window_order, reference.window_order)
