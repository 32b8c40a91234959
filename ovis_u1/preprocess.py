"""Image preprocessing for the visual tokenizer and the generation path (official modeling_ovis_u1.py,
Aimv2VisualTokenizer.preprocess_image / smart_resize; build_inputs of test_txt_to_img.py / test_img_edit.py and
pipe_img_edit; modeling_yak.py, YakModel.process_image_aspectratio).

Pure functions over PIL images and tensors; no model state. The numerics follow the official pipeline step by step:

* every bicubic resize is ``resample.resize`` — Pillow 10.3.0's (the official pin) uint8 output computed by the pack,
  so the pixels do not depend on the installed Pillow (issue 11);
* the visual tokenizer input (Aimv2VisualTokenizer.preprocess_image) is what transformers' ``CLIPImageProcessor``
  produces — PIL bicubic resize of the uint8 image, ``float32(uint8 * (1/255 as float64))``, ``(x - mean) / std`` in
  float32 — patchified into 2×2 merge groups;
* the conditioning image of T2I / EDIT (the scripts' build_inputs) is first fitted to the target size
  (process_image_aspectratio) and shrunk to at most ``min_pixels`` by a second ``smart_resize``;
* the VAE input (process_image_aspectratio) is torchvision's ``to_tensor`` + ``normalize(0.5, 0.5)``, reproduced
  without torchvision.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from . import resample
from .config import PreprocessParams
from .errors import OvisU1InputError
from .sizes import edit_target_size, smart_resize  # noqa: F401 — re-exported: defined here first

# The conditioning image is shrunk with these bounds before preprocess_image (official build_inputs: smart_resize's
# default factor and min_pixels; max is the processor's min_pixels).
CONDITION_FACTOR = 28
CONDITION_MIN_PIXELS = 56 * 56

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any image Pillow opens → 8-bit RGB, the first step of every entry point (official
    Aimv2VisualTokenizer.preprocess_image and the test scripts).

    The official code calls ``img.convert("RGB")``. That is kept wherever it is meaningful — every 8-bit mode
    ("1", "L", "P", "RGB", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", …), so official inputs keep official pixels; alpha
    ("LA", "PA", "RGBA", "P" with transparency) is dropped as the official code drops it, not composited. It is
    replaced where Pillow clips instead of scaling:

    * 16-bit modes ("I;16", "I;16B", …) map their full range 0..65535 to 0..255 (``round(v / 257)``, so 8-bit data
      stored as 16-bit comes back exactly) — Pillow's conversion would turn a 16-bit photo almost white;
    * 32-bit integer "I" (what 16-bit PNG/TIFF files decode to in several Pillow versions): values within 0..65535
      are taken as 16-bit data as above; otherwise the range 0..2**31−1 is scaled to 0..255 (negatives clip to 0);
    * float "F": values all within [0, 1] are taken as normalised (× 255), otherwise as 0..255 levels (clipped);
      NaN or infinity is an error;
    * premultiplied "La" (which Pillow cannot convert to RGB) is un-premultiplied first, like "RGBa".
    """
    if img.mode == "RGB":
        return img
    if img.mode in SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        return Image.fromarray(_high_depth_to_uint8(np.asarray(img), img.mode)).convert("RGB")
    if img.mode == "La":
        img = img.convert("LA")
    return img.convert("RGB")


