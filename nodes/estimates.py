"""Activation-memory estimates of Ovis-U1's passes, in bytes, for ComfyUI's model management.

ComfyUI frees (or partially loads) models so that weights + the ``memory_required`` of a pass fit on the device; an
estimate too low ends in an out-of-memory error, one too high offloads weights for nothing. Each estimate counts the
tensors alive at the widest point of one block (inputs, the MLP's hidden activations, q/k/v/out, and the attention
scores where a math kernel materialises them), plus a fixed reserve for kernels' workspaces. Pure functions of the
model's parameters and the request's shape, so they are tested without ComfyUI.
"""

from __future__ import annotations

import math

RESERVE = 256 * 1024**2  # kernel workspaces, allocator slack


def dtype_bytes(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def transformer_block_memory(tokens: int, hidden: int, mlp_hidden: int, heads: int, nbytes: int,
                             score_tokens: int | None = None) -> int:
    """One pre-norm transformer block over ``tokens`` (summed over the batch): residual + normed input, q/k/v/out,
    the MLP's hidden (gate and up for SwiGLU are counted by passing 2·mlp_hidden), and fp32 attention scores over
    ``score_tokens`` (the longest sequence; None: no materialised scores, as with flash / memory-efficient SDPA)."""
    live = tokens * (6 * hidden + mlp_hidden) * nbytes
    if score_tokens:
        live += heads * score_tokens * score_tokens * 4
    return live


def condition_memory(llm_hidden: int, llm_intermediate: int, llm_heads: int, vit_hidden: int, vit_intermediate: int,
                     vit_heads: int, branches: int, text_tokens: int, image_patches: int, nbytes: int) -> int:
    """Encode Condition: one visual-encoder pass over ``image_patches`` patches (per source image, up to two) and one
    LLM pass over ``branches`` sequences of ``text_tokens`` (prompt + visual tokens); only the last hidden state of
    every layer is kept, so one block is alive at a time."""
    vit = transformer_block_memory(2 * image_patches, vit_hidden, 2 * vit_intermediate, vit_heads, nbytes,
                                   score_tokens=image_patches)
    llm = transformer_block_memory(branches * text_tokens, llm_hidden, 2 * llm_intermediate, llm_heads, nbytes,
                                   score_tokens=text_tokens)
    states = branches * text_tokens * 2 * llm_hidden * 4  # the kept fp32 condition of every branch
    return max(vit, llm) + states + RESERVE


def sampling_memory(hidden: int, mlp_ratio: float, heads: int, batch: int, text_tokens: int, width: int, height: int,
                    with_context: bool, nbytes: int) -> int:
    """One MMDiT forward over ``batch`` sequences (CFG branches × images) of text + image (+ context) tokens."""
    image_tokens = math.ceil(height / 16) * math.ceil(width / 16) * (2 if with_context else 1)
    seq = text_tokens + image_tokens
    # single-stream blocks hold [qkv | mlp] of linear1 and its output at once: 3·hidden + 2·mlp_hidden
    block = transformer_block_memory(batch * seq, hidden, 2 * int(hidden * mlp_ratio), heads, nbytes,
                                     score_tokens=seq)
    return block + RESERVE


def vae_decode_memory(latent_height: int, latent_width: int, nbytes: int) -> int:
    """ComfyUI's own estimate for an SDXL AutoencoderKL decode (comfy/sd.py), per image."""
    return 2178 * latent_height * latent_width * 64 * nbytes


def vae_encode_memory(height: int, width: int, nbytes: int) -> int:
    """ComfyUI's own estimate for an SDXL AutoencoderKL encode (comfy/sd.py), per image."""
    return 1767 * height * width * nbytes
