"""How the in-ComfyUI tests build ComfyUI's layers: as on a CPU (weights allocated at construction), or, with
``OVIS_U1_LAZY_LAYERS=1``, as ComfyUI builds them on an NVIDIA machine under Dynamic VRAM.

There ``main.py`` sets ``comfy.memory_management.aimdo_enabled`` (ComfyUI ≥ 0.18) and ``comfy.ops`` then creates a
Linear / Embedding without its weight, which only its own ``_load_from_state_dict`` fills (ComfyUI 0.18.1 does so on
Windows only — its ``Linear.__init__`` also asks ``comfy.model_management.WINDOWS`` —, 0.33.0 on every OS). A CPU
cannot run comfy-aimdo itself, so the flag is set by hand, before the pack builds a part: in this process for the
in-process tests, and by a custom node loaded before the pack for the server tests.
"""

from __future__ import annotations

import inspect
import os

LAZY = os.environ.get("OVIS_U1_LAZY_LAYERS", "") == "1"

# A custom node the test server loads before the pack (custom nodes load in name order). It runs this file by its
# path ({path}): under ComfyUI's main.py the name ``tests`` is ComfyUI's own test folder.
LAZY_LAYERS_NODE_DIR = "0_ovis_u1_lazy_layers"
LAZY_LAYERS_NODE = """import importlib.util, logging
spec = importlib.util.spec_from_file_location("ovis_u1_test_layers", {path!r})
layers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(layers)
logging.info("[ovis-u1 tests] comfy.ops layers built lazily, as under Dynamic VRAM: %s", layers.build_layers_lazily())
NODE_CLASS_MAPPINGS = {{}}
"""


def build_layers_lazily() -> bool:
    """Set what Dynamic VRAM sets for comfy.ops; False where this ComfyUI has no lazy layers (before 0.18)."""
    import comfy.memory_management
    import comfy.model_management
    import comfy.ops

    if not hasattr(comfy.memory_management, "aimdo_enabled"):
        return False
    comfy.memory_management.aimdo_enabled = True
    if "WINDOWS" in inspect.getsource(comfy.ops.disable_weight_init.Linear.__init__):
        comfy.model_management.WINDOWS = True
    return True


def layers_are_lazy() -> bool:
    """Whether comfy.ops builds a Linear without its weight right now."""
    import comfy.ops
    import torch

    with torch.device("meta"):
        return comfy.ops.disable_weight_init.Linear(2, 2).weight is None
