"""The activation estimates against the real peaks of the pack's modules, and the memory the generation loop holds.

The peak is the most bytes of tensors alive at once while a call runs, counted per storage by a TorchDispatchMode
(CPU torch keeps no allocator statistics): every tensor an operation creates is counted until its storage is freed;
views and in-place results of existing tensors are not new memory.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ovis_u1 import attention as attn
from ovis_u1 import estimates
from ovis_u1.config import MMDiTParams, VAEParams
from ovis_u1.math import embed_positions, float64_device, grid_ids
from ovis_u1.mmdit import MMDiT
from ovis_u1.vae import AutoencoderKL


class StoragePeak(TorchDispatchMode):
    """Peak of the live bytes of storages created inside the mode."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.live or key in inputs or storage.nbytes() == 0:
                continue
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)
        return out


def peak_bytes(fn) -> int:
    with torch.no_grad(), StoragePeak() as mode:
        fn()
    return mode.peak


def last_token_peak(llm, embeds: torch.Tensor, new_tokens: int = 3) -> int:
    """Peak bytes of the last generated token's step of ``ovis_u1.llm.generate`` (greedy, no end-of-sequence stop):
    from the report of the token before it to its own, its input's lookup, every layer, the LM head and the choice."""
    from ovis_u1.llm import generate

    mode = StoragePeak()

    def on_token(i: int, n: int) -> None:
        if i == n - 1:
            mode.__enter__()
        elif i == n:
            mode.__exit__(None, None, None)

    generate(llm, embeds, None, new_tokens, on_token=on_token)
    return mode.peak


def test_peak_counter_counts_what_is_alive_at_once():
    def work():
        a = torch.empty(1000, 1000)
        b = torch.ones(1000, 1000)
        del a
        c = torch.zeros(500, 1000)
        d = b.view(-1).add(1)
        b.mul_(2)
        return c, d

    assert peak_bytes(work) == 10_000_000  # b + c + d; a was freed before, the view and in-place add nothing


# ------------------------------------------------------------------------------------------------------- VAE
VAES = {"tiny": (8, 8, 16, 16), "wider": (32, 64, 128, 128)}


@pytest.fixture(scope="module", params=list(VAES))
def vae(request):
    widths = VAES[request.param]
    torch.manual_seed(0)
    return AutoencoderKL(VAEParams(block_out_channels=widths, norm_num_groups=4 if widths[0] < 32 else 32)).eval()


