"""Validation of what a user hands the public API: numbers, sizes, prompts, images and latents.

Every check raises ``OvisU1InputError`` with a message that names the input and the fix, so that no raw
``TypeError``, ``IndexError`` or torch ``RuntimeError`` reaches a user. Each validator returns the normalised value.

What counts as unambiguous (accepted): Python and numpy integers, and floats (Python or numpy) with an integral value,
where a whole number is needed; any real number (not bool) where a float is needed. Rejected: ``bool`` (``True`` as a
step count is a wiring mistake), strings (the nodes and the CLI already deliver numbers, so a string at the API is a
bug upstream — e.g. the prompt passed as ``steps`` — that should surface, not be parsed), ``None`` where no default
exists, NaN and infinities.
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch
from PIL import Image

from .errors import OvisU1InputError  # noqa: F401 — re-exported: defined here first
from .sizes import edit_target_size

MIN_SIZE, MAX_SIZE, SIZE_MULTIPLE = 64, 4096, 16
MAX_ENCODE_PIXELS = MAX_SIZE * MAX_SIZE  # the largest image the sampler makes; VAE Encode refuses larger ones
MAX_CFG = 100.0
MAX_SEED = 2**64 - 1


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def as_int(value, name: str, minimum: int | None = None, maximum: int | None = None, fix: str = "") -> int:
    """A whole number from an int, a numpy integer or an integral float; anything else names ``name`` and ``fix``."""
    hint = f"; {fix}" if fix else ""
    if not _is_real(value):
        raise OvisU1InputError(f"{name} {value!r} ({type(value).__name__}) is not a whole number{hint}")
    if isinstance(value, numbers.Integral):
        number = int(value)
    else:
        as_float = float(value)
        if not math.isfinite(as_float) or as_float != math.floor(as_float):
            raise OvisU1InputError(f"{name} {value!r} is not a whole number{hint}")
        number = int(as_float)
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        low = "" if minimum is None else f"at least {minimum}"
        high = "" if maximum is None else f"at most {maximum}"
        raise OvisU1InputError(f"{name} {value!r} is out of range: it must be {' and '.join(filter(None, (low, high)))}"
                               f"{hint}")
    return number


def as_float(value, name: str, low: float | None = None, high: float | None = None, low_open: bool = False,
             fix: str = "") -> float:
    """A finite real number in [low, high] (``(low, high]`` with ``low_open``)."""
    hint = f"; {fix}" if fix else ""
    if not _is_real(value) or not math.isfinite(float(value)):
        raise OvisU1InputError(f"{name} {value!r} is not a finite number{hint}")
    number = float(value)
    too_low = low is not None and (number <= low if low_open else number < low)
    if too_low or (high is not None and number > high):
        interval = f"{'(' if low_open else '['}{'' if low is None else f'{low:g}'}, {'' if high is None else f'{high:g}'}]"
        raise OvisU1InputError(f"{name} {value!r} is out of range: it must lie in {interval}{hint}")
    return number


def check_seed(seed, name: str = "seed") -> int:
    """Seeds are whole numbers 0..2**64−1 (what a torch generator accepts and what ComfyUI's seed widget offers)."""
    return as_int(seed, name, 0, MAX_SEED, fix=f"use a whole number between 0 and 2**64-1 = {MAX_SEED}")


def check_steps(steps, name: str = "steps") -> int:
    return as_int(steps, name, 1, None, fix="use a whole number of at least 1 (official default: 50)")


def check_max_new_tokens(value, name: str = "max_new_tokens") -> int:
    return as_int(value, name, 1, None, fix="use a whole number of at least 1 (e.g. 1024)")


def check_answer_fits(max_new_tokens: int, prompt_tokens: int, context: int, name: str = "max_new_tokens") -> int:
    """The prompt and the answer together must fit the LLM's context (``max_position_embeddings`` of its config, as
    transformers' ``generate`` bounds ``max_length``): RoPE positions past it were never trained, and the KV cache is
    allocated once for prompt + answer, so asking for more would allocate memory no answer can use."""
    room = context - prompt_tokens
    if max_new_tokens > room:
        raise OvisU1InputError(
            f"{name} {max_new_tokens} does not fit the model's context: the prompt takes {prompt_tokens} of its "
            f"{context} positions (llm_config.max_position_embeddings), which leaves {max(room, 0)} for the answer; "
            f"set {name} to at most {max(room, 1)}"
        )
    return max_new_tokens


COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_compute_dtype(dtype, name: str = "dtype") -> torch.dtype | None:
    """The dtype the model computes in: a floating dtype its layers run in, or None (the device's default)."""
    if dtype is None or dtype in COMPUTE_DTYPES:
        return dtype
    fp8 = "; to store weights in fp8 pass weight_dtype" if str(dtype).startswith("torch.float8") else ""
    raise OvisU1InputError(
        f"{name} {dtype!r} is not a dtype Ovis-U1 can compute in: use torch.bfloat16, torch.float16 or torch.float32 "
        f"(or None: bf16 where the device supports it, else fp32){fp8}"
    )


def check_sampling(temperature, top_p) -> tuple[float, float]:
    """Temperature > 0 and top_p in (0, 1] (for sampling; greedy decoding does not use them)."""
    temperature = as_float(temperature, "temperature", 0.0, None, low_open=True,
                           fix="use a value above 0 (1.0 samples from the model's distribution)")
    top_p = as_float(top_p, "top_p", 0.0, 1.0, low_open=True, fix="use a value in (0, 1] (1.0 disables it)")
    return temperature, top_p


def _nearest_size(value) -> int:
    try:
        nearest = round(float(value) / SIZE_MULTIPLE) * SIZE_MULTIPLE
    except (TypeError, ValueError, OverflowError):
        nearest = 1024
    return min(MAX_SIZE, max(MIN_SIZE, nearest))


def check_size(width, height, what: str = "width/height") -> tuple[int, int]:
    """Sizes must lie on the 16-pixel token grid (the official code silently floors; we say so instead).
    Returns (width, height) as Python ints."""
    sizes = []
    for name, v in (("width", width), ("height", height)):
        if v is None:
            raise OvisU1InputError(f"{name} is missing: {what} must be given, e.g. 1024")
        try:
            number = as_int(v, name)
        except OvisU1InputError:
            number = None
        if number is None or number % SIZE_MULTIPLE or not MIN_SIZE <= number <= MAX_SIZE:
            shown = repr(v) if _is_real(v) and not isinstance(v, numbers.Integral) else (
                str(int(v)) if _is_real(v) else f"{v!r} ({type(v).__name__})")
            raise OvisU1InputError(
                f"{name} {shown} is not usable: {what} must be a multiple of {SIZE_MULTIPLE} between "
                f"{MIN_SIZE} and {MAX_SIZE}; pick e.g. {_nearest_size(v) if _is_real(v) else 1024}"
            )
        sizes.append(number)
    return sizes[0], sizes[1]


def check_cfg(name: str, value) -> float:
    official = "5 for text-to-image, 6 for edit" if name == "txt_cfg" else "1.5"
    if not _is_real(value) or not 0.0 <= float(value) <= MAX_CFG:  # NaN fails the comparison too
        raise OvisU1InputError(
            f"{name} {value!r} is out of range: use a value between 0 and {MAX_CFG:g} (official default: {official})"
        )
    return float(value)


def check_prompt(prompt, name: str = "prompt") -> str:
    if prompt is not None and not isinstance(prompt, str):
        raise OvisU1InputError(f"{name} must be text, got {type(prompt).__name__}: pass a string")
    if not prompt or not prompt.strip():
        raise OvisU1InputError(f"{name} is empty: write what the image should show (or how to change it)")
    return check_characters(prompt, name)


def check_characters(text: str, name: str) -> str:
    """Text the tokenizer can encode: every character must exist in UTF-8. A lone UTF-16 surrogate (U+D800–U+DFFF,
    half of a pair; Python also makes them of bytes that are not UTF-8, e.g. in command-line arguments) is not a
    character, and the tokenizer fails on it with a TypeError that names nothing."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        where = f"character {e.start + 1}" + (f" of {len(text)}" if len(text) > 1 else "")
        context = text[max(0, e.start - 20) : e.start]  # e.start is the first such code point: this part is clean
        after = f" (after {context!r})" if context else ""
        raise OvisU1InputError(
            f"{name} contains U+{ord(text[e.start]):04X} at {where}{after}, half of a UTF-16 surrogate pair and "
            "not a character of its own (it comes from a broken copy and paste or from bytes that are not UTF-8); "
            f"remove it from the {name} or type the text again"
        ) from None
    return text


def check_finite(tensor: torch.Tensor, name: str, fix: str = "") -> torch.Tensor:
    """NaN or ±inf in an image or latent would pass through every layer as garbage (an all-NaN decode, or black once
    clamped); it is an error that names the input instead. One reduction over the tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise OvisU1InputError(f"{name}: expected a tensor, got {type(tensor).__name__}")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        hint = fix or "the node or code that produced it computed NaN/inf — check its inputs (e.g. an fp16 overflow)"
        raise OvisU1InputError(f"{name} contains {bad} NaN or infinite value(s) of {tensor.numel()}: {hint}")
    return tensor


def check_not_empty(batch: torch.Tensor, name: str, items: str, fix: str) -> torch.Tensor:
    """A batch (first dimension) with at least one of its ``items``: an empty one would reach torch.cat([]) or a
    convolution of nothing and fail there with an error that names neither the input nor the fix."""
    if batch.ndim >= 1 and batch.shape[0] == 0:
        raise OvisU1InputError(f"{name} is an empty batch (0 {items}, shape {list(batch.shape)}); {fix}")
    return batch


def check_latent(latent, name: str, channels: int) -> torch.Tensor:
    """A VAE latent [B, channels, h, w] with finite values."""
    if not isinstance(latent, torch.Tensor):
        raise OvisU1InputError(f"{name}: expected a latent tensor, got {type(latent).__name__}")
    check_not_empty(latent, name, "latents", f"there is nothing to decode: pass at least one latent [B, {channels}, "
                                             "h, w]")
    if latent.ndim == 4 and latent.shape[1] != channels:
        raise OvisU1InputError(
            f"{name}: a latent of {latent.shape[1]} channels (shape {list(latent.shape)}), but the Ovis-U1 VAE's "
            f"latents are [B, {channels}, h, w]; it comes from another model's VAE or sampler: connect a latent "
            "sampled with Ovis-U1's MODEL or encoded with its VAE"
        )
    if latent.ndim != 4 or latent.shape[0] == 0 or min(latent.shape[2:]) < 1:
        raise OvisU1InputError(
            f"{name}: expected a latent [B, {channels}, h, w] of the Ovis-U1 VAE, got shape {list(latent.shape)}; "
            "connect the output of an Ovis-U1 sampler or VAE encode"
        )
    if not latent.is_floating_point():
        raise OvisU1InputError(f"{name}: expected a floating-point latent, got {latent.dtype}")
    return check_finite(latent, name)


def check_pixels(pixels, name: str, max_pixels: int) -> torch.Tensor:
    """VAE encoder input [B, 3, H, W] in −1..1: finite, at least 8×8, at most ``max_pixels`` per image."""
    if not isinstance(pixels, torch.Tensor):
        raise OvisU1InputError(f"{name}: expected a pixel tensor, got {type(pixels).__name__}")
    check_not_empty(pixels, name, "images", "there is nothing to encode: pass at least one image [B, 3, H, W]")
    if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[0] == 0:
        raise OvisU1InputError(f"{name}: expected pixels [B, 3, H, W], got shape {list(pixels.shape)}")
    check_encodable_size(pixels.shape[3], pixels.shape[2], name, max_pixels)
    return check_finite(pixels, name)


def check_host_image(images, name: str, max_pixels: int | None = MAX_ENCODE_PIXELS) -> torch.Tensor:
    """An image batch as a host hands it to the VAE, channels last ([B, H, W, C], ComfyUI's IMAGE) → RGB [B, H, W, 3].
    C is 1 to 4, read as ``preprocess.to_rgb`` reads PIL's modes: gray (L) and gray + alpha (LA) become gray RGB, RGBA
    loses its alpha. At least 8×8, at most ``max_pixels`` per image (None: no cap, for a tiled encode), finite; the
    size is checked before the values, so an oversized image is refused without reading it."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        got = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise OvisU1InputError(f"{name}: expected an image batch [B, H, W, 3], got {got}; connect an IMAGE")
    check_not_empty(images, name, "images", "there is nothing to encode: connect at least one image")
    channels = images.shape[3]
    if not 1 <= channels <= 4:
        raise OvisU1InputError(f"{name}: an image of {channels} channels; Ovis-U1's VAE encodes RGB (gray, gray + "
                               "alpha and RGBA are converted): convert it to RGB first")
    if not images.is_floating_point():
        raise OvisU1InputError(f"{name}: expected a float IMAGE with values 0..1, got {images.dtype}; convert it "
                               "(divide 8-bit values by 255)")
    check_encodable_size(images.shape[2], images.shape[1], name, max_pixels)
    check_finite(images, name, "the node that made this image computed NaN/inf; fix or replace that node (NaN is "
                               "never treated as black here)")
    return images[..., :1].expand(-1, -1, -1, 3) if channels < 3 else images[..., :3]


def check_encodable_size(width: int, height: int, name: str, max_pixels: int | None) -> None:
    """At least 8×8 (one latent cell) and at most ``max_pixels`` (None: any)."""
    if height < 8 or width < 8:
        raise OvisU1InputError(f"{name}: {width}×{height} is too small to encode (at least 8×8); scale it up first "
                               "(e.g. with the core 'Upscale Image' node, ImageScale)")
    if max_pixels is not None:
        check_image_area(width, height, name, max_pixels)


def check_image_area(width: int, height: int, name: str, max_pixels: int) -> None:
    if width * height > max_pixels:
        side = int(math.sqrt(max_pixels))
        raise OvisU1InputError(
            f"{name}: {width}×{height} is too large to VAE-encode ({width * height} pixels, at most {max_pixels} = "
            f"{side}×{side}); scale it down first (e.g. with the core 'Upscale Image' node, ImageScale, or any image "
            "editor)"
        )


def check_latent_size(shape, name: str) -> tuple[int, int]:
    """(width, height) in pixels of a VAE latent [..., h, w] (8 pixels a cell) to be sampled: the sizes
    ``check_size`` allows, so that the MMDiT samples nothing the API refuses."""
    return check_size(shape[-1] * 8, shape[-2] * 8, f"{name} width and height (8 pixels per latent cell)")


def check_pil_image(image, name: str = "image"):
    """A PIL image whose pixels can be read; a float image ('F' mode) must be finite."""
    if not isinstance(image, Image.Image):
        raise OvisU1InputError(
            f"{name}: expected a PIL image, got {type(image).__name__}; open files with PIL.Image.open(path)"
        )
    if image.width < 1 or image.height < 1:
        raise OvisU1InputError(f"{name} is empty ({image.width}×{image.height}): use a real image")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt files fail only when decoded
        raise OvisU1InputError(f"{name} cannot be decoded ({e}); the file is truncated or corrupt — save it again") from e
    if image.mode in ("F", "I;16F") or image.mode.startswith("F"):
        if not np.isfinite(np.asarray(image, dtype=np.float64)).all():
            raise OvisU1InputError(f"{name} contains NaN or infinite pixel values: replace them before using it")
    return image


def check_edit_image(image, name: str = "image") -> tuple[int, int]:
    """The edit size of ``image`` (official test_img_edit.py, pipe_img_edit), which the user cannot choose: it
    follows the image's aspect ratio at about one megapixel. Very long thin or tiny images give a size outside the
    model's range; say so before any text is encoded. Returns (width, height) of the edit."""
    width, height = image.size
    try:
        with warnings.catch_warnings():  # smart_resize's note about tiny sides; the error below says it better
            warnings.simplefilter("ignore")
            edit_w, edit_h = edit_target_size(width, height)
    except (ValueError, ZeroDivisionError, OverflowError):
        edit_w, edit_h = 0, 0
    if not (MIN_SIZE <= edit_w <= MAX_SIZE and MIN_SIZE <= edit_h <= MAX_SIZE):
        raise OvisU1InputError(
            f"{name} is {width}×{height}, which gives an edit size of {edit_w}×{edit_h}; the edit size follows the "
            f"image's shape (about one megapixel) and both sides must lie between {MIN_SIZE} and {MAX_SIZE}: crop or "
            "pad the image to an aspect ratio of at most 16:1 (and at least 64 pixels on each side) before editing"
        )
    return edit_w, edit_h


# Which of Encode Condition's optional inputs each mode reads, and what to connect when one is missing.
MODE_INPUTS = {
    "t2i": {"latent": "text-to-image draws on a canvas of the latent's size: connect the latent you will sample (e.g. "
                      "EmptyLatentImage)"},
    "edit": dict.fromkeys(("image", "context"), "an edit needs the 'resized_image' and the 'context' of 'Ovis-U1 Edit "
                                                "Context Encoder': connect both"),
}


# The edit inputs connected in text-to-image would be silently dropped; an edit ignores a connected latent (its size
# is the context's), as the latent's tooltip says, so that switching a text-to-image graph to edit keeps working.
REFUSED_INPUTS = {"t2i": ("image", "context"), "edit": ()}


def check_mode_inputs(mode: str, connected: dict, mode_name: str) -> None:
    """Every input of ``connected`` (name → value or None) that ``mode`` reads is there, and none it refuses."""
    for name in REFUSED_INPUTS[mode]:
        if connected.get(name) is not None:
            raise OvisU1InputError(f"{name}: mode {mode_name} does not use it; disconnect it, or pick mode edit")
    for name, fix in MODE_INPUTS[mode].items():
        if connected.get(name) is None:
            raise OvisU1InputError(f"{name}: {fix}")


def check_context_size(reference_shape, latent_shape) -> None:
    """An edit's source latent has the size of the latent sampled with it (shapes [..., h, w])."""
    if tuple(reference_shape[-2:]) != tuple(latent_shape[-2:]):
        raise OvisU1InputError(
            f"the edit context is {reference_shape[-1] * 8}×{reference_shape[-2] * 8} but the latent is "
            f"{latent_shape[-1] * 8}×{latent_shape[-2] * 8}: sample the 'latent' of the Edit Context Encoder"
        )


# Widths of other models' text states, to name where a foreign conditioning came from.
KNOWN_WIDTHS = {
    768: "a CLIP-L text encoder (SD 1.x)",
    1024: "an OpenCLIP-H text encoder (SD 2.x)",
    2048: "SDXL's CLIP-L + CLIP-G",
    3584: "Qwen2.5-VL (Qwen-Image)",
    4096: "a T5-XXL text encoder (FLUX, SD3, Wan, ...)",
}


def describe_foreign(states, pooled=None) -> str:
    """Where conditioning states (and a pooled vector) that are not Ovis-U1's most likely came from."""
    shape = list(states.shape) if hasattr(states, "shape") else type(states).__name__
    width = states.shape[-1] if hasattr(states, "shape") and states.ndim else None
    origin = KNOWN_WIDTHS.get(width, "another model's text encoder")
    extra = f" and a pooled_output of {pooled.shape[-1]}" if hasattr(pooled, "shape") else ""
    return f"states {shape}{extra}, most likely from {origin} (e.g. CLIPTextEncode)"


NOT_SAVABLE = ("model: Ovis-U1's MODEL cannot be saved as a single-file checkpoint; nothing could load it back "
               "without the LLM, visual encoder and tokenizer. Keep the checkpoint folder (models/ovis_u1) and save "
               "LoRAs or images instead")


def not_flow_matching(kind: str) -> OvisU1InputError:
    """The error of a sampling object (``kind``, e.g. ModelSamplingDiscrete) that is not flow matching."""
    return OvisU1InputError(
        f"model: its sampling is {kind}, which is not flow matching; Ovis-U1 predicts a flow velocity: remove the "
        "ModelSampling node that set it (ModelSamplingSD3, ModelSamplingFlux and ModelSamplingAuraFlow shift the "
        "schedule and work)"
    )
