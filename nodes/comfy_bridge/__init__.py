"""The only package of the pack that touches ComfyUI internals.

``loading`` turns a checkpoint folder into the loader's three parts under ComfyUI's model management: ``memory``'s
encoder (LLM, visual encoder, tokenizer; Understand and Encode Condition), ``core_model``'s core MODEL (the MMDiT;
``conditioning``: what its CONDITIONING holds) and ``core_vae``'s core VAE. ``sampling`` runs the official recipe on
ComfyUI's samplers, ``lora`` lets core's LoRA loaders find the MMDiT's layers under the names LoRA trainers give
them, ``attention`` hands ComfyUI's attention selection to the library.
"""

from . import lora
from .host import (  # noqa: F401  (the bridge's public names)
    IN_COMFYUI, Progress, auto_dtype, latent_size, list_models, model_roots, register_model_folder, resolve_model,
)
from .loading import load  # noqa: F401
from .memory import WEIGHT_DTYPES, OvisU1Encoder  # noqa: F401

lora.install()  # core's LoRA loaders find the MMDiT's layers under the trainers' names
