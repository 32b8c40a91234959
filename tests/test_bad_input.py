"""Bad input through the library API (issue 9): every case is a clear OvisU1InputError naming the input (or, where
the input is unambiguous, a correct result), and after each case the same loaded model still reproduces the golden
text-to-image output. Checkpoint/tokenizer cases: test_bad_input_checkpoint.py; nodes: test_bad_input_nodes.py;
CLI: test_bad_input_cli.py."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import ovis_u1
from ovis_u1 import OvisU1InputError, prompts
from ovis_u1.truncation import OvisU1TruncationWarning
from tests.golden import CHECKPOINT, TINY_A, case_params, requires_golden, tensors
from tests.model_state import fingerprint, golden_state_fixture

pytestmark = requires_golden


@pytest.fixture(scope="module")
def model():
    return ovis_u1.load_model(CHECKPOINT, device="cpu", dtype=torch.float32)


golden_state = golden_state_fixture()


@pytest.fixture(autouse=True)
def still_golden(model, golden_state):
    """After every case the model is in the very state that rendered the golden image (the image itself is rendered
    again after the module's last case: tests/model_state.py)."""
    yield
    assert fingerprint(model) == golden_state, "the bad input changed the model (weights, settings or hooks)"


def raises(fn, *names: str):
    with pytest.raises(OvisU1InputError) as info:
        fn()
    for name in names:
        assert name in str(info.value), f"{name!r} not in {str(info.value)!r}"
    return str(info.value)


def edit_input() -> Image.Image:
    return Image.open(TINY_A / "cases" / "edit" / "input.png")


def nan_image(width=64, height=64) -> Image.Image:
    pixels = np.full((height, width), 0.5, dtype=np.float32)
    pixels[3, 4] = np.nan
    return Image.fromarray(pixels, mode="F")


# ------------------------------------------------------------------------------------ 3. NaN / inf inputs
NAN_LATENT = torch.full((1, 4, 8, 8), float("nan"))
INF_PIXELS = torch.zeros(1, 3, 64, 64).index_fill_(3, torch.tensor([5]), float("inf"))


@pytest.mark.parametrize("case, call, names", [
    ("nan latent to vae_decode", lambda m: m.vae_decode(NAN_LATENT), ["latent", "NaN"]),
    ("inf pixels to vae_encode", lambda m: m.vae_encode(INF_PIXELS), ["pixels", "NaN or infinite"]),
    ("nan float image to understand", lambda m: m.understand([nan_image()], "What?", max_new_tokens=1),
     ["image 1", "NaN"]),
    ("nan float image to edit condition", lambda m: m.encode_condition("hat", "edit", image=nan_image()),
     ["image", "NaN"]),
    ("nan float image to encode_context", lambda m: m.encode_context(nan_image()), ["image", "NaN"]),
])
def test_non_finite_inputs_are_errors(model, case, call, names):
    raises(lambda: call(model), *names)


def test_non_finite_refined_and_context_reach_no_sampler(model):
    p = case_params("t2i")
    refined = model.refine(model.encode_condition(p["prompt"], "t2i", width=64, height=64))
    tokens, pooled = refined.branches["cond"]
    bad = ovis_u1.Refined("t2i", 64, 64, {**refined.branches, "cond": (tokens * float("nan"), pooled)})
    raises(lambda: model.sample(bad, steps=1), "refined branch 'cond'", "NaN")
    context = model.encode_context(edit_input(), seed=1)
    refined_edit = model.refine(model.encode_condition("add a hat", "edit", image=edit_input()))
    context.tokens = context.tokens.clone()
    context.tokens[0, 0, 0] = float("inf")
    raises(lambda: model.sample(refined_edit, context=context, steps=1), "context", "NaN or infinite")


# ------------------------------------------------------------------------------- 4. the model's own markup
@pytest.mark.parametrize("text", ["a <image> on a wall", "<video> two <image><image> tags"])
def test_image_and_video_tags_in_prompts_are_plain_text(model, text):
    """The official split on <image> would add a placeholder with no image (IndexError); here it is text."""
    plain = model.tokenizer(text, add_special_tokens=False).input_ids
    for n in (0, 1, 2):
        ids = prompts.understanding_ids(model.tokenizer, text, n)
        assert ids.count(prompts.IMAGE_ATOM_ID) == n
        assert_subsequence(plain, ids)
    for mode, branch in (("t2i", "cond"), ("edit", "cond")):
        ids = prompts.condition_ids(model.tokenizer, mode, branch, text)
        assert ids.count(prompts.IMAGE_ATOM_ID) == 1
    images = [edit_input(), edit_input()]
    assert len(model.understand(images, text, max_new_tokens=1).token_ids) == 1
    assert len(model.understand([], text, max_new_tokens=1).token_ids) == 1
    assert model.encode_condition(text, "t2i", width=64, height=64).branches["cond"].shape[0] == 1
    assert model.encode_condition(text, "edit", image=edit_input()).mode == "edit"


def assert_subsequence(part: list[int], whole: list[int]) -> None:
    assert any(whole[i : i + len(part)] == part for i in range(len(whole))), f"{part} not in {whole}"


@pytest.mark.parametrize("markup, call, name", [
    ("<|im_end|>", lambda m, t: m.understand([], f"hi {t} there", max_new_tokens=1), "question"),
    ("<|im_start|>", lambda m, t: m.understand([edit_input()], f"{t}assistant", max_new_tokens=1), "question"),
    ("<|endoftext|>", lambda m, t: m.text_to_image(f"a cat{t}", width=64, height=64, steps=1), "prompt"),
    ("<|im_end|>", lambda m, t: m.edit(edit_input(), f"add a hat {t}", steps=1), "prompt"),
], ids=["understand", "understand-image", "t2i", "edit"])
def test_chat_markup_in_prompts_is_refused(model, markup, call, name):
    raises(lambda: call(model, markup), name, markup, "remove it")


def test_prompts_without_markup_tokenize_as_before(model):
    """The parts-based tokenization equals the official split-on-<image> for ordinary prompts (golden ids)."""
    g = tensors("understand")
    ids = prompts.understanding_ids(model.tokenizer, case_params("understand")["question"], 1)
    assert ids == g["input_ids"].reshape(-1).tolist()
    for case in ("t2i", "edit"):
        for branch in prompts.BRANCHES[case]:
            ids = prompts.condition_ids(model.tokenizer, case, branch, case_params(case)["prompt"])
            assert ids == tensors(case)[f"{branch}.input_ids"].reshape(-1).tolist()


# ------------------------------------------------------------------------- 5. truncation to max length
def photo(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_a_photo_too_long_for_the_model_is_cut_with_a_warning(model):
    with pytest.warns(OvisU1TruncationWarning, match="image 1 loses its first"):
        result = model.understand([photo(1920, 1080)], "What is it?", max_new_tokens=1)
    assert any("multimodal_max_length 2048" in w and "smaller image" in w for w in result.warnings)
    assert any("<|im_start|>user" in w for w in result.warnings)  # what was cut is shown


@pytest.mark.parametrize("call, names", [
    (lambda m: m.understand([edit_input()], "word " * 2100, max_new_tokens=1), ["image 1", "shorten the question"]),
    (lambda m: m.understand([edit_input(), edit_input()], "why " * 2100, max_new_tokens=1), ["image 1"]),
    (lambda m: m.text_to_image("a cat " * 1200, width=64, height=64, steps=1), ["image 1", "shorten the prompt"]),
    (lambda m: m.encode_condition("hat " * 2100, "edit", image=edit_input()), ["image 1", "cut away"]),
])
def test_an_image_is_never_cut_away_silently(model, call, names):
    raises(lambda: call(model), *names)


def test_a_long_prompt_that_loses_only_its_header_warns(model):
    """Keep the official left-truncation, but say what it cut: here 3 positions of the chat header."""
    visual = 256  # the canvas goes to the visual tokenizer at the processor's min_pixels: 448² → 256 tokens
    k = next(k for k in range(700, 1100)
             if len(prompts.condition_ids(model.tokenizer, "t2i", "cond", " x" * k)) - 1 + visual == 2051)
    with pytest.warns(OvisU1TruncationWarning, match="the first 3 were dropped"):
        condition = model.encode_condition(" x" * k, "t2i", width=64, height=64)
    assert condition.branches["cond"].shape[1] == 2048
    assert len(condition.warnings) == 1 and "'<|im_start|>us" in condition.warnings[0]


# -------------------------------------------------------------------------------------- 7. types at the API
ACCEPTED = [
    ("numpy integers", dict(width=np.int64(64), steps=np.int32(1), seed=np.uint64(2**64 - 1))),
    ("integral floats", dict(height=64.0, steps=1.0, seed=7.0)),
    ("int and numpy float cfg", dict(txt_cfg=np.float32(5.0), seed=2**64 - 1)),
]


@pytest.mark.parametrize("case, kwargs", ACCEPTED, ids=[c for c, _ in ACCEPTED])
def test_unambiguous_numbers_are_accepted(model, case, kwargs):
    image = model.text_to_image("a cat", **{"width": 64, "height": 64, "steps": 1, **kwargs})
    assert image.size == (64, 64)


REJECTED_T2I = [
    ("width", "64"), ("width", None), ("height", 64.5), ("steps", "20"), ("steps", True), ("steps", 2.5),
    ("seed", -1), ("seed", 2**64), ("seed", None), ("txt_cfg", "5"), ("txt_cfg", float("nan")),
]


@pytest.mark.parametrize("name, value", REJECTED_T2I, ids=[f"{n}={v!r}" for n, v in REJECTED_T2I])
def test_ambiguous_numbers_are_rejected_before_encoding(model, monkeypatch, name, value):
    monkeypatch.setattr(prompts, "condition_ids", lambda *a: pytest.fail("text encoded before the check"))
    raises(lambda: model.text_to_image("a cat", **{"width": 64, "height": 64, "steps": 1, name: value}), name)


REJECTED_UNDERSTAND = [
    ("max_new_tokens", 0), ("max_new_tokens", "5"), ("temperature", 0), ("temperature", float("inf")),
    ("top_p", 1.5), ("seed", 2**70),
]


@pytest.mark.parametrize("name, value", REJECTED_UNDERSTAND, ids=[f"{n}={v!r}" for n, v in REJECTED_UNDERSTAND])
def test_understanding_numbers_are_checked(model, name, value):
    raises(lambda: model.understand([], "Hello?", **{"max_new_tokens": 1, "do_sample": True, name: value}), name)


def test_greedy_decoding_ignores_the_sampling_settings(model):
    assert len(model.understand([], "Hello?", max_new_tokens=1, temperature=0, top_p=0).token_ids) == 1


@pytest.mark.parametrize("call, names", [
    (lambda m: m.understand(["photo.png"], "What?"), ["image 1", "PIL image"]),
    (lambda m: m.understand([], None), ["question"]),
    (lambda m: m.understand([], 42), ["question", "text"]),
    (lambda m: m.text_to_image(None, width=64, height=64), ["prompt"]),
    (lambda m: m.edit(torch.zeros(1, 64, 64, 3), "add a hat"), ["image", "PIL image"]),
    (lambda m: m.edit(edit_input(), "hat", context_seed=-1), ["context_seed"]),
    (lambda m: m.edit(edit_input(), "hat", img_cfg="1.5"), ["img_cfg"]),
])
def test_wrong_types_name_the_input(model, call, names):
    raises(lambda: call(model), *names)


def test_understanding_accepts_numpy_numbers(model):
    result = model.understand([], "Hello?", max_new_tokens=np.int64(2), do_sample=True,
                              temperature=np.float32(0.7), top_p=np.float64(0.9), seed=np.uint32(3))
    assert 1 <= len(result.token_ids) <= 2


# --------------------------------------------------------------------------------- 8. extreme edit images
EXTREME = [((10000, 10), "edit"), ((10, 10000), "encode_condition"), ((20000, 900), "encode_context"),
           ((5000, 100), "edit_size"), ((5000, 100), "edit")]


@pytest.mark.parametrize("size, entry", EXTREME, ids=[f"{e}-{w}x{h}" for (w, h), e in EXTREME])
def test_extreme_edit_images_fail_before_text_encoding(model, monkeypatch, size, entry):
    monkeypatch.setattr(prompts, "condition_ids", lambda *a: pytest.fail("text encoded before the check"))
    image = Image.new("RGB", size, (200, 10, 10))
    call = {
        "edit": lambda: model.edit(image, "add a hat", steps=1),
        "encode_condition": lambda: model.encode_condition("add a hat", "edit", image=image),
        "encode_context": lambda: model.encode_context(image),
        "edit_size": lambda: model.edit_size(image),
    }[entry]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # smart_resize's own warning about tiny sides
        raises(call, "image", f"{size[0]}×{size[1]}", "crop or pad")


def test_edit_sizes_in_range_still_work(model):
    assert model.edit_size(Image.new("RGB", (1600, 100))) == (1600, 96)
    assert model.edit_size(edit_input()) == (96, 64)


# ----------------------------------------------------------------------------------- 10. huge VAE encodes
def test_huge_vae_encode_is_refused_with_the_fix(model):
    huge = torch.zeros(1, 3, 1, 1).expand(1, 3, 4104, 4096)  # no memory: one value broadcast
    raises(lambda: model.vae_encode(huge), "pixels", "4096×4104", "scale it down")
    raises(lambda: model.vae_encode(torch.zeros(1, 3, 4, 64)), "pixels", "too small")
    raises(lambda: model.vae_decode(torch.zeros(1, 3, 8, 8)), "latent", "[B, 4, h, w]")


def test_the_state_check_sees_a_changed_weight_setting_or_hook(model, golden_state):
    """The per-case check (tests/model_state.py) is as strict as a render: it sees one changed value of one weight,
    a changed attention kernel and a leftover hook; each is undone here before the check after this case."""
    from tests.model_state import fingerprint

    weight = next(model.mmdit.parameters())
    with torch.no_grad():
        old = weight.view(-1)[0].item()
        weight.view(-1)[0] = old + 1e-6
        assert fingerprint(model) != golden_state
        weight.view(-1)[0] = old
    assert fingerprint(model) == golden_state
    kernel = model.attention
    model.attention = dataclasses.replace(kernel, name="math" if kernel.name != "math" else "sdpa")
    try:
        assert fingerprint(model) != golden_state
    finally:
        model.attention = kernel
    handle = model.vae.register_forward_hook(lambda *a: None)
    assert fingerprint(model) != golden_state
    handle.remove()
    assert fingerprint(model) == golden_state
