"""The ComfyUI nodes of ComfyUI-Ovis-U1. Each node reads its inputs, calls the library or the bridge, and returns
ComfyUI's own types (MODEL, VAE, CONDITIONING, LATENT, IMAGE) besides the encoder."""

from . import comfy_bridge
from .condition import OvisU1EncodeCondition, OvisU1Refiner
from .edit import OvisU1EditContextEncoder
from .loader import OvisU1ModelLoader
from .sampler import OvisU1Sampler, OvisU1Scheduler
from .understand import OvisU1Understand

comfy_bridge.register_model_folder()

NODE_CLASS_MAPPINGS = {
    "OvisU1ModelLoader": OvisU1ModelLoader,
    "OvisU1Understand": OvisU1Understand,
    "OvisU1EncodeCondition": OvisU1EncodeCondition,
    "OvisU1Refiner": OvisU1Refiner,
    "OvisU1EditContextEncoder": OvisU1EditContextEncoder,
    "OvisU1Sampler": OvisU1Sampler,
    "OvisU1Scheduler": OvisU1Scheduler,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "OvisU1ModelLoader": "Ovis-U1 Model Loader",
    "OvisU1Understand": "Ovis-U1 Understand",
    "OvisU1EncodeCondition": "Ovis-U1 Encode Condition",
    "OvisU1Refiner": "Ovis-U1 Refiner",
    "OvisU1EditContextEncoder": "Ovis-U1 Edit Context Encoder",
    "OvisU1Sampler": "Ovis-U1 MMDiT Sampler",
    "OvisU1Scheduler": "Ovis-U1 Scheduler",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
