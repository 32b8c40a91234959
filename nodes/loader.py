"""Ovis-U1 Model Loader."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..ovis_u1 import CheckpointError
from ..ovis_u1.checkpoint import missing_model_message

from . import comfy_bridge as bridge

Encoder = io.Custom("OVIS_U1_ENCODER")
ENCODER_INPUT = {"tooltip": "The 'encoder' output of 'Ovis-U1 Model Loader'."}
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ATTENTION = ("auto", "sdpa", "flash_attn")


class OvisU1ModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OvisU1ModelLoader", display_name="Ovis-U1 Model Loader", category="Ovis-U1",
            description=(
                "Loads an Ovis-U1 checkpoint folder (Hugging Face layout, e.g. ATH-MaaS/Ovis-U1-3B, formerly "
                "AIDC-AI/Ovis-U1-3B) from models/ovis_u1. Nothing is downloaded. Gives three parts, each joining "
                "ComfyUI's memory management (moved to the GPU only while a node uses it, partially when it does not "
                "fit): the encoder (LLM + visual encoder + tokenizer), the MMDiT as a core MODEL and the VAE as a "
                "core VAE."
            ),
            search_aliases=["Ovis", "unified model", "multimodal", "load checkpoint"],
            inputs=[
                io.Combo.Input("model", options=bridge.list_models(), tooltip=(
                    "Checkpoint folder under models/ovis_u1 (or an 'ovis_u1:' path of extra_model_paths.yaml) whose "
                    "config.json says model_type ovis_u1.")),
                io.Combo.Input("dtype", options=list(DTYPES), default="auto", tooltip=(
                    "Weight and compute precision of the LLM, visual encoder and MMDiT (the VAE runs in fp32 unless "
                    "ComfyUI was started with --bf16-vae / --fp16-vae). auto: what ComfyUI recommends for the device "
                    "(bf16 on recent GPUs, fp32 on the CPU and on GPUs without bf16, where the console says so: pick "
                    "fp16 there to halve the memory).")),
                io.Combo.Input("attention", options=list(ATTENTION), default="auto", tooltip=(
                    "Attention kernel. auto: ComfyUI's own choice (its --use-*-attention flags and attention patches "
                    "on the MODEL). sdpa: PyTorch SDPA. flash_attn: the flash-attn package (CUDA only; it must be "
                    "installed).")),
                # optional, so API prompts written before this input existed still validate
                io.Combo.Input("weight_dtype", options=list(bridge.WEIGHT_DTYPES), default="default", optional=True,
                               tooltip=(
                    "Storage precision of the LLM, visual encoder and MMDiT weights. fp8_e4m3fn / fp8_e5m2 halve "
                    "their memory (compute stays in dtype; small quality cost, see README); fp8_e4m3fn_scaled stores "
                    "each matrix with a scale. The VAE is never stored in fp8. A GGUF folder: leave it at default.")),
            ],
            outputs=[
                Encoder.Output(display_name="encoder", tooltip=(
                    "The LLM, visual encoder and tokenizer, for 'Ovis-U1 Understand' and 'Ovis-U1 Encode "
                    "Condition'.")),
                io.Model.Output(display_name="model", tooltip=(
                    "The MMDiT as a core MODEL for 'Ovis-U1 MMDiT Sampler' and ComfyUI's own samplers, guiders, LoRA "
                    "loaders (LoraLoaderModelOnly), patches and caches; condition it with 'Ovis-U1 Encode "
                    "Condition'.")),
                io.Vae.Output(display_name="vae", tooltip=(
                    "The checkpoint's VAE as a core VAE (fp32, or ComfyUI's --bf16-vae / --fp16-vae; on ComfyUI's VAE "
                    "device, the CPU with --cpu-vae) for VAEDecode, VAEDecodeTiled, VAEEncode and 'Ovis-U1 Edit "
                    "Context Encoder'.")),
            ],
        )

    @classmethod
    def validate_inputs(cls, model):
        # Replaces ComfyUI's "value not in list" check with a message that says where the folder must go.
        return True if bridge.resolve_model(model) is not None else missing_model_message(model, bridge.model_roots())

    @classmethod
    def execute(cls, model: str, dtype: str, attention: str, weight_dtype: str = "default") -> io.NodeOutput:
        torch_dtype = DTYPES[dtype] or bridge.auto_dtype()
        try:
            return io.NodeOutput(*bridge.load(bridge.resolve_model(model), torch_dtype,
                                              weight_dtype=bridge.WEIGHT_DTYPES[weight_dtype], attention=attention,
                                              name=model))
        except CheckpointError as e:
            raise CheckpointError(f"model {model!r}: {e}") from e
