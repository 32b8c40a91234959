"""The names LoRA trainers give the weights of Ovis-U1's MMDiT, and the message of a LoRA that names none of them.

For each weight ``<name>`` of the MMDiT (as named in the checkpoint below ``visual_generator.backbone.``):

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
"""

from __future__ import annotations

# The prefixes added in front of a MMDiT weight's name (the module docstring says who writes which).
OFFICIAL_PREFIX = "visual_generator.backbone."
LORA_PREFIXES = (OFFICIAL_PREFIX, "base_model.model." + OFFICIAL_PREFIX, "base_model.model.", "transformer.", "")
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
