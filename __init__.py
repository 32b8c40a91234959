"""ComfyUI-Ovis-U1: Ovis-U1-3B (ATH-MaaS, formerly AIDC-AI) as ComfyUI nodes: understanding, text-to-image, editing.

ComfyUI imports this folder as a package and calls ``comfy_entrypoint`` (its V3 node API, ``comfy_api.latest``); the
nodes reach the ``ovis_u1`` library beside them by relative imports. WEB_DIRECTORY serves the nodes' help pages.
"""

from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./nodes/web"
__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
