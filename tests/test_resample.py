"""The pack's bicubic resize equals Pillow 10.3.0's (the official pin) exactly, under whatever Pillow is installed.

Expected arrays come from ``tests/fixtures/resample/make_fixtures.py`` run under Pillow 10.3.0 (see its header).
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovis_u1 import resample
from ovis_u1.config import PreprocessParams
from ovis_u1.preprocess import (condition_image, normalize_clip, patchify, preprocess_image,
                                process_image_aspectratio, resize_for_edit, smart_resize)

FIXTURE = Path(__file__).parent / "fixtures" / "resample" / "pil103_bicubic.npz"


@lru_cache(maxsize=None)
def fixture() -> dict:
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


def case(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(source crop, expected uint8 output) of one fixture case."""
    data = fixture()
    index = list(data["case_names"]).index(name)
    src_id, x0, y0, cw, ch, ow, oh, offset = (int(v) for v in data["cases"][index])
    src = data["source_" + str(data["source_names"][src_id])]
    shape = (oh, ow) + src.shape[2:]
    expected = data["expected"][offset:offset + int(np.prod(shape))].reshape(shape)
    return src[y0:y0 + ch, x0:x0 + cw], expected


GRID = [str(n) for n in fixture()["case_names"] if str(n).startswith("grid_")]


def test_fixture_is_from_pillow_10_3_0():
    assert str(fixture()["pillow_version"]) == "10.3.0"
    assert len(GRID) > 100


@pytest.mark.parametrize("name", GRID)
def test_grid_matches_pillow_10_3_0(name):
    src, expected = case(name)
    out = np.asarray(resample.resize(Image.fromarray(src), (expected.shape[1], expected.shape[0])))
    assert out.shape == expected.shape
    diff = np.abs(out.astype(np.int16) - expected)
    assert diff.max() == 0, f"{name}: {src.shape} -> {expected.shape}: {int((diff > 0).sum())} values differ, " \
                            f"max {int(diff.max())} levels"


def test_identity_returns_a_copy():
    src, _ = case(GRID[0])
    img = Image.fromarray(np.ascontiguousarray(src))
    out = resample.resize(img, img.size)
    assert out is not img and np.array_equal(np.asarray(out), np.asarray(img))


@pytest.mark.parametrize("mode", ["RGBA", "P", "I;16", "F"])
def test_other_modes_are_refused_clearly(mode):
    with pytest.raises(ValueError, match="mode"):
        resample.resize(Image.new(mode, (4, 4)), (2, 2))


@pytest.mark.parametrize("size", [(0, 3), (3, 0)])
def test_empty_target_is_refused(size):
    with pytest.raises(ValueError, match="at least 1x1"):
        resample.resize_array(np.zeros((4, 4), np.uint8), *size)


# The pack's preprocessing steps give Pillow 10.3.0's pixels (the sizes are noted in make_fixtures.py).

def _image(name: str) -> tuple[Image.Image, np.ndarray]:
    src, expected = case(name)
    return Image.fromarray(np.ascontiguousarray(src)), expected


def test_resize_for_edit():
    img, expected = _image("pipeline_resize_for_edit")
    assert np.array_equal(np.asarray(resize_for_edit(img)), expected)


def test_process_image_aspectratio():
    img, expected = _image("pipeline_aspectratio")
    assert np.array_equal(np.asarray(process_image_aspectratio(img, 64, 96)), expected)


def test_condition_image():
    img, expected = _image("pipeline_condition")
    out = condition_image(img, 90, 72, PreprocessParams(min_pixels=6272))
    assert np.array_equal(np.asarray(out), expected)