def _high_depth_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """One band of a 16/32-bit integer or float image → uint8 levels (rules in ``to_rgb``)."""
    if mode == "F":
        values = values.astype(np.float64)
        if not np.isfinite(values).all():
            raise OvisU1InputError("image: a float ('F' mode) image contains NaN or infinite values; "
                             "replace them (e.g. with numpy.nan_to_num) before passing the image")
        levels = values * 255.0 if values.size and values.min() >= 0.0 and values.max() <= 1.0 else values
        return np.clip(np.rint(levels), 0, 255).astype(np.uint8)
    values = values.astype(np.int64)
    if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
        return np.clip(np.rint(np.clip(values, 0, None) * (255.0 / (2 ** 31 - 1))), 0, 255).astype(np.uint8)
    return ((np.clip(values, 0, 65535) + 128) // 257).astype(np.uint8)


def patchify(image_chw: np.ndarray | torch.Tensor, params: PreprocessParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a normalised (C, H, W) image into patches ordered by 2×2 merge groups (official
    Aimv2VisualTokenizer.preprocess_image).

    Returns ``pixel_values`` [gt·gh·gw, C·tp·ps·ps] float32 — merge groups in raster order, patches in raster order
    inside a group, features ordered (C, tp, ph, pw) — and ``grid_thws`` [[gt, gh, gw]] int64. A single image is
    repeated to fill a temporal patch (tp > 1), as the official code pads frames with the last one.
    """
    x = torch.as_tensor(np.asarray(image_chw) if not isinstance(image_chw, torch.Tensor) else image_chw)
    x = x.to(torch.float32)
    if x.ndim == 3:
        x = x[None]  # (frames, C, H, W)
    tp, ps, s = params.temporal_patch_size, params.patch_size, params.hidden_stride
    if x.shape[0] % tp:
        x = torch.cat([x, x[-1:].expand(tp - x.shape[0] % tp, *x.shape[1:])], dim=0)
    frames, c, h, w = x.shape
    if h % (ps * s) or w % (ps * s):
        raise ValueError(f"image size {h}x{w} is not a multiple of patch_size*hidden_stride = {ps * s}")
    gt, gh, gw = frames // tp, h // ps, w // ps
    x = x.reshape(gt, tp, c, gh // s, s, ps, gw // s, s, ps)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, gh/s, gw/s, s, s, C, tp, ps, ps)
    pixel_values = x.reshape(gt * gh * gw, c * tp * ps * ps).contiguous()
    return pixel_values, torch.tensor([[gt, gh, gw]], dtype=torch.int64)


def normalize_clip(image: Image.Image, params: PreprocessParams) -> np.ndarray:
    """CLIPImageProcessor rescale + normalize of an RGB uint8 image → (C, H, W) float32 (as official
    Aimv2VisualTokenizer.preprocess_image calls it).

    ``uint8 * rescale_factor`` is evaluated in float64 and cast to float32; mean/std are float32 arrays.
    """
    x = (np.asarray(image, dtype=np.uint8) * params.rescale_factor).astype(np.float32)
    mean = np.asarray(params.image_mean, dtype=np.float32)
    std = np.asarray(params.image_std, dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_image(img: Image.Image, params: PreprocessParams, min_pixels: int | None = None,
                     max_pixels: int | None = None, num_images: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """An image → (pixel_values [N, C·tp·ps·ps] float32, grid_thws [[1, gh, gw]] int64) (official
    Aimv2VisualTokenizer.preprocess_image).

    ``min_pixels``/``max_pixels`` default to the processor's (a falsy value also falls back, as in the official
    ``min_pixels or processor.min_pixels``); ``max_pixels`` is divided by ``num_images`` and ``min_pixels`` is
    capped at it.
    """
    min_pixels = min_pixels or params.min_pixels
    max_pixels = max_pixels or params.max_pixels
    max_pixels = max_pixels // num_images
    min_pixels = min(max_pixels, min_pixels)
    img = to_rgb(img)
    width, height = img.size
    new_h, new_w = smart_resize(height, width, factor=params.patch_size * params.hidden_stride,
                                min_pixels=min_pixels, max_pixels=max_pixels)
    resized = resample.resize(img, (new_w, new_h))  # CLIPImageProcessor: PIL bicubic, reducing_gap None
    return patchify(normalize_clip(resized, params), params)


def _center_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    """torchvision ``center_crop`` on a PIL image: zero-pad a too-small image symmetrically (the extra pixel on the
    right/bottom), then crop at ``int(round((size - crop) / 2))`` (banker's rounding)."""
    img_w, img_h = img.size
    if width > img_w or height > img_h:
        left = (width - img_w) // 2 if width > img_w else 0
        top = (height - img_h) // 2 if height > img_h else 0
        right = (width - img_w + 1) // 2 if width > img_w else 0
        bottom = (height - img_h + 1) // 2 if height > img_h else 0
        padded = Image.new(img.mode, (img_w + left + right, img_h + top + bottom), 0)
        padded.paste(img, (left, top))
        img = padded
        img_w, img_h = img.size
        if (img_w, img_h) == (width, height):
            return img
    top = int(round((img_h - height) / 2.0))
    left = int(round((img_w - width) / 2.0))
    return img.crop((left, top, left + width, top + height))


def process_image_aspectratio(img: Image.Image, width: int, height: int) -> Image.Image:
    """Cover-resize to the target and centre-crop to exactly ``width``×``height`` (official modeling_yak.py,
    YakModel.process_image_aspectratio).

    r = max(W/w, H/h); resize (bicubic) to (int(r·h), int(r·w)) — truncation, so float error can leave the image one
    pixel short, which the crop then pads with zeros.
    """
    w, h = img.size
    r = max(float(width) / w, float(height) / h)
    new_h, new_w = int(r * h), int(r * w)
    if (new_w, new_h) != (w, h):
        img = resample.resize(img, (new_w, new_h))  # torchvision resize on PIL = PIL bicubic
    return _center_crop(img, height, width)


def condition_image(img: Image.Image, width: int, height: int, params: PreprocessParams) -> Image.Image:
    """The image handed to the visual tokenizer in a T2I/EDIT conditioning branch, before preprocess_image
    (official build_inputs of test_txt_to_img.py / test_img_edit.py): fit to width×height
    (process_image_aspectratio), then bicubic-resize to smart_resize(H, W, 28, 3136, max=processor.min_pixels).

    ``params`` are the checkpoint's preprocessor settings (its ``min_pixels`` bounds this image).
    """
    img = to_rgb(img)
    img = process_image_aspectratio(img, width, height)
    new_h, new_w = smart_resize(height, width, factor=CONDITION_FACTOR, min_pixels=CONDITION_MIN_PIXELS,
                                max_pixels=params.min_pixels)
    return resample.resize(img, (new_w, new_h))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """torchvision ``to_tensor``: uint8 HWC → float32 CHW in [0, 1] (division by 255 in float32)."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
    if x.ndim == 2:
        x = x[:, :, None]
    return x.permute(2, 0, 1).contiguous().to(torch.float32).div(255)


def vae_pixel_values(img: Image.Image, width: int, height: int) -> torch.Tensor:
    """The VAE input of a generation request: process_image_aspectratio fit to width×height → to_tensor
    → normalize(0.5, 0.5) → [1, 3, H, W] float32 in [-1, 1]."""
    img = to_rgb(img)
    x = to_tensor(process_image_aspectratio(img, width, height))
    return x.sub(0.5).div(0.5)[None]


def white_canvas(width: int, height: int) -> Image.Image:
    """The RGB(255, 255, 255) image used as the T2I input and the EDIT ``no_both`` input (official
    load_blank_image of test_txt_to_img.py / test_img_edit.py)."""
    return Image.new("RGB", (width, height), (255, 255, 255))


def resize_for_edit(img: Image.Image) -> Image.Image:
    """The EDIT input image at the output size: RGB, bicubic-resized to ``edit_target_size`` (official
    test_img_edit.py, pipe_img_edit)."""
    img = to_rgb(img)
    w, h = edit_target_size(*img.size)
    return resample.resize(img, (w, h))
