"""Bicubic resampling that gives exactly Pillow 10.3.0's uint8 pixels, whatever Pillow is installed (issue 11).

The official Ovis-U1 environment pins ``pillow==10.3.0`` and every resize on the way into the model is its
``Image.resize(size, BICUBIC)`` with ``reducing_gap=None`` (transformers' CLIP processor, torchvision's PIL
resize and the direct calls all leave it unset). Newer Pillow releases give other pixels for some shapes, so the
pack computes the resize itself. Behaviour of Pillow 10.3.0 (``src/libImaging/Resample.c``) reproduced here:

* two separable passes, always **horizontal first**, then vertical; a pass is skipped when its side keeps its size
  (and no pass at all when both do: a copy);
* the **intermediate image is uint8**: each pass rounds its fixed-point sum (add half, arithmetic shift right by the
  precision) and clips to 0..255 before the next pass reads it;
* per output index ``i`` along a side of ``n_in → n_out``: ``scale = n_in / n_out``, ``filterscale = max(scale, 1)``,
  support ``2 · filterscale`` (Keys cubic, a = −0.5, support 2), ``center = (i + 0.5) · scale``, taps from
  ``int(center − support + 0.5)`` (≥ 0) to ``int(center + support + 0.5)`` (≤ n_in), weight
  ``cubic((tap − center + 0.5) / filterscale)``, all in float64, then divided by their sum (summed tap by tap);
* weights become **22-bit fixed point** (``PRECISION_BITS = 32 − 8 − 2``), rounded half away from zero by
  ``int(w · 2²² ± 0.5)``; a pixel is ``clip8((2²¹ + Σ pixel · weight) >> 22)`` — exact integer arithmetic.

Only the coefficients follow Pillow's loop structure; the sums are batched matrix products over overlapping windows,
in float32 with the weights split in two 11-bit limbs (every product and partial sum is then an integer below 2²⁴,
so the result is exact whatever the summation order), or in float64 for reductions beyond about 13×.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

PRECISION_BITS = 22          # Pillow 10.3.0: 32 - 8 - 2
CUBIC_A = -0.5               # Keys' cubic convolution parameter used by Pillow's BICUBIC
CUBIC_SUPPORT = 2.0
LIMB_BITS = 11               # float32 path: weights split as hi·2**11 + lo
WINDOW_OUTPUTS = 8           # outputs per window on average (wider windows waste multiplies, narrower ones batch)
CHUNK_ROWS = 128             # rows resampled together (their buffer stays in cache)


def _cubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel, evaluated with the same float64 operation order as its C source."""
    x = np.abs(x)
    near = ((CUBIC_A + 2.0) * x - (CUBIC_A + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * CUBIC_A
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def fixed_point_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output index: the first source index and the 22-bit integer weights (zero-padded to one width).

    Returns ``(first [n_out] int64, weights [n_out, taps] int64)``; weight ``j`` of output ``i`` applies to source
    index ``first[i] + j``. Pillow's float64 steps are kept in its order so the rounding to integers matches it.
    """
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = CUBIC_SUPPORT * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    center = (np.arange(n_out, dtype=np.float64) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    stop = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), n_in)
    j = np.arange(taps)
    used = j[None, :] < (stop - first)[:, None]
    w = _cubic(((first[:, None] + j[None, :]).astype(np.float64) - center[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(used, w, 0.0)
    total = np.zeros(n_out, dtype=np.float64)
    for col in range(taps):               # Pillow sums tap by tap; keep that order for the same float64 sum
        total = total + w[:, col]
    w = np.where((total != 0.0)[:, None], w / np.where(total != 0.0, total, 1.0)[:, None], w)
    scaled = w * float(1 << PRECISION_BITS)
    fixed = np.trunc(np.where(w < 0, scaled - 0.5, scaled + 0.5)).astype(np.int64)
    return first, np.where(used, fixed, 0)


@dataclass(frozen=True)
class PassPlan:
    """One pass ``n_in → n_out`` as a batch of small matrix products over overlapping windows of the input.

    Window ``b`` covers inputs ``[b·stride, b·stride + span)`` and computes up to ``per`` outputs (those whose first
    tap falls in ``[b·stride, (b+1)·stride)``); ``kernel[b]`` holds their integer weights, split in two limbs
    (``w = hi·2¹¹ + lo``) when float32 holds every partial sum exactly, else as one float64 limb.
    ``order[i]`` is the row of output ``i`` in the ``[blocks·per]`` result.
    """

    kernel: torch.Tensor      # [blocks, limbs·per, span]
    order: torch.Tensor       # [n_out] int64
    blocks: int
    per: int
    stride: int
    span: int
    padded: int               # buffer length: n_in, or more (zeros) so that the last window stays inside
    two_limbs: bool


@lru_cache(maxsize=64)
def pass_plan(n_in: int, n_out: int) -> PassPlan:
    first, fixed = fixed_point_weights(n_in, n_out)
    taps = fixed.shape[1]
    stride = max(1, round(WINDOW_OUTPUTS * n_in / n_out))
    span = stride + taps
    block = first // stride                 # first is non-decreasing, so a window holds consecutive outputs
    blocks = int(block[-1]) + 1
    counts = np.bincount(block, minlength=blocks)
    per = int(counts.max())
    slot = np.arange(n_out) - np.concatenate([[0], np.cumsum(counts)[:-1]])[block]
    kernel = np.zeros((blocks, per, span), dtype=np.int64)
    out_idx, tap = np.nonzero(fixed)
    kernel[block[out_idx], slot[out_idx], first[out_idx] - block[out_idx] * stride + tap] = fixed[out_idx, tap]
    # float32 is exact while every partial sum stays below 2**24: |pixel·lo| ≤ 255·2**10 per tap plus the 2**21
    # rounding offset (the hi-limb sums stay near 255·2**11).
    two_limbs = 255 * (1 << (LIMB_BITS - 1)) * taps + (1 << (PRECISION_BITS - 1)) < (1 << 24)
    if two_limbs:
        half = 1 << (LIMB_BITS - 1)
        lo = (kernel + half) % (1 << LIMB_BITS) - half
        hi = (kernel - lo) >> LIMB_BITS
        weights = torch.from_numpy(np.concatenate([hi, lo], axis=1).astype(np.float32))
    else:
        weights = torch.from_numpy(kernel.astype(np.float64))
    return PassPlan(weights, torch.from_numpy(block * per + slot), blocks, per, stride, span,
                    max(n_in, (blocks - 1) * stride + span), two_limbs)


def _round_to_uint8(acc: torch.Tensor, plan: PassPlan) -> torch.Tensor:
    """Pillow's ``clip8((2**21 + Σ) >> 22)`` of the exact sums in ``acc`` (modified in place) → uint8."""
    if plan.two_limbs:
        hi, lo = acc[:, :plan.per], acc[:, plan.per:]
        # floor((hi·2**11 + lo + 2**21) / 2**22) == floor((hi + floor((lo + 2**21) / 2**11)) / 2**11), all exact
        lo.add_(float(1 << (PRECISION_BITS - 1))).mul_(1.0 / (1 << LIMB_BITS)).floor_()
        out = hi.add_(lo).mul_(1.0 / (1 << (PRECISION_BITS - LIMB_BITS)))
    else:
        out = acc.add_(float(1 << (PRECISION_BITS - 1))).mul_(1.0 / (1 << PRECISION_BITS))
    return out.floor_().clamp_(0.0, 255.0).to(torch.uint8)


def _pass_last_axis(load, n_rows: int, n_in: int, out: torch.Tensor) -> None:
    """Resample ``n_rows`` rows of length ``n_in`` along their length into ``out`` [n_out, n_rows] (transposed).

    ``load(r0, r1, dst)`` copies source rows r0..r1 into ``dst`` ([r1 - r0, n_in]). Rows go in chunks whose buffer
    stays in cache; the windows are strided views of that buffer (no copy).
    """
    plan = pass_plan(n_in, out.shape[0])
    buffer = torch.zeros(CHUNK_ROWS, plan.padded, dtype=plan.kernel.dtype)
    for r0 in range(0, n_rows, CHUNK_ROWS):
        r1 = min(n_rows, r0 + CHUNK_ROWS)
        load(r0, r1, buffer[:r1 - r0, :n_in])
        windows = buffer.as_strided((plan.blocks, plan.span, r1 - r0), (plan.stride, 1, plan.padded))
        acc = torch.bmm(plan.kernel, windows)                       # [blocks, limbs·per, rows]
        rows = _round_to_uint8(acc, plan).reshape(plan.blocks * plan.per, r1 - r0)
        out[:, r0:r1] = rows.index_select(0, plan.order)


def resize_array(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 [H, W] or [H, W, C] → uint8 [height, width(, C)], bit-exact to Pillow 10.3.0 bicubic."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError(f"resize_array: expected a uint8 [H, W] or [H, W, C] array, got {pixels.dtype} "
                         f"{pixels.shape}")
    if width < 1 or height < 1:
        raise ValueError(f"resize_array: target size {width}x{height} must be at least 1x1")
    image = torch.from_numpy(np.array(pixels, copy=True).reshape(pixels.shape[0], pixels.shape[1], -1))
    in_h, in_w, channels = image.shape
    if (in_w, in_h) == (width, height):
        return image.numpy().reshape(pixels.shape)
    if in_w != width:                      # horizontal pass first; its result is laid out (x, channel, y)
        columns = torch.empty(width, channels, in_h, dtype=torch.uint8)
        for c in range(channels):
            _pass_last_axis(lambda r0, r1, dst, c=c: dst.copy_(image[r0:r1, :, c]), in_h, in_w, columns[:, c])
        columns = columns.view(width * channels, in_h)
    else:
        columns = image.permute(1, 2, 0).reshape(in_w * channels, in_h)
    if in_h != height:                     # vertical pass; its transposed result is (y, x, channel) again
        out = torch.empty(height, width * channels, dtype=torch.uint8)
        _pass_last_axis(lambda r0, r1, dst: dst.copy_(columns[r0:r1]), width * channels, in_h, out)
        out = out.view(height, width, channels)
    else:
        out = columns.view(width, channels, in_h).permute(2, 0, 1)
    return np.ascontiguousarray(out.numpy()).reshape((height, width) + pixels.shape[2:])


def resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``img.resize(size, BICUBIC)`` as Pillow 10.3.0 computes it (``size`` is (width, height), as in Pillow).

    Accepts the 8-bit modes the pipeline feeds it ("RGB", "L"); other modes are converted by the caller first.
    """
    if img.mode not in ("RGB", "L"):
        raise ValueError(f"resample.resize: image mode {img.mode!r} is not supported; convert to 'RGB' first")
    width, height = (int(v) for v in size)
    return Image.fromarray(resize_array(np.asarray(img), width, height))
