"""Build a mid-size random Ovis-U1 checkpoint (fp32 on disk, about 1.5 GB) for loading and memory benchmarks.

The smoke model's config and files (ovis_u1/smoke.py: tokenizer, preprocessor, weight initialisation) with wider
parts: the LLM 1024 wide with 6 layers (GQA 8/4 heads of 128), the AIMv2 encoder 512 wide with 4 blocks, the MMDiT
at its full width (1536, 12 heads) with 1 double + 2 single blocks, and a half-width SDXL VAE (64/128/256/256).
Its images are noise and its text is nonsense; only its sizes are realistic. The weights are written tensor by
tensor, so building it needs no more memory than its largest tensor.

    python bench/mid_checkpoint.py CACHE_DIR          # → CACHE_DIR/ovis_u1_mid (reused when already complete)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

NAME = "ovis_u1_mid"
DONE = ".complete"


def mid_config() -> dict:
    from ovis_u1.smoke import smoke_config

    config = smoke_config()
    config["mid_model"] = True
    config["hidden_size"] = 1024
    config["llm_config"].update(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
        head_dim=128,
    )
    config["visual_tokenizer_config"].update(vocab_size=1024)
    config["visual_tokenizer_config"]["backbone_config"].update(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8, fullatt_block_indexes=[3],
    )
    vg = config["visual_generator_config"]
    vg.update(hidden_size=1536, num_heads=12, axes_dim=[16, 56, 56], vec_in_dim=1024, context_in_dim=2048,
              depth=1, depth_single_blocks=2)
    vg["vae_config"].update(block_out_channels=[64, 128, 256, 256], norm_num_groups=32, layers_per_block=2)
    return config


def _write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], make) -> int:
    """A safetensors file of fp32 tensors written one at a time (``make(name, shape)`` builds each)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little") + blob)
        for name, shape in shapes.items():
            fh.write(make(name, shape).to(torch.float32).contiguous().numpy().tobytes())
    return 8 + len(blob) + offset


def build_mid_checkpoint(cache_dir: str | Path, seed: int = 0) -> Path:
    """Write (or reuse) CACHE_DIR/ovis_u1_mid and return its path."""
    from ovis_u1.checkpoint import TIED_KEYS
    from ovis_u1.config import params_from_dicts
    from ovis_u1.model import OvisU1
    from ovis_u1.smoke import PREPROCESSOR, _random_weight, write_tokenizer

    directory = Path(cache_dir) / NAME
    if (directory / DONE).is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    config = mid_config()
    with torch.device("meta"):
        model = OvisU1(params_from_dicts(config, PREPROCESSOR))
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items() if k not in TIED_KEYS}
    generator = torch.Generator().manual_seed(seed)
    size = _write_safetensors(directory / "model.safetensors", shapes,
                              lambda name, shape: _random_weight(name, torch.Size(shape), generator))
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=1))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": 258, "pad_token_id": 256}))
    write_tokenizer(directory)
    (directory / DONE).write_text(f"{size} bytes, {sum(torch.Size(s).numel() for s in shapes.values())} parameters\n")
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache_dir", help="folder to build the checkpoint in (its subfolder ovis_u1_mid)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = build_mid_checkpoint(args.cache_dir, args.seed)
    print(path, (path / DONE).read_text().strip())


if __name__ == "__main__":
    main()
