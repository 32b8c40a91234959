"""Activation-memory estimates of Ovis-U1's passes, in bytes, for ComfyUI's model management.

ComfyUI frees (or partially loads) models so that weights + the ``memory_required`` of a pass fit on the device; an
estimate too low ends in an out-of-memory error, one too high offloads weights for nothing. Pure functions of the
model's parameters, the request's shape and the attention kernel's one property that matters here (``scores``:
whether it materialises the attention scores), so they are tested without ComfyUI; the bridge decides the kernel.

The per-token and per-pixel factors are fitted to the real peaks of the pack's modules: the live bytes of every
tensor the forward creates, counted per storage (tests/test_estimates.py measures them again on the CPU with a
``TorchDispatchMode``; CPU torch has no allocator statistics). Kernel workspaces and allocator slack are what
``RESERVE`` is for; ComfyUI adds its own ``extra_reserved_memory`` on top of every ``memory_required``.
"""

from __future__ import annotations

import math

import torch

from .config import qwen3_params
from .math import image_tokens
from .sizes import smart_resize

RESERVE = 256 * 1024**2  # kernel workspaces (cuBLAS, cuDNN), allocator slack

# What an attention kernel holds of the [rows, heads, queries, keys] scores (the ``scores`` argument):
SCORES_NONE = "none"  # flash / memory-efficient kernels (SDPA, flash-attn, sage, xformers): no score matrix
SCORES_CHUNKED = "chunked"  # ComfyUI's sub-quadratic / split attention: a slice of queries at a time
SCORES_FULL = "full"  # explicit softmax(QKᵀ)V (the pack's math kernel): the whole matrix, twice
SCORE_KINDS = (SCORES_NONE, SCORES_CHUNKED, SCORES_FULL)
# comfy/ldm/modules/attention.py attention_sub_quad: queries in chunks of 4096…256 that fit a quarter of the free
# memory, 512 when none does; the chunk's fp32 scores, their exponentials and the weighted values are alive at once.
CHUNK_QUERIES = 512
CHUNK_COPIES = 3

# MMDiT, measured per token and hidden unit at the widest block (the single-stream block: linear1's [qkv | mlp],
# GELU, the concatenation for linear2, the QK-norm and RoPE temporaries): 8·hidden + 3·mlp_hidden values in the
# compute dtype plus 2·hidden in fp32 (the RoPE rotation); 1.05 covers the rest measured (≤ 4 %).
MMDIT_MARGIN = 1.05

# VAE (fp32), measured per output pixel: the decoder's last up block holds its input (block_out_channels[1] at full
# resolution) and ~4 tensors of its output width (block_out_channels[0]): GroupNorm, SiLU, conv, residual; the
# encoder's first block ~5 tensors of block_out_channels[0]. ×1.3: mkldnn convolution buffers measured as RSS on
# top of the tensors (≈ 26 % at 512²); cuDNN's workspaces are of the same kind.
VAE_DECODE_TENSORS = 4
VAE_ENCODE_TENSORS = 5
VAE_MARGIN = 1.3
SDXL_BLOCK_OUT = (128, 256, 512, 512)


