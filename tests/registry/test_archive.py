"""The archive ``comfy node pack`` builds, which is what ``comfy node publish`` uploads and every user of the
registry or of ComfyUI-Manager downloads: every git-tracked file the pack runs on, and nothing else (no tests, golden
fixtures, benchmarks or CI). comfy-cli builds it from ``git ls-files`` minus the patterns of ``.comfyignore``
(comfy_cli/file_utils.py, ``zip_files``). .ci/registry.sh builds it and sets OVIS_U1_REGISTRY_ARCHIVE."""

from __future__ import annotations

import os
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARCHIVE_ENV = "OVIS_U1_REGISTRY_ARCHIVE"

# What ComfyUI loads (the entry point, the nodes with their frontend extension under nodes/web, the model library),
# the example workflows, and what a user reads or installs from (README, license, requirements, metadata).
RUNTIME_FILES = {"__init__.py", "README.md", "LICENSE", "requirements.txt", "pyproject.toml"}
RUNTIME_FOLDERS = ("nodes/", "ovis_u1/", "workflows/")
# Development only: must never reach users.
DEV_FOLDERS = ("tests/", "bench/", ".ci/")
DEV_SUFFIXES = (".safetensors", ".npz", ".pt", ".pyc")
# About 0.85 MB unpacked today; one golden checkpoint alone is several MB.
MAX_UNPACKED_BYTES = 3 * 2**20


@pytest.fixture(scope="module")
def archive_path() -> Path:
    path = os.environ.get(ARCHIVE_ENV)
    if not path:
        pytest.skip(f"{ARCHIVE_ENV} is not set: these tests check the archive `comfy node pack` builds for the "
                    "registry; run `bash .ci/registry.sh`, which builds it and runs them")
    assert Path(path).is_file(), f"{ARCHIVE_ENV}={path} is not a file: build it with `comfy node pack`"
    return Path(path)


@pytest.fixture(scope="module")
def archive(archive_path) -> dict[str, zipfile.ZipInfo]:
    """The archive's files by name (comfy-cli writes no folder entries; any would be left out here)."""
    with zipfile.ZipFile(archive_path) as z:
        return {info.filename: info for info in z.infolist() if not info.is_dir()}


@pytest.fixture(scope="module")
def tracked() -> set[str]:
    """The files comfy-cli starts from: ``git ls-files`` of the checkout."""
    done = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, text=True)
    assert done.returncode == 0, f"git ls-files failed ({done.stderr.strip()}): the archive is built from a git checkout"
    return {name for name in done.stdout.split("\0") if name}


def is_runtime(name: str) -> bool:
    return name in RUNTIME_FILES or name.startswith(RUNTIME_FOLDERS)


def test_every_file_the_pack_runs_on_ships(archive, tracked):
    missing = sorted(name for name in tracked if is_runtime(name) and name not in archive)
    assert not missing, (f"{len(missing)} file(s) the pack needs are not in the archive, e.g. {missing[:10]}: "
                         "a .comfyignore pattern matches them")


def test_nothing_else_ships(archive, tracked):
    extra = sorted(name for name in archive if not (is_runtime(name) and name in tracked))
    assert not extra, (f"{len(extra)} file(s) would ship to every user but the pack does not run on them, e.g. "
                       f"{extra[:10]}: add a pattern to .comfyignore")


def test_no_test_fixture_or_benchmark_ships(archive):
    dev = sorted(name for name in archive
                 if name.startswith(DEV_FOLDERS) or "__pycache__/" in name or name.endswith(DEV_SUFFIXES))
    assert not dev, f"development files would ship to every user, e.g. {dev[:10]}: add them to .comfyignore"


def test_archive_is_small(archive):
    unpacked = sum(info.file_size for info in archive.values())
    largest = max(archive.values(), key=lambda info: info.file_size)
    assert unpacked <= MAX_UNPACKED_BYTES, (
        f"the archive holds {unpacked / 2**20:.1f} MB unpacked (limit {MAX_UNPACKED_BYTES / 2**20:.0f} MB; largest "
        f"{largest.filename}, {largest.file_size / 2**20:.1f} MB): keep large files out with .comfyignore, or raise "
        "the limit here if users need them")


def test_archive_holds_this_tree(archive_path, archive):
    """Every member is byte-identical to the checkout's file: the archive under test is the one built from here."""
    with zipfile.ZipFile(archive_path) as z:
        differ = sorted(name for name in archive
                        if not (ROOT / name).is_file() or z.read(name) != (ROOT / name).read_bytes())
    assert not differ, f"archive members differ from the checkout: {differ[:10]}; rebuild it (bash .ci/registry.sh)"
