"""The Qwen3 language model of Ovis-U1, written for this pack (transformers supplies only the tokenizer).

Why not transformers' Qwen3 classes:

* with transformers 5.24 every KV-cached call warns that ``past_key_values`` of ``Qwen3Model.forward`` goes away in
  5.40, so generation built on it would break on a future upgrade;
* the LLM must be built from an injected ``operations`` namespace (``comfy.ops`` inside ComfyUI, so that ComfyUI
  can stream, cast and store its weights in fp8), which transformers' classes do not take;
* ComfyUI core keeps its own Qwen3 (``comfy/text_encoders/llama.py``) for the same reasons;
* the pack must compute the same numbers under transformers 4.51 … 5.x, which is simplest when no model code of
  transformers runs at all.

The numerics follow transformers 4.51.3 (the version of the official goldens) step by step: RMSNorm with the
statistics in fp32 and ``weight * x.to(dtype)``, per-head q/k RMSNorm, rotary tables from a float ``inv_freq`` and
an fp32 matmul with the positions, cast to the activation dtype, GQA by repeating key/value heads, causal
attention with scale head_dim^-0.5, SwiGLU MLP, final norm, lm_head tied to the embedding table.

Two uses: the condition pass for image generation (official modeling_ovis_u1.py, OvisU1.generate_condition, without
its unused logits and loss: final-norm output ‖ input of the last layer, which transformers reports as
``hidden_states[-2]``) and token generation for understanding (a KV-cached loop that reports every token and can be
interrupted; official OvisU1.generate, which calls the LLM's generate).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import BACKENDS, causal_attention
from .config import Qwen3Params, qwen3_params  # noqa: F401 — re-exported: defined here first
from .norms import RMSNorm, norm  # noqa: F401 — RMSNorm re-exported: the class of the LLM's norms
from .operations import cast_weights_of


# ------------------------------------------------------------------------------------------------ modules
def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [1, L, head_dim] for positions [L], as transformers 4.51.3 computes them.

    ``inv_freq`` is formed in float on the CPU (where transformers builds it at model construction), moved to the
    positions' device, multiplied with the positions by an fp32 matmul under disabled autocast, duplicated for the
    two halves, and cos/sin are cast to the activation dtype.
    """
    inv_freq = _inverse_frequencies(head_dim, theta, positions.device)
    device_type = positions.device.type if positions.device.type != "mps" else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):
        freqs = (inv_freq[None, :, None].float() @ positions[None, None, :].float()).transpose(1, 2)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


@functools.lru_cache(maxsize=8)
def _inverse_frequencies(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """theta^(-2k/head_dim), formed on the CPU in float; cached per device (a normal tensor, usable in any mode)."""
    with torch.inference_mode(False):
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").to(dtype=torch.float) / head_dim
        return (1.0 / (theta**exponent)).to(device)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D] rotated by the half-split RoPE tables [1, L, D]."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


class KVCache:
    """Keys and values of every layer so far, written into one buffer [layers, 2, B, H_kv, capacity, D].

    As ComfyUI's own Qwen3 (``comfy/text_encoders/llama.py``) keeps it: the buffer is allocated once, at the first
    write, for ``capacity`` positions (prompt + new tokens), and every step writes its keys and values into it; the
    attention reads the filled prefix. Growing by ``torch.cat`` instead copies the whole cache at every token and
    holds two copies at once. Without a capacity (or past it) the buffer doubles, so no use is cut short.
    """

    def __init__(self, num_layers: int, capacity: int | None = None):
        self.num_layers = num_layers
        self.capacity = capacity
        self.buffer: torch.Tensor | None = None
        self.lengths = [0] * num_layers

    @property
    def length(self) -> int:
        return self.lengths[0]

    def _reserve(self, k: torch.Tensor, needed: int) -> None:
        if self.buffer is not None and needed <= self.buffer.shape[4]:
            return
        size = max(needed, self.capacity or 0, 2 * self.buffer.shape[4] if self.buffer is not None else 0)
        b, h, _, d = k.shape
        grown = torch.empty(self.num_layers, 2, b, h, size, d, device=k.device, dtype=k.dtype)
        if self.buffer is not None:
            grown[..., : self.buffer.shape[4], :] = self.buffer
        self.buffer = grown

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H_kv, T, D] after the layer's earlier positions → all its keys and values so far."""
        start = self.lengths[layer]
        end = start + k.shape[2]
        self._reserve(k, end)
        self.buffer[layer, 0, :, :, start:end] = k
        self.buffer[layer, 1, :, :, start:end] = v
        self.lengths[layer] = end
        return self.buffer[layer, 0, :, :, :end], self.buffer[layer, 1, :, :, :end]


