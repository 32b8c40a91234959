"""The pack's own Qwen3 against transformers' Qwen3ForCausalLM (still installed for the tokenizer, so it can serve
as the reference here): same logits, hidden states and KV-cached generation in fp32 on a tiny random config; bf16
stays finite; every Linear/Embedding comes from the injected operations namespace."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from ovis_u1 import attention as attn
from ovis_u1.llm import RMSNorm, TiedLMHead, TokenSampling, build_llm, condition_states, generate, qwen3_params
from tests.golden import CHECKPOINT, requires_golden

TINY = {
    "model_type": "qwen3", "vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "max_position_embeddings": 512, "tie_word_embeddings": True, "attention_bias": False,
    "rope_scaling": None, "use_sliding_window": False, "torch_dtype": "float32", "architectures": ["Qwen3ForCausalLM"],
}
FP32 = dict(rtol=1e-5, atol=1e-5)


def reference(config: dict):
    """transformers' Qwen3ForCausalLM (sdpa) with seeded random weights, every norm weight away from 1."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    keep = {k: v for k, v in config.items() if k not in ("torch_dtype", "architectures", "model_type")}
    hf_config = Qwen3Config(**keep)
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model


def ours_from(ref, config: dict) -> nn.Module:
    """Our LLM built on meta and given the reference's weights by assignment, as load_model does."""
    with torch.device("meta"):
        llm = build_llm(config)
    state = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight" or not config["tie_word_embeddings"]}
    result = llm.load_state_dict(state, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    return llm.eval()


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def pair(request):
    config = dict(TINY, tie_word_embeddings=request.param)
    ref = reference(config)
    return ref, ours_from(ref, config), config


def embeds_of(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, length, TINY["hidden_size"], generator=torch.Generator().manual_seed(seed))


def test_logits_and_hidden_states_equal_transformers(pair):
    ref, ours, _ = pair
    e = embeds_of(13)
    with torch.no_grad():
        out = ref(inputs_embeds=e, output_hidden_states=True, use_cache=False)
        last, penultimate = ours.model(e)
        logits = ours.lm_head(last)
    torch.testing.assert_close(last, out.hidden_states[-1], **FP32)
    torch.testing.assert_close(penultimate, out.hidden_states[-2], **FP32)
    torch.testing.assert_close(logits, out.logits, **FP32)
    both = condition_states(ours, [e[0], e[0, :7]])
    torch.testing.assert_close(both[0], torch.cat([out.hidden_states[-1], out.hidden_states[-2]], -1)[0], **FP32)
    assert both[1].shape == (7, 2 * TINY["hidden_size"])


def test_kv_cached_generation_equals_transformers(pair):
    ref, ours, _ = pair
    e = embeds_of(9, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference's own cache deprecations are not under test
        out = ref.generate(inputs_embeds=e, attention_mask=torch.ones(1, 9, dtype=torch.long), max_new_tokens=6,
                           do_sample=False, eos_token_id=None, pad_token_id=0, output_scores=True,
                           return_dict_in_generate=True)
    scores: list[torch.Tensor] = []
    ids = generate(ours, e[0], eos_token_id=None, max_new_tokens=6, scores=scores)
    assert ids == out.sequences[0, -6:].tolist()
    torch.testing.assert_close(torch.stack(scores), torch.cat(out.scores), **FP32)


def test_cached_steps_equal_a_full_pass(pair):
    """Prefill in two chunks, then single tokens: the same as one pass over the whole sequence."""
    from ovis_u1.llm import KVCache

    _, ours, _ = pair
    e = embeds_of(12, seed=3)
    with torch.no_grad():
        full, _ = ours.model(e)
        cache = KVCache(len(ours.model.layers))
        parts = [ours.model(chunk, cache)[0] for chunk in (e[:, :5], e[:, 5:10], e[:, 10:11], e[:, 11:])]
    torch.testing.assert_close(torch.cat(parts, 1), full, **FP32)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_attention_backends_agree(pair, backend):
    _, ours, _ = pair
    e = embeds_of(10, seed=4)
    with torch.no_grad():
        base, _ = ours.model(e)
        with attn.using(backend):
            other, _ = ours.model(e)
    torch.testing.assert_close(other, base, **FP32)


@pytest.mark.parametrize("backend, sdpa_takes_groups", [("sdpa", True), ("sdpa", False), ("math", True)],
                         ids=["sdpa", "sdpa-before-torch-2.5", "math"])
def test_a_generated_token_copies_no_kv_prefix(monkeypatch, backend, sdpa_takes_groups):
    """The keys and values of a step are read in the KV cache: what a generated token allocates grows with the
    prefix only by the attention scores its kernel holds (none for SDPA); repeating the grouped key/value heads
    copied the whole prefix in every layer, at every token."""
    from ovis_u1 import estimates
    from tests.test_estimates import last_token_peak

    monkeypatch.setattr(attn, "SDPA_TAKES_GROUPS", sdpa_takes_groups, raising=False)
    torch.manual_seed(0)
    llm = build_llm(TINY).eval()
    assert TINY["num_key_value_heads"] < TINY["num_attention_heads"]
    with attn.using(backend):
        short, long = (last_token_peak(llm, embeds_of(n)[0]) for n in (8, 200))
    scores = estimates.attention_scores_memory(estimates.pack_kernel_scores(backend), 1,
                                               TINY["num_attention_heads"], 1, 200 - 8, 4)
    assert long - short <= scores, (f"a token of a 200-position prefix allocates {long} bytes, of an 8-position "
                                    f"one {short}")


@requires_golden
def test_a_generated_token_converts_no_table():
    """With fp8 storage a generated token's step converts weights one layer at a time and never the token table:
    neither to look up the next input's row nor as the tied LM head (the tiny model's table is larger in the compute
    dtype than everything else a step holds at once)."""
    import ovis_u1
    from tests.test_estimates import last_token_peak

    model = ovis_u1.load_model(CHECKPOINT, device="cpu", dtype=torch.bfloat16, weight_dtype="fp8_e4m3fn")
    table = model.llm.get_input_embeddings()
    assert model.llm.params.tie_word_embeddings
    with torch.inference_mode():
        embeds = table(torch.arange(12))
    peak = last_token_peak(model.llm, embeds)
    table_bytes = table.weight.nelement() * torch.bfloat16.itemsize
    assert peak < table_bytes, f"a generated token holds {peak} bytes at once, the table is {table_bytes} in bf16"


def test_grouped_heads_give_the_numbers_of_repeated_heads(monkeypatch):
    """SDPA with grouped heads computes what it computes on repeated heads (transformers' sdpa attention), bit for
    bit; without ``enable_gqa`` (torch < 2.5) and on the math kernel the same attention to rounding."""
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(2, 1, 2, 40, 16, generator=g)  # [k/v, B, H_kv, capacity, D], a cache filled to 30
    k, v = cache[0, :, :, :30], cache[1, :, :, :30]
    for lq in (1, 30, 4):
        q = torch.randn(1, 4, lq, 16, generator=g)
        mask = torch.ones(lq, 30, dtype=torch.bool).tril(30 - lq)
        repeated = torch.nn.functional.scaled_dot_product_attention(
            q, attn.repeat_kv(k, 2), attn.repeat_kv(v, 2), attn_mask=mask, scale=0.25)
        assert torch.equal(attn.causal_attention(q, k, v, 0.25), repeated)
        with attn.using("math"):
            torch.testing.assert_close(attn.causal_attention(q, k, v, 0.25), repeated, **FP32)
        monkeypatch.setattr(attn, "SDPA_TAKES_GROUPS", False)
        torch.testing.assert_close(attn.causal_attention(q, k, v, 0.25), repeated, **FP32)
        monkeypatch.undo()


def test_bf16_is_finite(pair):
    _, ours, config = pair
    llm = build_llm(config)
    llm.load_state_dict(ours.state_dict(), assign=False)
    llm = llm.to(torch.bfloat16)
    e = embeds_of(8, seed=5).to(torch.bfloat16)
    states = condition_states(llm, [e[0]])
    assert states[0].dtype == torch.bfloat16 and torch.isfinite(states[0]).all()
    scores: list[torch.Tensor] = []
    ids = generate(llm, e[0], eos_token_id=None, max_new_tokens=4,
                   sampling=TokenSampling(do_sample=True, top_p=0.9, seed=3), scores=scores)
    assert len(ids) == 4 and all(torch.isfinite(s).all() for s in scores)


def test_norm_casts_its_weight_to_the_input():
    norm = RMSNorm(8, 1e-6)
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert norm(x).dtype == torch.bfloat16


def test_tied_head_shares_the_embedding_table():
    llm = build_llm(TINY)
    assert isinstance(llm.lm_head, TiedLMHead)
    assert llm.lm_head.weight is llm.model.embed_tokens.weight
    assert "lm_head.weight" not in llm.state_dict()
    assert all(not name.startswith("lm_head") for name, _ in llm.named_parameters())


class Recording:
    """An operations namespace that remembers every layer it builds."""

    built: list[nn.Module] = []

    class Linear(nn.Linear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            Recording.built.append(self)

    class Embedding(nn.Embedding):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            Recording.built.append(self)


@pytest.mark.parametrize("tied", [True, False])
def test_every_layer_comes_from_the_injected_operations(tied):
    Recording.built = []
    with torch.device("meta"):
        llm = build_llm(dict(TINY, tie_word_embeddings=tied), operations=Recording)
    built = {id(m) for m in Recording.built}
    layers = [m for m in llm.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    assert layers and all(id(m) in built for m in layers)
    for name, module in llm.named_modules():
        owns_weights = any(True for _ in module.parameters(recurse=False))
        assert not owns_weights or id(module) in built or isinstance(module, RMSNorm), name
    assert len(layers) == 1 + 7 * TINY["num_hidden_layers"] + (0 if tied else 1)


@pytest.mark.parametrize(
    "change, needle",
    [({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
     ({"use_sliding_window": True}, "use_sliding_window"),
     ({"hidden_act": "gelu"}, "hidden_act"),
     ({"num_key_value_heads": 3}, "num_key_value_heads")],
)
def test_unsupported_configs_are_named(change, needle):
    with pytest.raises(ValueError, match=needle):
        qwen3_params(dict(TINY, **change))


def test_rope_theta_is_read_from_either_config_layout():
    five = {k: v for k, v in TINY.items() if k not in ("rope_theta", "rope_scaling")}
    five["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    assert qwen3_params(five).rope_theta == 5e5 and qwen3_params(TINY).rope_theta == 1e6


def test_unknown_attention_is_named():
    with pytest.raises(ValueError, match="attention"):
        build_llm(TINY, attention="fast")
