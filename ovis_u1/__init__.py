"""Ovis-U1 in plain PyTorch: understanding, text-to-image and image editing with Ovis-U1-3B (ATH-MaaS, formerly AIDC-AI).

Headless use::

    import ovis_u1
    model = ovis_u1.load_model("models/ovis_u1/Ovis-U1-3B")
    model.text_to_image("a red fox in the snow").save("fox.png")
"""

from .checkpoint import CheckpointError, find_model_dirs, is_ovis_u1_dir
from .model import (
    Condition,
    EditContext,
    OvisU1,
    OvisU1InputError,
    Refined,
    Understanding,
    load_model,
)

__all__ = [
    "CheckpointError",
    "Condition",
    "EditContext",
    "OvisU1",
    "OvisU1InputError",
    "Refined",
    "Understanding",
    "find_model_dirs",
    "is_ovis_u1_dir",
    "load_model",
]
