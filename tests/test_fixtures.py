"""The golden fixtures in the repository: every parity test finds them in a bare clone, and they are exactly the
official tensors (checked against a full golden set when one is beside the repository, as on the team's machines)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.golden import FIXTURES, GOLDEN

KEPT = json.loads((FIXTURES / "kept.json").read_text())
FULL_SET = Path(os.environ.get("OVIS_U1_FULL_GOLDEN", FIXTURES.parents[2].parent / "shared" / "golden"))


def test_the_tests_read_the_repository_copy_unless_told_otherwise():
    if not os.environ.get("OVIS_U1_GOLDEN"):
        assert GOLDEN == FIXTURES
    for rel in [*KEPT["files"], *KEPT["tensors"]]:
        assert (FIXTURES / rel).is_file(), f"{rel} is missing from {FIXTURES}"


@pytest.mark.parametrize("rel", sorted(KEPT["tensors"]))
def test_trimmed_tensors_hold_exactly_the_kept_keys(rel):
    with safe_open(str(FIXTURES / rel), "pt") as f:
        assert sorted(f.keys()) == sorted(KEPT["tensors"][rel])


def test_fixtures_are_unchanged():
    """Goldens are never edited: every file still has the digest recorded when it was copied (SHA256SUMS)."""
    for line in (FIXTURES / "SHA256SUMS").read_text().splitlines():
        digest, rel = line.split(maxsplit=1)
        assert hashlib.sha256((FIXTURES / rel).read_bytes()).hexdigest() == digest, f"{rel} was changed"


def _bit_identical_to_the_full_golden_set():
    """Collected only where a full golden set is beside the repository (the team's machines, .ci/run)."""
    for rel in KEPT["files"]:
        assert hashlib.sha256((FIXTURES / rel).read_bytes()).digest() == \
            hashlib.sha256((FULL_SET / rel).read_bytes()).digest(), rel
    for rel, keys in KEPT["tensors"].items():
        with safe_open(str(FIXTURES / rel), "pt") as mine, safe_open(str(FULL_SET / rel), "pt") as full:
            for key in keys:
                a, b = mine.get_tensor(key), full.get_tensor(key)
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8),
                                                                                b.view(-1).view(torch.uint8)), key


if FULL_SET.is_dir():
    test_fixtures_are_bit_identical_to_the_full_golden_set = _bit_identical_to_the_full_golden_set
