"""The ComfyUI nodes of ComfyUI-Ovis-U1, in ComfyUI's V3 schema (``comfy_api.latest``). Each node reads its inputs,
calls the library or the bridge, and returns ComfyUI's own types (MODEL, VAE, CONDITIONING, LATENT, IMAGE) besides
the encoder."""

from comfy_api.latest import ComfyExtension

from . import comfy_bridge
from .condition import OvisU1EncodeCondition, OvisU1Refiner
from .edit import OvisU1EditContextEncoder
from .loader import OvisU1ModelLoader
from .sampler import OvisU1Sampler, OvisU1Scheduler
from .understand import OvisU1Understand

comfy_bridge.register_model_folder()

NODES = [OvisU1ModelLoader, OvisU1Understand, OvisU1EncodeCondition, OvisU1Refiner, OvisU1EditContextEncoder,
         OvisU1Sampler, OvisU1Scheduler]


class OvisU1Extension(ComfyExtension):
    async def get_node_list(self):
        return NODES


async def comfy_entrypoint() -> OvisU1Extension:
    return OvisU1Extension()
