"""Access to the official-code goldens in ../shared/golden and the manifest's comparison rules."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

GOLDEN = Path(os.environ.get("OVIS_U1_GOLDEN", Path(__file__).resolve().parents[1].parent / "shared" / "golden"))
TINY_A = GOLDEN / "tiny_a"
CHECKPOINT = TINY_A / "checkpoint"

requires_golden = pytest.mark.skipif(not TINY_A.is_dir(), reason=f"goldens not found at {TINY_A}")


@lru_cache(maxsize=None)
def manifest() -> dict:
    return json.loads((TINY_A / "manifest.json").read_text())


@lru_cache(maxsize=None)
def tensors(case: str) -> dict[str, torch.Tensor]:
    return load_file(str(TINY_A / "cases" / case / "tensors.safetensors"))


def case_params(case: str) -> dict:
    return manifest()["cases"][case]["params"]


def assert_golden(actual: torch.Tensor, expected: torch.Tensor, name: str, atol: float | None = None) -> None:
    """Compare with the manifest's suggested tolerance: integers exact, fp32 atol 1e-4·max(1, max|ref|)."""
    actual = torch.as_tensor(actual).detach().cpu()
    assert tuple(actual.shape) == tuple(expected.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not expected.is_floating_point():
        assert torch.equal(actual.to(expected.dtype), expected), f"{name}: integer tensors differ"
        return
    ref = expected.double()
    if atol is None:
        atol = 1e-4 * max(1.0, ref.abs().max().item())
    diff = (actual.double() - ref).abs().max().item()
    assert diff <= atol, f"{name}: max abs diff {diff:.3g} > atol {atol:.3g}"


def assert_golden_image(actual, expected: torch.Tensor, name: str = "output_image_uint8") -> None:
    """uint8 images by the manifest's rule: at most 2 levels apart (the truncating uint8 cast turns a 1-ulp float
    difference into a level). fp32 kernels differ by an ulp between CPU generations (AVX2 / AVX-512 paths), so a
    run on another machine may flip a pixel; on top of the manifest's rule at most 0.1 % of the values may differ."""
    actual = torch.as_tensor(np.array(actual)).to(torch.int32)
    expected = expected.to(torch.int32)
    assert tuple(actual.shape) == tuple(expected.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    assert diff.max().item() <= 2, f"{name}: {diff.max().item()} levels apart (at most 2 allowed)"
    changed = (diff > 0).float().mean().item()
    assert changed <= 1e-3, f"{name}: {changed:.3%} of the values differ (at most 0.1 % allowed)"