class Qwen3Attention(nn.Module):
    def __init__(self, p: Qwen3Params, layer: int, operations=nn):
        super().__init__()
        self.layer, self.head_dim, self.kv_groups = layer, p.head_dim, p.kv_groups
        q_width, kv_width = p.num_attention_heads * p.head_dim, p.num_key_value_heads * p.head_dim
        self.q_proj = operations.Linear(p.hidden_size, q_width, bias=p.attention_bias)
        self.k_proj = operations.Linear(p.hidden_size, kv_width, bias=p.attention_bias)
        self.v_proj = operations.Linear(p.hidden_size, kv_width, bias=p.attention_bias)
        self.o_proj = operations.Linear(q_width, p.hidden_size, bias=p.attention_bias)
        self.q_norm = norm(p.head_dim, p.rms_norm_eps, operations)
        self.k_norm = norm(p.head_dim, p.rms_norm_eps, operations)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        b, n, _ = x.shape
        heads = (b, n, -1, self.head_dim)
        q = apply_rotary(self.q_norm(self.q_proj(x).view(heads)).transpose(1, 2), cos, sin)
        k = apply_rotary(self.k_norm(self.k_proj(x).view(heads)).transpose(1, 2), cos, sin)
        v = self.v_proj(x).view(heads).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = causal_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class Qwen3MLP(nn.Module):
    def __init__(self, p: Qwen3Params, operations=nn):
        super().__init__()
        self.gate_proj = operations.Linear(p.hidden_size, p.intermediate_size, bias=False)
        self.up_proj = operations.Linear(p.hidden_size, p.intermediate_size, bias=False)
        self.down_proj = operations.Linear(p.intermediate_size, p.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, p: Qwen3Params, layer: int, operations=nn):
        super().__init__()
        self.self_attn = Qwen3Attention(p, layer, operations)
        self.mlp = Qwen3MLP(p, operations)
        self.input_layernorm = norm(p.hidden_size, p.rms_norm_eps, operations)
        self.post_attention_layernorm = norm(p.hidden_size, p.rms_norm_eps, operations)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    """Embedding table, decoder layers and final norm (checkpoint prefix ``llm.model.``)."""

    def __init__(self, p: Qwen3Params, operations=nn):
        super().__init__()
        self.params = p
        self.embed_tokens = operations.Embedding(p.vocab_size, p.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(p, i, operations) for i in range(p.num_hidden_layers))
        self.norm = norm(p.hidden_size, p.rms_norm_eps, operations)

    def forward(self, embeds: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """embeds [B, L, H] (positions continue after the cache) → (final-norm output, input of the last layer)."""
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + embeds.shape[1], device=embeds.device)
        cos, sin = rotary_tables(positions, self.params.head_dim, self.params.rope_theta, embeds.dtype)
        x = penultimate = embeds
        for layer in self.layers:
            penultimate = x
            x = layer(x, cos, sin, cache)
        return self.norm(x), penultimate


class TiedLMHead(nn.Module):
    """The output projection that reuses the embedding table: no weight of its own, so no second copy.

    The table is held outside the module registry (it is registered once, under ``model.embed_tokens``) and read
    through the namespace's cast of that layer, as ComfyUI's own Qwen3 reads it (``comfy/text_encoders/llama.py``,
    ``BaseQwen3.logits``): under ComfyUI's lowvram or Dynamic VRAM the table stays on the offload device and only
    the cast brings it to the computing device.
    """

    def __init__(self, embedding: nn.Module, operations=nn):
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)
        self.cast_weights = cast_weights_of(operations)

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.cast_weights(self._embedding, x) as (table, _):
            return F.linear(x, table)


