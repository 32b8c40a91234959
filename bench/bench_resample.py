"""Time the pack's Pillow-10.3.0-exact bicubic resize against the installed Pillow's own resize (issue 11).

A 4000×3000 photo-like RGB picture is resized to the sizes the official pipeline asks for such a photo:
the visual-encoder input of an understanding request (smart_resize with the processor's 448²..1792² bounds),
the edit size (smart_resize factor 32) and the 1024² generation fit (cover-resize before the centre crop).
Both run in this process, interleaved, best of ``--repeat``; the ratio pack/Pillow is printed per size and in total.
Nothing is asserted: the issue's target is a total ratio of at most 2.

    python bench/bench_resample.py [--repeat 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ovis_u1 import resample  # noqa: E402
from ovis_u1.config import PreprocessParams  # noqa: E402
from ovis_u1.preprocess import edit_target_size, smart_resize  # noqa: E402


def photo(width: int = 4000, height: int = 3000, seed: int = 0) -> Image.Image:
    """Smooth shading, sharp edges and sensor-like noise: the mix a real photo has (deterministic)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([120 + 90 * np.sin(xx / 210) * np.cos(yy / 170),
                     110 + 80 * np.cos((xx + yy) / 330),
                     100 + 100 * (xx / width)], axis=-1)
    base += 60 * ((xx // 97 + yy // 71) % 2)[..., None]            # hard edges
    base += rng.normal(0, 6, base.shape).astype(np.float32)         # noise
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def official_sizes(width: int, height: int) -> dict[str, tuple[int, int]]:
    params = PreprocessParams()
    vit_h, vit_w = smart_resize(height, width, factor=params.patch_size * params.hidden_stride,
                                min_pixels=params.min_pixels, max_pixels=params.max_pixels)
    r = max(1024 / width, 1024 / height)
    return {"vit (understand)": (vit_w, vit_h), "edit size": edit_target_size(width, height),
            "1024² fit": (int(r * width), int(r * height))}


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    img = photo()
    import PIL
    print(f"Pillow {PIL.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"input {img.width}x{img.height} RGB, best of {args.repeat}")
    total_pack = total_pil = 0.0
    for name, size in official_sizes(*img.size).items():
        resample.resize(img, size)                                   # warm the coefficient cache once
        pil = pack = float("inf")
        for _ in range(args.repeat):                                 # interleave so load hits both alike
            pil = min(pil, best_of(lambda: img.resize(size, Image.Resampling.BICUBIC), 1))
            pack = min(pack, best_of(lambda: resample.resize(img, size), 1))
        same = np.array_equal(np.asarray(resample.resize(img, size)),
                              np.asarray(img.resize(size, Image.Resampling.BICUBIC)))
        total_pack += pack
        total_pil += pil
        print(f"{name:>18} {size[0]}x{size[1]}: Pillow {pil * 1e3:7.1f} ms  pack {pack * 1e3:7.1f} ms  "
              f"ratio {pack / pil:4.2f}  (same pixels as this Pillow: {same})")
    print(f"{'total':>18}: Pillow {total_pil * 1e3:7.1f} ms  pack {total_pack * 1e3:7.1f} ms  "
          f"ratio {total_pack / total_pil:4.2f}")


if __name__ == "__main__":
    main()
