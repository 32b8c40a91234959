"""Access to the official-code goldens and the manifest's comparison rules.

The goldens live in the repository (tests/fixtures/golden: the official Ovis-U1 code run on tiny random models,
trimmed to the tensors the tests read; see its README). ``OVIS_U1_GOLDEN`` points the tests at another copy, e.g. a
full set made by tests/fixtures/golden/regenerate.py."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "golden"
GOLDEN = Path(os.environ.get("OVIS_U1_GOLDEN") or FIXTURES)
TINY_A = GOLDEN / "tiny_a"
CHECKPOINT = TINY_A / "checkpoint"

requires_golden = pytest.mark.skipif(not TINY_A.is_dir(), reason=f"goldens not found at {TINY_A}")


@lru_cache(maxsize=None)
def manifest() -> dict:
    return json.loads((TINY_A / "manifest.json").read_text())


class GoldenTensors(dict):
    """A case's tensors; a key that is not there says how to add it (the repository keeps only the keys in use)."""

    def __init__(self, case: str, tensors: dict[str, torch.Tensor]):
        super().__init__(tensors)
        self.case = case

    def __missing__(self, key: str):
        raise KeyError(f"golden tensor {key!r} of case {self.case!r} is not in {GOLDEN}: the repository keeps only the "
                       f"keys the tests read; add it to tests/fixtures/golden/kept.json and run "
                       f"'python tests/fixtures/golden/regenerate.py trim --source <a full golden set>'")


@lru_cache(maxsize=None)
def tensors(case: str) -> GoldenTensors:
    return GoldenTensors(case, load_file(str(TINY_A / "cases" / case / "tensors.safetensors")))


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
