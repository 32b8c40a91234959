"""The pack imported the way ComfyUI's load_custom_node imports it: the folder's __init__.py under a path-derived
module name (shared by the node and workflow tests, so it is imported once)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui_ovis_u1_under_test"


def import_pack():
    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_NAME, ROOT / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK_NAME]
