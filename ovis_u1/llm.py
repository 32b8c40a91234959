"""The Qwen3 language model, built with transformers' own classes from the checkpoint's ``llm_config``.

Two uses: the condition pass for image generation (hidden states only — no lm_head, no loss, no KV cache; SPEC
§C.2, §D.3) and token generation for understanding (a plain KV-cached loop so that every token can report progress
and be interrupted; SPEC §B.6).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# transformers' attention implementation for each of this package's attention backends
ATTN_IMPLEMENTATION = {"auto": "sdpa", "sdpa": "sdpa", "math": "eager", "flash_attn": "flash_attention_2"}
_CONFIG_DROP = ("torch_dtype", "dtype", "_attn_implementation_autoset", "_name_or_path", "architectures")


def qwen3_config(llm_config: dict, attention: str = "sdpa"):
    from transformers import Qwen3Config

    config = Qwen3Config(**{k: v for k, v in llm_config.items() if k not in _CONFIG_DROP})
    config._attn_implementation = ATTN_IMPLEMENTATION.get(attention, attention)
    return config


def build_llm(config):
    """Qwen3ForCausalLM for ``config``; call under ``torch.device('meta')`` to allocate nothing."""
    from transformers import Qwen3ForCausalLM

    return Qwen3ForCausalLM(config)


def finish_llm(llm, device: torch.device) -> None:
    """After weights are assigned: tie lm_head and rebuild the rotary table, which meta construction left empty."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    if getattr(llm.config, "tie_word_embeddings", True):
        llm.lm_head.weight = llm.model.embed_tokens.weight
    llm.model.rotary_emb = Qwen3RotaryEmbedding(config=llm.config).to(device)


def set_attention(llm, attention: str) -> None:
    llm.config._attn_implementation = ATTN_IMPLEMENTATION.get(attention, attention)


@torch.inference_mode()
def condition_states(llm, embeds: list[torch.Tensor]) -> list[torch.Tensor]:
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
        out = llm.model(inputs_embeds=torch.stack([embeds[i] for i in indices]), output_hidden_states=True,
                        use_cache=False)
        both = torch.cat([out.hidden_states[-1], out.hidden_states[-2]], dim=-1)
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


@torch.inference_mode()
def generate(
    llm,
    embeds: torch.Tensor,
    eos_token_id: int | None,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    on_token: Callable[[int, int], None] | None = None,
    scores: list[torch.Tensor] | None = None,
) -> list[int]:
    """Greedy (or temperature/top-p sampled) continuation of one sequence of input embeddings [L, H].

    ``on_token(i, max_new_tokens)`` runs after each token (progress; it may raise to interrupt). ``scores``, when
    given, collects the logits of every step.
    """
    generator = torch.Generator().manual_seed(seed) if do_sample else None
    embed_tokens = llm.get_input_embeddings()
    inputs = embeds[None]
    past = None
    new_ids: list[int] = []
    for i in range(max_new_tokens):
        out = llm.model(inputs_embeds=inputs, past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = llm.lm_head(out.last_hidden_state[:, -1]).float()
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
        inputs = embed_tokens(torch.tensor([[token]], device=embeds.device))
    return new_ids
