"""The edit source (``ovis_u1.model.edit_source`` / ``sized_edit_source`` / ``sample_edit_latent``): the image an
edit works on is checked and resized once, to its edit size, as the official edit resizes its input once before both
the LLM condition and the VAE context (official test_img_edit.py, pipe_img_edit). The Edit Context Encoder gives this
image as 'resized_image'; Encode Condition takes it at that size and never resizes it again, and an image of another
size is named as the wrong wire. Extreme images (too long, too thin) are refused here, by the library, before any
text is encoded."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import ovis_u1
from ovis_u1 import OvisU1InputError, prompts, resample
from ovis_u1.model import edit_source, sample_edit_latent, sized_edit_source
from ovis_u1.sampling import pack_latents
from ovis_u1.vae import vae_to_latent
from tests.golden import CHECKPOINT, TINY_A, assert_golden, case_params, requires_golden, tensors

pytestmark = requires_golden

EDIT = TINY_A / "cases" / "edit"


def edit_input() -> Image.Image:
    return Image.open(EDIT / "input.png")


def raises(fn, *texts: str) -> str:
    with pytest.raises(OvisU1InputError) as info:
        fn()
    for text in texts:
        assert text in str(info.value), f"{text!r} not in {str(info.value)!r}"
    return str(info.value)


@pytest.fixture
def resizes(monkeypatch):
    """Every bicubic resize the library makes (``resample.resize`` is the only one)."""
    calls = []
    original = resample.resize

    def counting(image, size, *args, **kwargs):
        calls.append((image.size, tuple(size)))
        return original(image, size, *args, **kwargs)

    monkeypatch.setattr(resample, "resize", counting)
    return calls


@pytest.fixture(scope="module")
def model():
    return ovis_u1.load_model(CHECKPOINT, device="cpu", dtype=torch.float32)


# --------------------------------------------------------------------------------------------- edit_source
def test_edit_source_is_the_official_resized_input(resizes):
    source = edit_source(edit_input())
    assert source.size == (96, 64) and source.mode == "RGB"
    assert np.array_equal(np.asarray(source), np.asarray(Image.open(EDIT / "input_resized.png").convert("RGB")))
    assert resizes == [((90, 60), (96, 64))]  # one resize, to the edit size


def test_a_sized_source_is_used_as_it_is(resizes):
    source = edit_source(edit_input())
    resizes.clear()
    again = sized_edit_source(source, 96, 64)
    assert resizes == [] and again.size == (96, 64)
    assert np.array_equal(np.asarray(again), np.asarray(source))
    rgba = source.convert("RGBA")
    assert np.array_equal(np.asarray(sized_edit_source(rgba, 96, 64)), np.asarray(source))  # alpha dropped


def test_a_source_of_another_size_names_the_resized_image():
    """Before the edit context and the image were both resized by the nodes; now a wire from the original image
    (or another Edit Context Encoder) is named."""
    raises(lambda: sized_edit_source(edit_input(), 96, 64), "image is 90×60", "the edit context is 96×64",
           "'resized_image'", "Edit Context Encoder")
    raises(lambda: sized_edit_source(edit_source(edit_input()), 64, 64, name="source"), "source is 96×64",
           "the edit context is 64×64", "'resized_image'")


@pytest.mark.parametrize("width, height, name", [(32, 64, "width 32"), (96, 72, "height 72"), (None, 64, "width")])
def test_a_sized_source_needs_a_usable_size(width, height, name):
    raises(lambda: sized_edit_source(edit_source(edit_input()), width, height), name)


@pytest.mark.parametrize("size", [(10000, 10), (10, 10000), (20000, 900), (5000, 100)])
def test_extreme_edit_images_are_refused_with_the_fix(resizes, size):
    image = Image.new("RGB", size, (200, 10, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # smart_resize's own warning about tiny sides
        raises(lambda: edit_source(image), "image is", f"{size[0]}×{size[1]}", "crop or pad")
        raises(lambda: edit_source(image, name="source"), f"source is {size[0]}×{size[1]}")
    assert resizes == []  # refused before any resize


def test_edit_source_refuses_what_is_no_image():
    raises(lambda: edit_source(torch.zeros(1, 64, 64, 3)), "image: expected a PIL image")
    pixels = np.full((64, 64), 0.5, dtype=np.float32)
    pixels[3, 4] = np.nan
    raises(lambda: edit_source(Image.fromarray(pixels, mode="F")), "image", "NaN")
    raises(lambda: sized_edit_source(Image.fromarray(pixels, mode="F"), 64, 64), "image", "NaN")


def test_sizes_in_range_still_work():
    assert edit_source(Image.new("RGB", (1600, 100))).size == (1600, 96)


# ------------------------------------------------------------------------------------ with the loaded model
def test_the_sampled_source_latent_is_the_official_context(model):
    """sample_edit_latent: the raw VAE latent (fp32) the Edit Context Encoder gives as 'context'; scaled and packed
    as the MMDiT reads it, it is the official edit context."""
    p = case_params("edit")
    latent = sample_edit_latent(model.vae, edit_source(edit_input()), p["vae_sample_seed"])
    assert latent.shape == (1, 4, 8, 12) and latent.dtype == torch.float32
    packed = pack_latents(vae_to_latent(latent, model.params.vae))
    assert_golden(packed, tensors("edit")["context.tokens"], "context.tokens")
    again = sample_edit_latent(model.vae, edit_source(edit_input()), p["vae_sample_seed"])
    assert torch.equal(again, latent)
    other = sample_edit_latent(model.vae, edit_source(edit_input()), p["vae_sample_seed"] + 1)
    assert not torch.equal(other, latent)
    raises(lambda: sample_edit_latent(model.vae, edit_source(edit_input()), -1), "seed")


def test_the_condition_of_a_sized_source_is_the_golden(model, resizes):
    """encode_condition given the edit size takes the source as it is: the golden states, no second resize of the
    source (the only resizes are the visual encoder's own preprocessing of source and canvas)."""
    p, g = case_params("edit"), tensors("edit")
    source = edit_source(edit_input())
    resizes.clear()
    condition = model.encode_condition(p["prompt"], "edit", image=source, width=96, height=64)
    assert (condition.width, condition.height) == (96, 64)
    assert resizes and all(target != (96, 64) for _, target in resizes)  # nothing resized to the edit size again
    for branch in prompts.BRANCHES["edit"]:
        assert_golden(condition.branches[branch], g[f"{branch}.txt"], f"{branch}.txt")


def test_a_wrong_size_source_is_refused_before_text_is_encoded(model, monkeypatch):
    monkeypatch.setattr(prompts, "condition_ids", lambda *a: pytest.fail("text encoded before the check"))
    raises(lambda: model.encode_condition("add a hat", "edit", image=edit_input(), width=96, height=64),
           "image is 90×60", "'resized_image'")
