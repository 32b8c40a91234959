"""The registry metadata of pyproject.toml (docs.comfy.org/registry/specifications): the icon and banner it points
to, the license, the ComfyUI range CI tests, and, where comfy-cli is installed (.ci/registry.sh), every field as
comfy-cli reads it for ``comfy node publish`` (comfy_cli/registry/config_parser.py): comfy-cli drops a classifier
list, a version range or a license it cannot read with only a printed warning, and ``comfy node validate`` still
exits 0."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+; these checks read pyproject.toml with it")

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
COMFY = PYPROJECT["tool"]["comfy"]
REPOSITORY = PROJECT["urls"]["Repository"]
ACCELERATORS = ["GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Apple Metal"]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (no Pillow: the registry venv has only comfy-cli and pytest)."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def repo_file(url: str) -> Path:
    """The file of this repository an image URL serves: the raw GitHub address of Repository's main branch."""
    owner_repo = re.fullmatch(r"https://github\.com/([^/]+/[^/]+)", REPOSITORY).group(1)
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
    assert url.startswith(prefix), f"{url} is not a file of {REPOSITORY} (expected {prefix}<path>)"
    path = ROOT / url[len(prefix):]
    assert path.is_file(), f"{url} names {path.relative_to(ROOT)}, which is not in the repository"
    return path


def test_icon_is_square_and_at_most_400px():
    width, height = png_size(repo_file(COMFY["Icon"]))
    assert width == height <= 400, f"Icon is {width}x{height}: the registry asks for a square of at most 400x400"


def test_banner_is_21_by_9():
    width, height = png_size(repo_file(COMFY["Banner"]))
    assert width * 9 == height * 21, f"Banner is {width}x{height}: the registry asks for 21:9"


def test_license_is_apache_2_with_its_text():
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.split()[:5] == ["Apache", "License", "Version", "2.0,", "January"], "LICENSE is not the Apache-2.0 text"


def test_requires_comfyui_is_the_oldest_comfyui_ci_runs():
    found = re.search(r'COMFY_VERSIONS:-"([^"]+)"', (ROOT / ".ci" / "run").read_text(encoding="utf-8"))
    assert found, ".ci/run no longer sets COMFY_VERSIONS: update this test to where CI names its ComfyUI versions"
    oldest = min(found.group(1).split(), key=lambda v: tuple(int(p) for p in v.split(".")))
    assert COMFY["requires-comfyui"] == f">={oldest}", (
        f"requires-comfyui is {COMFY['requires-comfyui']!r} but the oldest ComfyUI CI tests is {oldest}")


def test_comfy_cli_reads_every_field(capsys):
    parser = pytest.importorskip("comfy_cli.registry.config_parser",
                                 reason="comfy-cli is not installed here; .ci/registry.sh runs this test with it")
    config = parser.extract_node_configuration(str(ROOT / "pyproject.toml"))
    warnings = capsys.readouterr().out
    assert config is not None and "Warning" not in warnings, f"comfy-cli dropped metadata: {warnings}"
    project, comfy = config.project, config.tool_comfy
    assert project.name == PROJECT["name"] and project.version and project.description
    assert project.license.text == "Apache-2.0"
    urls = project.urls
    assert urls.repository == REPOSITORY and all(
        url.startswith(REPOSITORY) for url in (urls.homepage, urls.documentation, urls.issues)), urls
    assert project.supported_os == ["OS Independent"]
    assert project.supported_accelerators == ACCELERATORS
    assert project.supported_comfyui_version == COMFY["requires-comfyui"]
    assert comfy.publisher_id and comfy.display_name and comfy.icon == COMFY["Icon"]
    assert comfy.banner_url == COMFY["Banner"]
    assert comfy.includes == [], "includes walks folders on disk (untracked files too) and overrides .comfyignore"