def test_every_resize_goes_through_the_pack(monkeypatch):
    """Pixels alone cannot show it where this Pillow happens to agree with 10.3.0 (e.g. equal scale on both sides)."""
    calls = []
    pack_resize = resample.resize
    monkeypatch.setattr(resample, "resize", lambda img, size: calls.append(size) or pack_resize(img, size))
    img, _ = _image("pipeline_condition")
    resize_for_edit(img)
    process_image_aspectratio(img, 64, 96)
    condition_image(img, 90, 72, PreprocessParams(min_pixels=6272))
    preprocess_image(img, PreprocessParams(min_pixels=3136, max_pixels=12544))
    assert calls == [(96, 64), (127, 96), (95, 72), (84, 56), (84, 84)]


def test_preprocess_image():
    img, expected = _image("pipeline_preprocess")
    params = PreprocessParams(min_pixels=3136, max_pixels=12544)
    pixel_values, grid = preprocess_image(img, params)
    want_values, want_grid = patchify(normalize_clip(Image.fromarray(expected), params), params)
    assert torch.equal(grid, want_grid) and torch.equal(pixel_values, want_values)


# smart_resize: the sizes every resize above goes to. Known values live in test_vision.py; here an independent,
# vectorised statement of the rule (numpy float64: np.round is half-to-even like Python's round) is compared with
# the pack's over many sizes, and the rule's properties are checked.

def smart_resize_reference(h: np.ndarray, w: np.ndarray, factor: int, lo: int, hi: int):
    h, w = h.astype(np.float64), w.astype(np.float64)
    short, long = np.minimum(h, w), np.maximum(h, w)
    tiny = short < factor
    stretched = np.where(tiny, np.round(factor / short * long), np.where(long / short > 200, 200 * short, long))
    short = np.where(tiny, factor, short)
    h2 = np.where(h < w, short, stretched)
    w2 = np.where(h < w, stretched, short)
    area = np.round(h2 / factor) * factor * np.round(w2 / factor) * factor
    down = np.sqrt(h2 * w2 / hi)
    up = np.sqrt(lo / (h2 * w2))
    pick = [area > hi, area < lo]
    out_h = np.select(pick, [np.floor(h2 / down / factor), np.ceil(h2 * up / factor)], np.round(h2 / factor))
    out_w = np.select(pick, [np.floor(w2 / down / factor), np.ceil(w2 * up / factor)], np.round(w2 / factor))
    return (out_h * factor).astype(np.int64), (out_w * factor).astype(np.int64)


BOUNDS = [(28, 3136, 12845056), (28, 200704, 3211264), (32, 3136, 1003520), (28, 3136, 200704), (28, 3136, 6272),
          (14, 100, 5000)]


@pytest.mark.parametrize("factor,lo,hi", BOUNDS)
def test_smart_resize_matches_an_independent_statement(factor, lo, hi):
    sides = np.array(list(range(1, 300)) + [449, 1000, 1080, 1920, 3000, 4000, 6001, 10000, 30000, 65000])
    h, w = (a.ravel() for a in np.meshgrid(sides, sides[::3], indexing="ij"))
    want_h, want_w = smart_resize_reference(h, w, factor, lo, hi)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = np.array([smart_resize(int(a), int(b), factor, lo, hi) for a, b in zip(h, w)])
    bad = np.flatnonzero((got[:, 0] != want_h) | (got[:, 1] != want_w))
    assert bad.size == 0, [((h[i], w[i]), tuple(got[i]), (want_h[i], want_w[i])) for i in bad[:5]]


@pytest.mark.parametrize("factor,lo,hi", BOUNDS)
def test_smart_resize_properties(factor, lo, hi):
    rng = np.random.default_rng(factor + lo)
    for h, w in rng.integers(factor, 5000, (400, 2)):
        if max(h, w) > 4 * min(h, w):
            continue
        out_h, out_w = smart_resize(int(h), int(w), factor, lo, hi)
        assert out_h % factor == 0 and out_w % factor == 0 and out_h > 0 and out_w > 0
        nearest = round(h / factor) * factor, round(w / factor) * factor
        if lo <= nearest[0] * nearest[1] <= hi:
            assert (out_h, out_w) == nearest
        elif nearest[0] * nearest[1] > hi:
            assert out_h * out_w <= hi
        else:
            assert out_h * out_w >= lo
