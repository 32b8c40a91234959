"""A small random-weight Ovis-U1, built by the pack itself, for smoke runs on a machine without the real weights.

It has the exact Ovis-U1 architecture at toy width (every module, prompt, tokenizer and file of the Hugging Face
layout), so everything runs end to end in seconds — but its images are noise and its text is nonsense.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import TIED_KEYS
from .config import params_from_dicts
from .model import OvisU1

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]
LLM_VOCAB = 320


def _byte_alphabet() -> list[str]:
    """The 256 printable characters GPT-2-style byte-level BPE uses for the bytes 0..255, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer (no merges) with the Qwen chat special tokens."""
    vocab = {c: i for i, c in enumerate(_byte_alphabet())}
    added = {}
    for j, tok in enumerate(SPECIAL_TOKENS + THINK_TOKENS):
        vocab[tok] = 256 + j
        added[str(256 + j)] = {
            "content": tok, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": tok in SPECIAL_TOKENS,
        }
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "errors": "replace",
    }, indent=1))
    (directory / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))


def smoke_config() -> dict:
    vae = {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [8, 8, 16, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "force_upcast": False, "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
        "norm_num_groups": 4, "sample_size": 512, "scaling_factor": 0.13025,
    }
    return {
        "model_type": "ovis_u1",
        "architectures": ["OvisU1"],
        "smoke_model": True,
        "hidden_size": 64,
        "multimodal_max_length": 2048,
        "conversation_formatter_class": "Qwen3ConversationFormatter",
        "llm_attn_implementation": "sdpa",
        "llm_config": {
            "model_type": "qwen3", "vocab_size": LLM_VOCAB, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 4096,
            "tie_word_embeddings": True, "attention_bias": False, "eos_token_id": 258, "pad_token_id": 256,
        },
        "visual_tokenizer_config": {
            "model_type": "aimv2_visual_tokenizer", "vocab_size": 64, "tokenize_function": "softmax", "tau": 1.0,
            "hidden_stride": 2,
            "backbone_config": {
                "model_type": "aimv2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_channels": 3, "image_size": 112, "patch_size": 14,
                "hidden_stride": 2, "temporal_patch_size": 1, "window_size": 112, "fullatt_block_indexes": [1],
                "preserve_original_pe": True, "interpolate_pe_method": "one_dim", "disable_rope": False,
                "rms_norm_eps": 1e-5, "qkv_bias": False, "use_bias": False,
            },
        },
        "visual_generator_config": {
            "model_type": "yak", "in_channels": 16, "out_channels": 16, "vec_in_dim": 64, "context_in_dim": 128,
            "hidden_size": 64, "mlp_ratio": 4, "num_heads": 4, "depth": 1, "depth_single_blocks": 1,
            "axes_dim": [4, 6, 6], "theta": 10000, "qkv_bias": True, "guidance_embed": False,
            "txt_type": "refiner", "timestep_shift": False, "base_shift": 0.5, "max_shift": 1.15, "vae_config": vae,
        },
    }


PREPROCESSOR = {
    "image_processor_type": "CLIPImageProcessor", "do_resize": True, "resample": 3, "do_center_crop": False,
    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True, "patch_size": 14, "hidden_stride": 2, "temporal_patch_size": 1,
    "min_pixels": 200704, "max_pixels": 3211264,
}


def _random_weight(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    if name.endswith(("norm.weight", "norm_1.weight", "norm_2.weight", "norm1.weight", "norm2.weight",
                      ".scale", "head.1.weight", "conv_norm_out.weight", "group_norm.weight")):
        return 1 + 0.05 * torch.randn(shape, generator=generator)
    fan_in = max(1, int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1)
    return torch.randn(shape, generator=generator) / fan_in**0.5


def build_smoke_model(directory: str | Path, seed: int = 0) -> Path:
    """Write a complete random-weight Ovis-U1 checkpoint folder (about 2 MB) and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = smoke_config()
    params = params_from_dicts(config, PREPROCESSOR)
    with torch.device("meta"):
        model = OvisU1(params)
    generator = torch.Generator().manual_seed(seed)
    state = {
        k: _random_weight(k, t.shape, generator).contiguous()
        for k, t in model.state_dict().items()
        if k not in TIED_KEYS
    }
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=1))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": 258, "pad_token_id": 256}))
    write_tokenizer(directory)
    return directory


def is_smoke_model(directory: str | Path) -> bool:
    try:
        return bool(json.loads((Path(directory) / "config.json").read_text()).get("smoke_model"))
    except (OSError, ValueError):
        return False
