"""The pack imported the way ComfyUI's load_custom_node imports it: the folder's __init__.py under a path-derived
module name, its nodes from ``comfy_entrypoint`` (shared by the in-ComfyUI tests, so it is imported once).

The nodes are ComfyUI V3 nodes (``comfy_api.latest``): they import only inside ComfyUI. ``import_pack`` imports
ComfyUI (``COMFYUI_PATH``) into this process first, as ``main.py --cpu`` sets it up: its argument parser is off when
imported as a library, so ``args.cpu`` is set before model management reads it."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui_ovis_u1_in_comfy"
COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")


def import_comfyui() -> None:
    """ComfyUI's modules in this process, on the CPU (``--cpu``, PyTorch SDPA as the official code computes), with
    lazy layers where ``OVIS_U1_LAZY_LAYERS=1`` (tests/comfyui/layers.py)."""
    root = str(Path(COMFYUI_PATH).expanduser().resolve())
    if root not in sys.path:
        sys.path.insert(0, root)
    from comfy.cli_args import args

    if "comfy.model_management" not in sys.modules:
        args.cpu = True
        args.use_pytorch_cross_attention = True  # the official SDPA's sums (the CPU default is sub-quadratic)
    import comfy.model_management as mm

    from tests.comfyui import layers

    if layers.LAZY:
        assert layers.build_layers_lazily(), "this ComfyUI has no lazy layers (Dynamic VRAM): run without OVIS_U1_LAZY_LAYERS"
    assert mm.cpu_state == mm.CPUState.CPU, "ComfyUI was imported before these tests could select --cpu"


def import_pack():
    if PACK_NAME not in sys.modules:
        import_comfyui()
        spec = importlib.util.spec_from_file_location(PACK_NAME, ROOT / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK_NAME]


def node_classes(pack=None) -> dict:
    """node id → node class, as ComfyUI registers them from the pack's ``comfy_entrypoint``."""
    extension = asyncio.run((pack or import_pack()).comfy_entrypoint())
    return {cls.GET_SCHEMA().node_id: cls for cls in asyncio.run(extension.get_node_list())}