def dtype_bytes(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def pack_kernel_scores(backend: str) -> str:
    """``scores`` of the pack's own attention kernel (``ovis_u1.attention`` backend name): only ``math`` builds the
    score matrix; ``auto`` / ``sdpa`` / ``flash_attn`` run flash or memory-efficient kernels."""
    return SCORES_FULL if backend == "math" else SCORES_NONE


def attention_scores_memory(scores: str, rows: int, heads: int, queries: int, keys: int, nbytes: int) -> int:
    """Bytes of attention scores alive at once: none, a sub-quadratic chunk of queries (fp32), or the whole matrix
    twice (the scores and their softmax) in ``nbytes`` per value."""
    if scores not in SCORE_KINDS:
        raise ValueError(f"scores must be one of {', '.join(SCORE_KINDS)}, got {scores!r}")
    if scores == SCORES_NONE:
        return 0
    if scores == SCORES_CHUNKED:
        return rows * heads * min(queries, CHUNK_QUERIES) * keys * 4 * CHUNK_COPIES
    return rows * heads * queries * keys * nbytes * 2


def transformer_block_memory(tokens: int, hidden: int, mlp_hidden: int, heads: int, nbytes: int,
                             score_tokens: int | None = None, scores: str = SCORES_FULL) -> int:
    """One pre-norm transformer block over ``tokens`` (summed over the batch): residual + normed input, q/k/v/out,
    the MLP's hidden (gate and up for SwiGLU are counted by passing 2·mlp_hidden), and the attention scores over
    ``score_tokens`` (the longest sequence; None: none) as the kernel (``scores``) holds them."""
    live = tokens * (6 * hidden + mlp_hidden) * nbytes
    if score_tokens:
        rows = max(1, tokens // score_tokens)
        live += attention_scores_memory(scores, rows, heads, score_tokens, score_tokens, nbytes)
    return live


def condition_memory(llm_hidden: int, llm_intermediate: int, llm_heads: int, vit_hidden: int, vit_intermediate: int,
                     vit_heads: int, branches: int, text_tokens: int, image_patches: int, nbytes: int,
                     scores: str = SCORES_FULL) -> int:
    """Encode Condition: one visual-encoder pass over ``image_patches`` patches (per source image, up to two) and one
    LLM pass over ``branches`` sequences of ``text_tokens`` (prompt + visual tokens); only the last hidden state of
    every layer is kept, so one block is alive at a time."""
    vit = transformer_block_memory(2 * image_patches, vit_hidden, 2 * vit_intermediate, vit_heads, nbytes,
                                   score_tokens=image_patches, scores=scores)
    llm = transformer_block_memory(branches * text_tokens, llm_hidden, 2 * llm_intermediate, llm_heads,
                                   max(nbytes, 4) if scores == SCORES_FULL else nbytes,  # causal softmax in fp32
                                   score_tokens=text_tokens, scores=scores)
    states = branches * text_tokens * 2 * llm_hidden * 4  # the kept fp32 condition of every branch
    return max(vit, llm) + states + RESERVE


def sampling_memory(hidden: int, mlp_ratio: float, heads: int, batch: int, text_tokens: int, width: int, height: int,
                    with_context: bool, nbytes: int, scores: str = SCORES_FULL) -> int:
    """One MMDiT forward over ``batch`` rows (CFG branches × images) of text + image (+ context) tokens.

    The widest block's activations, the attention scores as the kernel holds them, what the run keeps for every
    row (refined text tokens, the projected context) and the RoPE tables of up to three text lengths.
    """
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
    mlp_hidden = int(hidden * mlp_ratio)
    image = image_tokens(width, height)
    context = image if with_context else 0
    seq = text_tokens + image + context
    per_token = (8 * hidden + 3 * mlp_hidden) * nbytes + 2 * hidden * 4
    block = math.ceil(batch * seq * per_token * MMDIT_MARGIN)
    attention = attention_scores_memory(scores, batch, heads, seq, seq, nbytes)
    kept = batch * (text_tokens + context) * hidden * nbytes
    rope = 3 * seq * (hidden // heads) // 2 * 4 * 4  # [seq, head_dim/2, 2, 2] fp32
    return block + attention + kept + rope + RESERVE


def llm_token_memory(llm_hidden: int, llm_intermediate: int, llm_vocab: int, nbytes: int) -> int:
    """What a pass of the LLM allocates besides its layers' activations and the KV cache, at every generated token
    and in the prompt pass alike: the last position's logits, in the compute dtype and as the fp32 copy the choice
    of the token reads (``ovis_u1.llm.generate``), and one weight matrix in the compute dtype, the largest (the
    MLP's) — the copy a layer's cast makes of a matrix stored in fp8, or of one ComfyUI streams from the offload
    device. Never the token table: it keeps the compute dtype (``ovis_u1.model.FP8_TOKEN_TABLE``), so neither the
    lookup nor the tied LM head converts it; and the keys and values are read in the cache, not copied
    (``ovis_u1.attention.causal_attention``)."""
    return llm_vocab * (nbytes + 4) + llm_hidden * llm_intermediate * nbytes


def understand_memory(llm_layers: int, llm_hidden: int, llm_intermediate: int, llm_heads: int, llm_kv_heads: int,
                      llm_head_dim: int, vit_hidden: int, vit_intermediate: int, vit_heads: int, vit_vocab: int,
                      image_patches: list[int], visual_tokens: int, prompt_tokens: int, max_new_tokens: int,
                      nbytes: int, scores: str = SCORES_FULL, *, llm_vocab: int) -> int:
    """Understand: the visual encoder over every image's patches (one pass) and its tokenizer head, then the LLM
    over the prompt (text + ``visual_tokens``) and ``max_new_tokens`` single-token steps.

    The KV cache is allocated once for prompt + new tokens (``ovis_u1.llm.KVCache``) and is alive with the prompt
    pass; the visual encoder's activations are gone by then. A single-token step holds less than the prompt pass
    (one position's activations) plus the same :func:`llm_token_memory`.
    """
    patches = sum(image_patches)
    vit = 0
    if patches:
        vit = transformer_block_memory(patches, vit_hidden, 2 * vit_intermediate, vit_heads, nbytes)
        vit += attention_scores_memory(scores, 1, vit_heads, max(image_patches), max(image_patches), nbytes)
        vit += visual_tokens * vit_vocab * (3 * nbytes + 4)  # head logits, LayerNorm, fp32 softmax, cast back
    cache = llm_layers * 2 * llm_kv_heads * llm_head_dim * (prompt_tokens + max_new_tokens) * nbytes
    prompt = transformer_block_memory(prompt_tokens, llm_hidden, 2 * llm_intermediate, llm_heads, nbytes)
    prompt += attention_scores_memory(scores, 1, llm_heads, prompt_tokens, prompt_tokens, max(nbytes, 4))
    prompt += llm_token_memory(llm_hidden, llm_intermediate, llm_vocab, nbytes)
    return max(vit, prompt + cache) + RESERVE


def vae_decode_memory(latent_height: int, latent_width: int, nbytes: int,
                      block_out_channels: tuple[int, ...] = SDXL_BLOCK_OUT) -> int:
    """Peak of one image's VAE decode: the last up block at full resolution (see ``VAE_DECODE_TENSORS``)."""
    widest = block_out_channels[min(1, len(block_out_channels) - 1)] + VAE_DECODE_TENSORS * block_out_channels[0]
    pixels = latent_height * 8 * latent_width * 8
    return math.ceil(VAE_MARGIN * widest * pixels * nbytes)


def vae_encode_memory(height: int, width: int, nbytes: int,
                      block_out_channels: tuple[int, ...] = SDXL_BLOCK_OUT) -> int:
    """Peak of one image's VAE encode: the first down block at full resolution (see ``VAE_ENCODE_TENSORS``)."""
    return math.ceil(VAE_MARGIN * VAE_ENCODE_TENSORS * block_out_channels[0] * height * width * nbytes)


PROMPT_TEMPLATE_TOKENS = 64  # system/user/assistant markup and image indicators around the question


def understand_request_memory(params, images, text: str, max_new_tokens: int, nbytes: int, attention="auto") -> int:
    """:func:`understand_memory` for one request to a model of ``params`` (``ovis_u1.config.OvisU1Params``): the
    images as the preprocessor resizes them; ``text`` (instruction + question) bounds the prompt's tokens by its
    UTF-8 bytes (no token is shorter than one byte)."""
    v, pre = params.vision, params.preprocess
    factor = pre.patch_size * pre.hidden_stride
    patches = []
    for img in images or []:
        h, w = smart_resize(img.height, img.width, factor=factor, min_pixels=pre.min_pixels, max_pixels=pre.max_pixels)
        patches.append(h * w // pre.patch_size**2)
    visual = sum(n // pre.hidden_stride**2 for n in patches)
    text_bytes = len(str(text).encode("utf-8", "replace"))  # bad text is refused later, by the library
    prompt = min(params.multimodal_max_length, visual + text_bytes + PROMPT_TEMPLATE_TOKENS)
    llm = qwen3_params(params.llm_config)
    return understand_memory(
        llm.num_hidden_layers, llm.hidden_size, llm.intermediate_size, llm.num_attention_heads,
        llm.num_key_value_heads, llm.head_dim, v.hidden_size, v.intermediate_size, v.num_heads, v.vocab_size,
        patches, visual, prompt, int(max_new_tokens), nbytes, scores=pack_kernel_scores(attention),
        llm_vocab=llm.vocab_size,
    )


def condition_request_memory(params, mode: str, width: int | None, height: int | None, nbytes: int,
                             attention="auto") -> int:
    """:func:`condition_memory` for one Encode Condition request: the condition image is resized to the
    preprocessor's pixel budget, every branch (2 for text-to-image, 3 for an edit) carries its visual tokens plus the
    prompt."""
    pixels = params.preprocess.max_pixels
    if isinstance(width, int) and isinstance(height, int):
        pixels = min(pixels, width * height)
    v = params.vision
    patches = max(1, pixels // v.patch_size**2)
    text = min(params.multimodal_max_length, patches // v.hidden_stride**2 + 512)
    llm = qwen3_params(params.llm_config)
    return condition_memory(llm.hidden_size, llm.intermediate_size, llm.num_attention_heads, v.hidden_size,
                            v.intermediate_size, v.num_heads, 3 if mode == "edit" else 2, text, patches, nbytes,
                            scores=pack_kernel_scores(attention))


def refiner_request_memory(mmdit_params, text_lengths: list[int], nbytes: int, scores: str = SCORES_NONE) -> int:
    """The token refiner over conditionings of ``text_lengths`` tokens, one pass each (the longest counts)."""
    p = mmdit_params
    longest = max(text_lengths, default=1)
    return transformer_block_memory(longest, p.hidden_size, 2 * int(p.hidden_size * p.mlp_ratio), p.num_heads,
                                    nbytes, score_tokens=longest, scores=scores)
