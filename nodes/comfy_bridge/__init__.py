"""The only package of the pack that touches ComfyUI internals.

Every use is optional: without ComfyUI (CI, a plain Python shell) model folders come from
``ovis_u1.checkpoint.default_model_roots`` ($OVIS_U1_MODELS_DIR, ./models/ovis_u1, the surrounding ComfyUI's), the
encoder (LLM + visual encoder) runs on the CPU in fp32, and there is no progress bar and no interruption.

Inside ComfyUI a loaded checkpoint is built from ComfyUI's operations (``comfy.ops``) and becomes three things ComfyUI's
model management moves to the GPU when a node needs them, loads partially (streaming the rest) when they do not fit,
and offloads when another model needs the memory:

* ``loading`` builds them (and rebuilds a part for ComfyUI's non-dynamic clones); ``memory``: the encoder (LLM,
  visual encoder, tokenizer) under its own patcher, for Understand and Encode Condition;
* ``core_model``: the MMDiT as a core MODEL (``conditioning``: what its CONDITIONING holds);
* ``core_vae``: the VAE as a core VAE.

``sampling`` runs the official recipe on ComfyUI's samplers, ``lora`` lets core's LoRA loaders find the MMDiT's
layers under the names LoRA trainers give them, ``attention`` hands ComfyUI's attention selection to the library.
"""

from .host import (  # noqa: F401  (the bridge's public names)
    IN_COMFYUI,
    MODEL_FOLDER,
    Progress,
    auto_dtype,
    check_interrupt,
    dtype_size,
    intermediate_device,
    latent_size,
    list_models,
    load_device,
    log,
    model_roots,
    offload_device,
    register_model_folder,
    resolve_model,
)
from .loading import load  # noqa: F401
from .memory import WEIGHT_DTYPES, OvisU1Encoder  # noqa: F401

if IN_COMFYUI:
    from . import lora

    lora.install()  # core's LoRA loaders find the MMDiT's layers under the trainers' names