class Qwen3ForCausalLM(nn.Module):
    """``llm.model`` + ``llm.lm_head``: the module tree and parameter names of the checkpoint."""

    def __init__(self, p: Qwen3Params, operations=nn):
        super().__init__()
        self.params = p
        self.model = Qwen3Model(p, operations)
        if p.tie_word_embeddings:
            self.lm_head = TiedLMHead(self.model.embed_tokens, operations)
        else:
            self.lm_head = operations.Linear(p.hidden_size, p.vocab_size, bias=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens


def build_llm(llm_config: dict, attention: str = "auto", operations=nn) -> Qwen3ForCausalLM:
    """The Qwen3 of ``llm_config`` with every Linear/Embedding from ``operations``; call under
    ``torch.device('meta')`` to allocate nothing (nothing needs fixing after the weights are assigned).

    ``attention`` is only checked here: the kernel of a pass is the one its caller sets with ``attention.using``
    (``OvisU1`` sets its own for each of its passes).
    """
    if attention not in BACKENDS:
        raise ValueError(f"attention must be one of {', '.join(BACKENDS)}, got {attention!r}")
    return Qwen3ForCausalLM(qwen3_params(llm_config), operations)


# ------------------------------------------------------------------------------------------------- passes
@torch.inference_mode()
def condition_states(llm: Qwen3ForCausalLM, embeds: list[torch.Tensor]) -> list[torch.Tensor]:
    """[last layer after the final norm ‖ second-to-last layer output] for each sequence ([L_i, H] → [L_i, 2H]).

    Sequences of equal length share one batched pass. Sequences of different lengths are not padded into one
    batch: padding changes the kernels' reduction order, and the result would no longer equal the official
    batch-1 pass bit for bit.
    """
    by_length: dict[int, list[int]] = {}
    for i, e in enumerate(embeds):
        by_length.setdefault(e.shape[0], []).append(i)
    states: list[torch.Tensor | None] = [None] * len(embeds)
    for indices in by_length.values():
        last, penultimate = llm.model(torch.stack([embeds[i] for i in indices]))
        both = torch.cat([last, penultimate], dim=-1)
        for row, i in enumerate(indices):
            states[i] = both[row]
    return states


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p`` (at least one)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(descending=False)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop = cumulative <= (1 - top_p)
    drop[..., -1] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


@dataclass(frozen=True)
class TokenSampling:
    """How each new token is chosen: greedy (``do_sample`` false: the others are unused), or drawn at
    ``temperature`` from the smallest set of tokens holding ``top_p`` of the probability, by a CPU generator seeded
    with ``seed``."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@torch.inference_mode()
def generate(
    llm: Qwen3ForCausalLM,
    embeds: torch.Tensor,
    eos_token_id: int | None,
    max_new_tokens: int,
    sampling: TokenSampling = TokenSampling(),
    on_token: Callable[[int, int], None] | None = None,
    scores: list[torch.Tensor] | None = None,
    context: int | None = None,
) -> list[int]:
    """Greedy (or temperature/top-p sampled: ``sampling``) continuation of one sequence of input embeddings [L, H].

    ``on_token(i, max_new_tokens)`` runs after each token (progress; it may raise to interrupt). ``scores``, when
    given, collects the logits of every step. ``context`` (the LLM's ``max_position_embeddings``) bounds prompt +
    answer: generation stops there, so the KV cache never holds more positions than the model has, whatever
    ``max_new_tokens`` asks (``OvisU1.understand`` refuses such a request before it gets here).
    """
    do_sample, temperature, top_p = sampling.do_sample, sampling.temperature, sampling.top_p
    generator = torch.Generator().manual_seed(sampling.seed) if do_sample else None
    embed_tokens = llm.get_input_embeddings()
    if context is not None:
        max_new_tokens = min(max_new_tokens, max(context - embeds.shape[0], 0))
    # every step adds one position; the last one needs none for a following step
    cache = KVCache(len(llm.model.layers), capacity=embeds.shape[0] + max_new_tokens)
    inputs = embeds[None]
    new_ids: list[int] = []
    for i in range(max_new_tokens):
        hidden, _ = llm.model(inputs, cache)
        logits = llm.lm_head(hidden[:, -1]).float()
        if scores is not None:
            scores.append(logits[0].cpu())
        if do_sample:
            filtered = _top_p_filter(logits / max(temperature, 1e-5), top_p)
            probs = filtered.softmax(-1).cpu()
            token = int(torch.multinomial(probs[0], 1, generator=generator))
        else:
            token = int(logits[0].argmax())
        new_ids.append(token)
        if on_token is not None:
            on_token(i + 1, max_new_tokens)
        if eos_token_id is not None and token == eos_token_id:
            break
        next_ids = torch.tensor([[token]], device=embeds.device)
        inputs = embed_tokens(next_ids).to(device=embeds.device, dtype=embeds.dtype)
    return new_ids
