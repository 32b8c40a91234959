"""Fixtures of the in-ComfyUI tests: one real ComfyUI server per session (see server.py), and the skip that says
how to run these tests when COMFYUI_PATH is not set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.golden import CHECKPOINT, TINY_A
from tests.pack import ROOT

HOW_TO_RUN = ("in-ComfyUI tests need a ComfyUI: COMFYUI_PATH=/path/to/ComfyUI <python with ComfyUI's requirements, "
              "the pack's and pytest> -m pytest tests/comfyui  (.ci/run does this for ComfyUI 0.18.1 and 0.33.0)")
COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")

# Test images in ComfyUI's input folder, by the name LoadImage gets.
UNDERSTAND_IMAGE = "ovis_understand.png"
EDIT_IMAGE = "ovis_edit.png"


@pytest.fixture(autouse=True)
def _needs_comfyui():  # for tests that do not use the server fixture
    if not COMFYUI_PATH:
        pytest.skip(HOW_TO_RUN)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """A started ComfyUI (``--cpu``) with only this pack, the tiny checkpoint as models/ovis_u1/Ovis-U1-3B and the
    golden input images in input/."""
    if not COMFYUI_PATH:
        pytest.skip(HOW_TO_RUN)
    from tests.comfyui.server import ComfyServer

    comfyui = Path(COMFYUI_PATH).resolve()
    if not (comfyui / "main.py").is_file():
        pytest.fail(f"COMFYUI_PATH={COMFYUI_PATH} is not a ComfyUI source tree (no main.py)")
    server = ComfyServer(comfyui, tmp_path_factory.mktemp("comfyui_base"), ROOT, CHECKPOINT)
    server.prepare()
    server.add_input(TINY_A / "cases" / "understand" / "input.png", UNDERSTAND_IMAGE)
    server.add_input(TINY_A / "cases" / "edit" / "input.png", EDIT_IMAGE)
    server.start()
    try:
        yield server
    finally:
        server.stop()
