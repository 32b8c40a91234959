"""LoRAs for Ovis-U1's MMDiT through ComfyUI's own LoRA loaders (LoraLoaderModelOnly, LoraLoader, hook LoRAs).

Core's loaders build a table "LoRA key prefix → weight of the MODEL" with ``comfy.lora.model_lora_keys_unet`` and
hand it to ``comfy.lora.load_lora``, which reads every adapter form ComfyUI knows (``lora_A``/``lora_B``,
``lora_down``/``lora_up`` with ``alpha``, LoHa, LoKr, …) under each prefix of the table (comfy/sd.py
``load_lora_for_models``, comfy/hooks.py ``load_hook_lora_for_models``). Since the MODEL's ``diffusion_model`` is the
MMDiT under its checkpoint names, the generic part of that table already covers ComfyUI's own forms:
``diffusion_model.double_blocks.0.img_attn.qkv`` and ``lora_unet_double_blocks_0_img_attn_qkv``.

The prefixes trainers write for a model are added per model class inside ``model_lora_keys_unet`` itself
(``isinstance(model, comfy.model_base.Flux)``, ``…QwenImage``, … in comfy/lora.py of 0.3.64, 0.18.1 and 0.33.0);
there is no registry or hook a model class from a custom node can add to. So ``install`` wraps that function once
(the wrapper is marked and never wrapped again; every model but the pack's ``OvisU1Model`` gets the original's
answer untouched) and adds, for each weight ``<name>`` of the MMDiT, the names a trainer of Ovis-U1 saves it under:

* ``visual_generator.backbone.<name>`` — the names of the official checkpoint (ATH-MaaS/Ovis-U1-3B's
  model.safetensors): a LoRA saved from the named modules of the whole Ovis-U1 model;
* ``base_model.model.visual_generator.backbone.<name>`` — PEFT (``get_peft_model`` on the whole model, then
  ``save_pretrained``: PEFT keeps the ``PeftModel`` path ``base_model.model.`` and drops the adapter name);
* ``base_model.model.<name>`` — the same with PEFT wrapped around the MMDiT alone;
* ``transformer.<name>`` — the diffusers convention for the denoiser of a pipeline (``save_lora_weights`` with
  ``transformer_lora_layers``, used by diffusers-based trainers; core maps it for Flux, HiDream and QwenImage too);
* ``<name>`` — no prefix: PEFT's ``get_peft_model_state_dict`` of the MMDiT after ``inject_adapter_in_model`` /
  ``add_adapter`` (the DiffSynth form core maps for Flux and QwenImage).

``backbone.<name>`` or ``model.visual_generator.backbone.<name>`` are left out: no trainer writes them (a part
wrapped by PEFT gets ``base_model.model.``, a plain state dict the full ``visual_generator.backbone.`` path).

A LoRA none of whose keys names a layer of the MMDiT is an error on the node (``OvisU1InputError``, naming its first
keys and these layouts), not only core's "lora key not loaded" lines in the console: ``install`` also wraps
``comfy.lora.load_lora`` (the one function every core LoRA path goes through after the key table) and checks its
result when the table is an Ovis-U1 MODEL's. Checking there rather than in the patcher: the patcher's
``add_patches`` only receives the (empty) patches, not the LoRA's keys; an empty ``add_patches`` is legitimate
elsewhere; and the patcher class is ComfyUI's (``memory.patcher_class``), which 0.33.0's ``clone(disable_dynamic=
True)`` replaces by plain ``ModelPatcher``, so a subclass would not survive every clone.

Everything is optional: a ComfyUI without these functions keeps its own behaviour.
"""

from __future__ import annotations

import functools

import comfy.lora

from ...ovis_u1 import OvisU1InputError


# The prefixes added in front of a MMDiT weight's name (see the module docstring for who writes which).
OFFICIAL_PREFIX = "visual_generator.backbone."
LORA_PREFIXES = (OFFICIAL_PREFIX, "base_model.model." + OFFICIAL_PREFIX, "base_model.model.", "transformer.", "")
MARK = "ovis_u1_lora"  # attribute marking the pack's wrappers (its value: the OvisU1Model classes they serve)
LAYOUTS = (
    "'visual_generator.backbone.<layer>', 'base_model.model.visual_generator.backbone.<layer>', "
    "'base_model.model.<layer>', 'transformer.<layer>', '<layer>', 'diffusion_model.<layer>' or "
    "'lora_unet_<layer_with_underscores>', each with lora_A/lora_B (PEFT) or lora_down/lora_up (+ alpha) weights, "
    "where <layer> is a MMDiT layer such as 'double_blocks.0.img_attn.qkv'"
)
SHOWN_KEYS = 3


def ovis_lora_keys(mmdit) -> dict[str, str]:
    """The key table entries of the trainers' layouts for every weight of the MMDiT (``diffusion_model``)."""
    keys = {}
    for name in mmdit.state_dict().keys():
        if name.endswith(".weight"):
            layer = name[: -len(".weight")]
            for prefix in LORA_PREFIXES:
                keys[prefix + layer] = f"diffusion_model.{name}"
    return keys


def is_ovis_key_map(key_map) -> bool:
    """Whether a key table was made for an Ovis-U1 MODEL (it has the official names only this wrapper adds)."""
    return isinstance(key_map, dict) and any(k.startswith(OFFICIAL_PREFIX) for k in key_map)


def unmatched_lora_message(lora) -> str:
    keys = list(lora.keys()) if hasattr(lora, "keys") else []
    if not keys:
        return "the LoRA has no tensors: pick a LoRA file of Ovis-U1's MMDiT"
    shown = ", ".join(repr(k) for k in keys[:SHOWN_KEYS]) + (", …" if len(keys) > SHOWN_KEYS else "")
    return (f"the LoRA matches no layer of Ovis-U1's MMDiT (its keys begin {shown}); it was trained for another "
            f"model, or names its layers in a layout this pack does not know. Accepted: {LAYOUTS}")


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
