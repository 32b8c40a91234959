"""ComfyUI's attention selection as the library's attention kernel.

Core models call ``comfy.ldm.modules.attention.optimized_attention``: the kernel ComfyUI picked at start-up from its
flags (``--use-pytorch-cross-attention``, ``--use-sage-attention``, ``--use-flash-attention``, split / sub-quadratic
otherwise), wrapped so that an ``optimized_attention_override`` in ``transformer_options`` (attention-override
patches on a MODEL) replaces it. :func:`comfy_kernel` hands that function to the library for its bidirectional
attentions (visual encoder, token refiner, MMDiT); the causal LLM and the VAE keep the pack's own SDPA, as core's
VAEs keep pytorch attention. The LLM's grouped key/value heads reach SDPA as they are (``enable_gqa``, as core's Qwen3
hands them to ``attention_pytorch``), read in the KV cache without a copy per token. The function is looked up at
call time, so a pack that swaps it later is honoured.
"""

from __future__ import annotations

import comfy.ldm.modules.attention as comfy_attention

from ...ovis_u1.attention import Kernel

NAME = "comfy"


def comfy_kernel(transformer_options: dict | None = None) -> Kernel:
    """ComfyUI's ``optimized_attention`` on [B, H, L, D] tensors, with ``transformer_options`` (its overrides)."""
    extra = {} if transformer_options is None else {"transformer_options": transformer_options}

    def full(q, k, v):
        return comfy_attention.optimized_attention(q, k, v, q.shape[1], skip_reshape=True, skip_output_reshape=True,
                                                   **extra)

    return Kernel(NAME, full)


def is_comfy(kernel: Kernel) -> bool:
    return kernel.name == NAME
