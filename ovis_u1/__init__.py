"""Ovis-U1 in plain PyTorch: understanding, text-to-image and image editing with Ovis-U1-3B (ATH-MaaS, formerly AIDC-AI).

Headless use::

    import ovis_u1
    model = ovis_u1.load_model("models/ovis_u1/Ovis-U1-3B")
    model.text_to_image("a red fox in the snow").save("fox.png")

Sources cited in the comments: the Ovis-U1 technical report (arXiv 2506.23044) and the official code — the remote-code
files of the Hugging Face repository ATH-MaaS/Ovis-U1-3B (formerly AIDC-AI/Ovis-U1-3B): modeling_ovis_u1.py,
configuration_ovis_u1.py, modeling_yak.py (the MMDiT, the sampler and the VAE calls), configuration_yak.py,
modeling_aimv2.py, configuration_aimv2.py; and the test scripts of GitHub AIDC-AI/Ovis-U1: test_img_to_txt.py,
test_multi_img_to_txt.py, test_txt_to_img.py, test_img_edit.py. "official modeling_yak.py, YakModel.get_schedule" names
such a file and the class/function in it.
"""

from .checkpoint import find_model_dirs, is_ovis_u1_dir
from .errors import CheckpointError
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
