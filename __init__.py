"""ComfyUI-Ovis-U1: Ovis-U1-3B (ATH-MaaS, formerly AIDC-AI) as ComfyUI nodes: understanding, text-to-image, editing."""

import os
import sys

# ``ovis_u1`` is a plain library beside this file; make it importable when ComfyUI loads the pack by path.
# Appended, not prepended, so this folder never shadows a module of ComfyUI or of another pack.
_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.append(_here)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./nodes/web"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
