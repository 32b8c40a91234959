"""Size rules of the official pipeline, pure arithmetic on pixel sizes (no image, no tensor): the Qwen2-VL
``smart_resize`` the visual tokenizer uses (official modeling_ovis_u1.py, Aimv2VisualTokenizer.smart_resize) and the
edit output size built on it (official test_img_edit.py, pipe_img_edit). A leaf below both the input checks
(``ovis_u1.inputs``) and the preprocessing (``ovis_u1.preprocess``), which re-exports these names.
"""

from __future__ import annotations

import math
import warnings

# EDIT output size — the Qwen2-VL smart_resize defaults with factor 32 (official test_img_edit.py, pipe_img_edit).
EDIT_FACTOR = 32
EDIT_MIN_PIXELS = 56 * 56
EDIT_MAX_PIXELS = 14 * 14 * 4 * 1280


def _to_multiple(value: float, factor: int, rounding) -> int:
    """``value`` snapped to a multiple of ``factor``: ``rounding`` (round / floor / ceil) applied to value / factor."""
    return int(rounding(value / factor)) * factor


def _usable_shape(height: int, width: int, factor: int) -> tuple[int, int]:
    """The two pre-adjustments of the Ovis/Qwen2-VL resize (official Aimv2VisualTokenizer.smart_resize), each with
    a warning: a side shorter than ``factor`` brings the short side up to ``factor`` (the long side follows in
    proportion, rounded), else an aspect ratio above 200 has its long side cut to 200 × the short side."""
    short, long = sorted((height, width))
    height_is_short = height < width
    if short < factor:
        warnings.warn(f"smart_resize: height {height} or width {width} is smaller than factor {factor}; "
                      f"scaling the short side up to {factor}", stacklevel=3)
        short, long = factor, round(factor / short * long)
    elif long / short > 200:
        warnings.warn(f"smart_resize: aspect ratio {long / short} is above 200; clamping it to 200", stacklevel=3)
        long = 200 * short
    else:
        return height, width
    return (short, long) if height_is_short else (long, short)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """(height, width) near the input, both multiples of ``factor``, area kept within [min_pixels, max_pixels]
    (the Qwen2-VL rule Ovis-U1 uses: official modeling_ovis_u1.py, Aimv2VisualTokenizer.smart_resize).

    Each side is first rounded to the nearest multiple (Python's half-to-even ``round``). If that area is too
    large, both sides shrink by sqrt(area / max_pixels) and are floored to multiples; if too small, they grow by
    sqrt(min_pixels / area) and are ceiled. Float64 arithmetic in the official order, so sizes that land exactly on
    a multiple stay where the official code puts them.
    """
    height, width = _usable_shape(height, width, factor)
    sides = (height, width)
    snapped = tuple(_to_multiple(side, factor, round) for side in sides)
    area = snapped[0] * snapped[1]
    if area > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        snapped = tuple(_to_multiple(side / shrink, factor, math.floor) for side in sides)
    elif area < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        snapped = tuple(_to_multiple(side * grow, factor, math.ceil) for side in sides)
    return snapped


def edit_target_size(width: int, height: int) -> tuple[int, int]:
    """EDIT output size (W, H) for an input of width×height (official test_img_edit.py, pipe_img_edit):
    smart_resize with factor 32 and the default bounds, then both sides floored to multiples of 16 (as
    generate_image does)."""
    h, w = smart_resize(height, width, factor=EDIT_FACTOR, min_pixels=EDIT_MIN_PIXELS, max_pixels=EDIT_MAX_PIXELS)
    return 16 * (w // 16), 16 * (h // 16)