@pytest.mark.parametrize("size", [128, 192])
def test_vae_estimates_cover_the_measured_peak(vae, size):
    widths = vae.params.block_out_channels
    z = torch.randn(1, 4, size // 8, size // 8)
    x = torch.rand(1, 3, size, size) * 2 - 1
    for name, estimate, measured in [
        ("decode", estimates.vae_decode_memory(size // 8, size // 8, 4, widths), peak_bytes(lambda: vae.decode(z))),
        ("encode", estimates.vae_encode_memory(size, size, 4, widths), peak_bytes(lambda: vae.encode(x))),
    ]:
        assert measured <= estimate <= 1.5 * measured, (name, widths, size, measured, estimate)


def test_vae_estimate_of_the_real_widths_is_below_comfyui_sd_formula():
    # comfy/sd.py's SD/SDXL decode estimate (2178·h·w·64 bytes per dtype byte) assumes more than the fp32 VAE holds
    assert estimates.vae_decode_memory(128, 128, 4) < 2178 * 128 * 128 * 64 * 4


# ------------------------------------------------------------------------------------------------------ MMDiT
@pytest.fixture(scope="module")
def mmdit():
    torch.manual_seed(0)
    p = MMDiTParams(hidden_size=256, num_heads=4, depth=1, depth_single_blocks=1, axes_dim=(16, 24, 24),
                    vec_in_dim=32, context_in_dim=32)
    return MMDiT(p).eval()


@pytest.fixture
def backend():
    """Selects the pack's kernel for the rest of the test (``attention.using`` where the library has it)."""
    import contextlib

    with contextlib.ExitStack() as stack:
        if hasattr(attn, "using"):
            yield lambda name: stack.enter_context(attn.using(name))
        else:
            yield attn.set_attention_backend
            attn.set_attention_backend("auto")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["sdpa", "math"])
@pytest.mark.parametrize("size,text,with_context,rows", [(256, 48, False, 1), (256, 48, True, 2), (320, 80, True, 1)])
def test_sampling_estimate_covers_the_measured_forward(mmdit, backend, dtype, kernel, size, text, with_context, rows):
    backend(kernel)
    model = mmdit.to(dtype)
    p = model.params
    n = (size // 16) ** 2
    tokens = torch.randn(rows, text, p.hidden_size, dtype=dtype)
    pooled = torch.randn(rows, p.vec_in_dim, dtype=dtype)
    context = torch.randn(rows, n, p.in_channels, dtype=dtype) if with_context else None
    x = torch.randn(rows, n, p.in_channels, dtype=dtype)
    t = torch.full((rows,), 0.5, dtype=dtype)
    measured = peak_bytes(lambda: model(x, t, model.prepare(tokens, pooled, size, size, context)))
    nbytes = torch.finfo(dtype).bits // 8
    estimate = estimates.sampling_memory(p.hidden_size, p.mlp_ratio, p.num_heads, rows, text, size, size,
                                         with_context, nbytes, scores=estimates.pack_kernel_scores(kernel))
    estimate -= estimates.RESERVE  # workspaces the CPU kernels do not show
    assert measured <= estimate <= 1.5 * measured, (measured, estimate)


def test_flash_kernels_are_not_charged_for_scores():
    full = estimates.sampling_memory(1536, 4.0, 12, 2, 512, 1536, 1536, True, 2, scores=estimates.SCORES_FULL)
    chunked = estimates.sampling_memory(1536, 4.0, 12, 2, 512, 1536, 1536, True, 2, scores=estimates.SCORES_CHUNKED)
    none = estimates.sampling_memory(1536, 4.0, 12, 2, 512, 1536, 1536, True, 2, scores=estimates.SCORES_NONE)
    seq = 512 + 2 * 96 * 96
    assert full - none == 2 * 12 * seq * seq * 2 * 2
    assert chunked - none == 2 * 12 * estimates.CHUNK_QUERIES * seq * 4 * estimates.CHUNK_COPIES
    assert none < 4 * 1024**3  # a 1536² edit of the full-size MMDiT, cond + uncond in one batch
    assert estimates.pack_kernel_scores("auto") == estimates.pack_kernel_scores("sdpa") == estimates.SCORES_NONE
    assert estimates.pack_kernel_scores("flash_attn") == estimates.SCORES_NONE
    assert estimates.pack_kernel_scores("math") == estimates.SCORES_FULL
    with pytest.raises(ValueError, match="scores must be one of"):
        estimates.attention_scores_memory("dense", 1, 1, 1, 1, 2)


def test_sampling_estimate_grows_with_text_context_and_rows():
    base = dict(hidden=1536, mlp_ratio=4.0, heads=12, width=1024, height=1024, nbytes=2, scores="none")
    t2i = estimates.sampling_memory(batch=1, text_tokens=300, with_context=False, **base)
    longer = estimates.sampling_memory(batch=1, text_tokens=600, with_context=False, **base)
    edit = estimates.sampling_memory(batch=1, text_tokens=300, with_context=True, **base)
    two = estimates.sampling_memory(batch=2, text_tokens=300, with_context=True, **base)
    assert t2i < longer < edit < two


# ------------------------------------------------------------------------------------------------ understand
def full_size_understand(images: list[int], prompt: int, new_tokens: int) -> int:
    visual = sum(p // 4 for p in images)
    return estimates.understand_memory(28, 2048, 6144, 16, 8, 128, 1024, 2816, 8, 65536, images, visual,
                                       prompt + visual, new_tokens, 2, scores="none", llm_vocab=151936)


def test_understand_estimate_follows_images_and_new_tokens():
    text_only = full_size_understand([], 100, 1024)
    # the KV cache of the full-size LLM: 28 layers × (k, v) × 8 heads × 128 × bf16 = 114,688 bytes per position
    assert full_size_understand([], 100, 2024) - text_only == 1000 * 114_688
    one = full_size_understand([5184], 100, 1024)
    two = full_size_understand([5184, 5184], 100, 1024)
    assert text_only < one < two


@pytest.mark.parametrize("weight_dtype", [None, "fp8_e4m3fn"])
def test_a_generated_token_allocates_what_the_estimate_counts(weight_dtype):
    """One token's step holds one position's activations and :func:`estimates.llm_token_memory`: its logits and one
    weight matrix cast to the compute dtype — never the token table (fp8 storage leaves it in the compute dtype, so
    neither the lookup nor the tied LM head converts it)."""
    import ovis_u1
    from ovis_u1.llm import qwen3_params
    from tests.golden import CHECKPOINT

    model = ovis_u1.load_model(CHECKPOINT, device="cpu", dtype=torch.bfloat16, weight_dtype=weight_dtype)
    p = qwen3_params(model.params.llm_config)
    table = model.llm.get_input_embeddings()
    with torch.inference_mode():
        embeds = table(torch.arange(12))
    measured = last_token_peak(model.llm, embeds)
    estimate = (estimates.transformer_block_memory(1, p.hidden_size, 2 * p.intermediate_size, p.num_attention_heads, 2)
                + estimates.llm_token_memory(p.hidden_size, p.intermediate_size, p.vocab_size, 2))
    assert measured <= estimate, (measured, estimate)
    assert table.weight.nelement() * 2 > estimate  # a converted table would not fit


def test_generation_allocates_its_kv_cache_once(monkeypatch):
    from ovis_u1 import llm as llm_module

    config = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}
    torch.manual_seed(0)
    model = llm_module.build_llm(config).eval()
    allocations = []
    original = llm_module.KVCache._reserve

    def counting(self, k, needed):
        before = self.buffer
        original(self, k, needed)
        if self.buffer is not before:
            allocations.append(tuple(self.buffer.shape))

    monkeypatch.setattr(llm_module.KVCache, "_reserve", counting)
    embeds = torch.randn(7, 32)
    ids = llm_module.generate(model, embeds, eos_token_id=None, max_new_tokens=9)
    assert len(ids) == 9
    assert allocations == [(2, 2, 1, 2, 7 + 9, 8)]  # [layers, k/v, batch, kv heads, prompt + new, head dim]


def test_kv_cache_without_capacity_grows_and_keeps_its_contents():
    from ovis_u1.llm import KVCache

    cache = KVCache(1)
    k1, v1 = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    cache.update(0, k1, v1)
    k2, v2 = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    keys, values = cache.update(0, k2, v2)
    assert cache.length == 8
    assert torch.equal(keys, torch.cat([k1, k2], 2)) and torch.equal(values, torch.cat([v1, v2], 2))


# ---------------------------------------------------------------------------------------------- RoPE, prepare
def test_rope_angles_move_to_the_cpu_where_a_device_lacks_float64():
    assert float64_device(torch.device("mps")) == torch.device("cpu")
    assert float64_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert float64_device(torch.device("cpu")) == torch.device("cpu")


def test_positions_are_the_tables_prepare_builds(mmdit):
    model = mmdit.float()
    p = model.params
    tokens, pooled = torch.randn(1, 9, p.hidden_size), torch.randn(1, p.vec_in_dim)
    context = torch.randn(1, 16, p.in_channels)
    prepared = model.prepare(tokens, pooled, 64, 64, context)
    pe, pe_img = model.positions(9, 64, 64, True)
    ids = torch.cat([torch.zeros(1, 9, 3), grid_ids(4, 4, 0.0), grid_ids(4, 4, 1.0)], dim=1)
    assert torch.equal(pe, embed_positions(ids, p.axes_dim, p.theta))
    assert torch.equal(prepared.pe, pe) and torch.equal(prepared.pe_img, pe_img)
    again = model.prepare(tokens, pooled, 64, 64, positions=(pe, pe_img),
                          context_tokens=model.project_context(context, tokens.dtype))
    assert torch.equal(again.context, prepared.context) and again.pe is pe
