"""The ComfyUI nodes of ComfyUI-Ovis-U1. Each node only adapts ComfyUI types to the ``ovis_u1`` library."""

from . import comfy_bridge
from .generate import (
    OvisU1EditContextEncoder,
    OvisU1EncodeCondition,
    OvisU1Refiner,
    OvisU1Sampler,
    OvisU1VAEDecode,
    OvisU1VAEEncode,
)
from .loader import OvisU1ModelLoader
from .native import OvisU1Scheduler
from .understand import OvisU1Understand

comfy_bridge.register_model_folder()

NODE_CLASS_MAPPINGS = {
    "OvisU1ModelLoader": OvisU1ModelLoader,
    "OvisU1Understand": OvisU1Understand,
    "OvisU1EncodeCondition": OvisU1EncodeCondition,
    "OvisU1Refiner": OvisU1Refiner,
    "OvisU1EditContextEncoder": OvisU1EditContextEncoder,
    "OvisU1Sampler": OvisU1Sampler,
    "OvisU1VAEDecode": OvisU1VAEDecode,
    "OvisU1VAEEncode": OvisU1VAEEncode,
    "OvisU1Scheduler": OvisU1Scheduler,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "OvisU1ModelLoader": "Ovis-U1 Model Loader",
    "OvisU1Understand": "Ovis-U1 Understand",
    "OvisU1EncodeCondition": "Ovis-U1 Encode Condition",
    "OvisU1Refiner": "Ovis-U1 Refiner",
    "OvisU1EditContextEncoder": "Ovis-U1 Edit Context Encoder",
    "OvisU1Sampler": "Ovis-U1 MMDiT Sampler",
    "OvisU1VAEDecode": "Ovis-U1 VAE Decode",
    "OvisU1VAEEncode": "Ovis-U1 VAE Encode",
    "OvisU1Scheduler": "Ovis-U1 Scheduler",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
