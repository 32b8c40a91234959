"""Every image mode Pillow opens reaches the model as sensible 8-bit RGB (issue 9 item 2).

8-bit modes keep the official ``convert("RGB")`` pixels; 16-bit, 32-bit and float images are scaled from their range
instead of clipped (a 16-bit grey PNG used to become 99.5 % white). Checked on ``preprocess.to_rgb`` itself, on each
preprocessing entry point and through the API (``understand`` / ``edit``), after which the same loaded model still
reproduces the golden text-to-image picture.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import ovis_u1
from ovis_u1.inputs import OvisU1InputError
from ovis_u1.config import PreprocessParams
from ovis_u1.preprocess import condition_image, preprocess_image, resize_for_edit, to_rgb, vae_pixel_values
from tests.golden import CHECKPOINT, TINY_A, assert_golden_image, case_params, requires_golden, tensors


def picture(width: int = 90, height: int = 60, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // (width - 1), yy * 255 // (height - 1), rng.integers(0, 256, (height, width))], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def sixteen_bit(grey: np.ndarray, mode: str = "I;16") -> Image.Image:
    """8-bit levels x stored as 16-bit x·257 (full range), in the given 16-bit byte order."""
    wide = grey.astype(np.uint16) * 257
    dtype = ">u2" if mode == "I;16B" else "<u2"
    return Image.frombytes(mode, (grey.shape[1], grey.shape[0]), wide.astype(dtype).tobytes())


def via_png(img: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    buffer.seek(0)
    return Image.open(buffer)


GREY = np.asarray(picture().convert("L"))


def grey_rgb() -> np.ndarray:
    return np.asarray(Image.fromarray(GREY).convert("RGB"))


# ------------------------------------------------------------------------------------------ to_rgb itself
def _eight_bit_cases():
    base = picture()
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 3
    cases = {"1": base.convert("1"), "L": base.convert("L"), "LA": base.convert("LA"), "P+transparency": palette,
             "RGBA": base.convert("RGBA"), "RGBa": base.convert("RGBA").convert("RGBa"),
             "CMYK": base.convert("CMYK"), "YCbCr": base.convert("YCbCr"), "LAB": base.convert("LAB"),
             "HSV": base.convert("HSV"), "RGBX": base.convert("RGBX"), "PA": palette.convert("PA")}
    return cases


@pytest.mark.parametrize("name", sorted(_eight_bit_cases()))
def test_eight_bit_modes_keep_the_official_conversion(name):
    img = _eight_bit_cases()[name]
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    assert np.array_equal(np.asarray(out), np.asarray(img.convert("RGB")))


def test_rgb_is_passed_through():
    img = picture()
    assert to_rgb(img) is img


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_sixteen_bit_modes_scale_their_full_range(mode):
    img = sixteen_bit(GREY, mode)
    assert img.mode == mode
    assert np.array_equal(np.asarray(to_rgb(img)), grey_rgb())


def test_sixteen_bit_png_is_not_white():
    ramp = np.linspace(0, 65535, 64 * 8).round().astype(np.uint16).reshape(8, 64)
    img = via_png(Image.fromarray(ramp))
    assert img.mode.startswith("I")
    out = np.asarray(to_rgb(img))[..., 0].astype(int)
    assert (out == 255).mean() < 0.01 and out.min() == 0 and out.max() == 255
    assert np.abs(out - ramp / 257).max() <= 0.5
    assert np.all(np.diff(out.ravel()) >= 0)


def test_32_bit_int_with_16_bit_content():
    img = Image.fromarray(GREY.astype(np.int32) * 257)
    assert img.mode == "I"
    assert np.array_equal(np.asarray(to_rgb(img)), grey_rgb())


def test_32_bit_int_beyond_16_bits_uses_the_int32_range():
    values = np.array([[-5, 0, 2 ** 30, 2 ** 31 - 1]], dtype=np.int32)
    out = np.asarray(to_rgb(Image.fromarray(values)))[0, :, 0]
    assert out.tolist() == [0, 0, 128, 255]


@pytest.mark.parametrize("scale", [1 / 255, 1.0])
def test_float_images_in_unit_or_level_range(scale):
    img = Image.fromarray((GREY.astype(np.float32) * np.float32(scale)))
    assert img.mode == "F"
    assert np.array_equal(np.asarray(to_rgb(img)), grey_rgb())


def test_float_out_of_range_is_clipped():
    out = np.asarray(to_rgb(Image.fromarray(np.array([[-3.0, 12.4, 300.0]], dtype=np.float32))))[0, :, 0]
    assert out.tolist() == [0, 12, 255]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_float_image_is_refused(bad):
    values = np.zeros((4, 4), np.float32)
    values[1, 2] = bad
    with pytest.raises(OvisU1InputError, match="image.*NaN or infinite"):
        to_rgb(Image.fromarray(values))


def test_premultiplied_la_is_converted():
    la = picture().convert("LA").convert("La")
    assert np.array_equal(np.asarray(to_rgb(la)), np.asarray(la.convert("LA").convert("RGB")))


# ------------------------------------------------------------------------------- every preprocessing entry point
ENTRY_POINTS = {
    "preprocess_image": lambda img: preprocess_image(img, PreprocessParams(min_pixels=3136, max_pixels=12544)),
    "condition_image": lambda img: np.asarray(condition_image(img, 64, 48, PreprocessParams(min_pixels=6272))),
    "vae_pixel_values": lambda img: vae_pixel_values(img, 64, 48),
    "resize_for_edit": lambda img: np.asarray(resize_for_edit(img)),
}
HIGH_DEPTH = {
    "I;16": lambda: sixteen_bit(GREY), "I;16B": lambda: sixteen_bit(GREY, "I;16B"),
    "I": lambda: Image.fromarray(GREY.astype(np.int32) * 257),
    "F": lambda: Image.fromarray(GREY.astype(np.float32) / np.float32(255)),
}


def _same(a, b) -> bool:
    if isinstance(a, tuple):
        return all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(torch.as_tensor(np.array(a)), torch.as_tensor(np.array(b)))


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("mode", sorted(HIGH_DEPTH))
def test_entry_points_see_the_8_bit_picture(entry, mode):
    fn = ENTRY_POINTS[entry]
    assert _same(fn(HIGH_DEPTH[mode]()), fn(Image.fromarray(grey_rgb())))


# ----------------------------------------------------------------------------------------------- via the API
@pytest.fixture(scope="module")
def model():
    return ovis_u1.load_model(CHECKPOINT, device="cpu", dtype=torch.float32)


def _as_mode(img: Image.Image, mode: str) -> tuple[Image.Image, Image.Image]:
    """(the picture in ``mode``, the RGB picture the model must see for it)."""
    grey = np.asarray(img.convert("L"))
    rgb = Image.fromarray(grey).convert("RGB")
    if mode == "I;16":
        return via_png(sixteen_bit(grey)), rgb
    if mode == "I":
        return Image.fromarray(grey.astype(np.int32) * 257), rgb
    if mode == "F":
        return Image.fromarray(grey.astype(np.float32) / np.float32(255)), rgb
    if mode == "La":
        la = img.convert("LA").convert("La")
        return la, la.convert("LA").convert("RGB")
    converted = img.convert(mode)
    return converted, converted.convert("RGB")


def _still_golden(model) -> None:
    p = case_params("t2i")
    image = model.text_to_image(p["prompt"], p["width"], p["height"], steps=p["steps"], txt_cfg=p["txt_cfg"],
                                seed=p["seed"])
    assert_golden_image(image, tensors("t2i")["output_image_uint8"])


API_MODES = ["I;16", "I", "F", "La", "CMYK", "P"]


@requires_golden
@pytest.mark.parametrize("mode", API_MODES)
def test_understand_accepts_the_mode(model, mode):
    source = Image.open(TINY_A / "cases" / "understand" / "input.png")
    img, rgb = _as_mode(source, mode)
    got = model.understand([img], "What is it?", max_new_tokens=3)
    want = model.understand([rgb], "What is it?", max_new_tokens=3)
    assert got.token_ids == want.token_ids
    _still_golden(model)


@requires_golden
@pytest.mark.parametrize("mode", API_MODES)
def test_edit_accepts_the_mode(model, mode):
    source = Image.open(TINY_A / "cases" / "edit" / "input.png")
    img, rgb = _as_mode(source, mode)
    kwargs = dict(steps=2, img_cfg=1.5, txt_cfg=6.0, seed=7, context_seed=11)
    got = model.edit(img, "add a hat to this cat.", **kwargs)
    want = model.edit(rgb, "add a hat to this cat.", **kwargs)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    _still_golden(model)


@requires_golden
def test_non_finite_float_image_is_refused_through_the_api(model):
    values = np.full((60, 90), 0.5, np.float32)
    values[3, 4] = np.nan
    with pytest.raises(OvisU1InputError, match="image.*NaN"):
        model.understand([Image.fromarray(values)], "What is it?", max_new_tokens=2)
    _still_golden(model)
