"""ComfyUI-Ovis-U1: Ovis-U1-3B (ATH-MaaS, formerly AIDC-AI) as ComfyUI nodes: understanding, text-to-image, editing.

ComfyUI imports this folder as a package; the nodes reach the ``ovis_u1`` library beside them by relative imports.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./nodes/web"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
