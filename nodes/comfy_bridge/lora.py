"""LoRAs for Ovis-U1's MMDiT through ComfyUI's own LoRA loaders (LoraLoaderModelOnly, LoraLoader, hook LoRAs).

Core's loaders build a table "LoRA key prefix → weight of the MODEL" with ``comfy.lora.model_lora_keys_unet`` and
hand it to ``comfy.lora.load_lora``, which reads every adapter form ComfyUI knows (``lora_A``/``lora_B``,
``lora_down``/``lora_up`` with ``alpha``, LoHa, LoKr, …) under each prefix of the table (comfy/sd.py
``load_lora_for_models``, comfy/hooks.py ``load_hook_lora_for_models``). Since the MODEL's ``diffusion_model`` is the
MMDiT under its checkpoint names, the generic part of that table already covers ComfyUI's own forms:
``diffusion_model.double_blocks.0.img_attn.qkv`` and ``lora_unet_double_blocks_0_img_attn_qkv``.

The prefixes trainers write for a model are added per model class inside ``model_lora_keys_unet`` itself
(``isinstance(model, comfy.model_base.Flux)``, ``…QwenImage``, … in comfy/lora.py of 0.18.1 and 0.33.0); there is
no registry or hook a model class from a custom node can add to. So ``install`` wraps that function once (the wrapper
is marked and never wrapped again; every model but the pack's ``OvisU1Model`` gets the original's answer untouched)
and adds, for each weight of the MMDiT, the names a trainer of Ovis-U1 saves it under (``ovis_u1.lora_names``).

A LoRA none of whose keys names a layer of the MMDiT is an error on the node (``OvisU1InputError``, naming its first
keys and these layouts), not only core's "lora key not loaded" lines in the console: ``install`` also wraps
``comfy.lora.load_lora`` (the one function every core LoRA path goes through after the key table) and checks its
result when the table is an Ovis-U1 MODEL's. Checking there rather than in the patcher: the patcher's
``add_patches`` only receives the (empty) patches, not the LoRA's keys; an empty ``add_patches`` is legitimate
elsewhere; and the patcher class is ComfyUI's (``memory.patcher_class``), which 0.33.0's ``clone(disable_dynamic=
True)`` replaces by plain ``ModelPatcher``, so a subclass would not survive every clone.
"""

from __future__ import annotations

import functools

import comfy.lora

from ...ovis_u1 import OvisU1InputError
from ...ovis_u1.lora_names import is_ovis_key_map, ovis_lora_keys, unmatched_lora_message

MARK = "ovis_u1_lora"  # attribute marking the pack's wrappers (its value: the OvisU1Model classes they serve)


def _wrap_keys(original, model_classes: list):
    @functools.wraps(original)
    def model_lora_keys_unet(model, *args, **kwargs):
        key_map = original(model, *args, **kwargs)
        if isinstance(model, tuple(model_classes)) and isinstance(key_map, dict):
            for key, target in ovis_lora_keys(model.diffusion_model).items():
                key_map.setdefault(key, target)
        return key_map

    setattr(model_lora_keys_unet, MARK, model_classes)
    return model_lora_keys_unet


def _wrap_load(original):
    @functools.wraps(original)
    def load_lora(lora, to_load, *args, **kwargs):
        patches = original(lora, to_load, *args, **kwargs)
        if not patches and is_ovis_key_map(to_load):
            raise OvisU1InputError(f"lora: {unmatched_lora_message(lora)}")
        return patches

    setattr(load_lora, MARK, True)
    return load_lora


def install() -> bool:
    """Wrap ``comfy.lora.model_lora_keys_unet`` and ``comfy.lora.load_lora`` once (idempotent; a second copy of the
    pack only adds its OvisU1Model class to the existing wrapper)."""
    from .core_model import OvisU1Model

    keys, load = comfy.lora.model_lora_keys_unet, comfy.lora.load_lora
    served = getattr(keys, MARK, None)
    if served is None:
        comfy.lora.model_lora_keys_unet = _wrap_keys(keys, [OvisU1Model])
    elif OvisU1Model not in served:
        served.append(OvisU1Model)
    if getattr(load, MARK, None) is None:
        comfy.lora.load_lora = _wrap_load(load)
    return True
