"""Hyperparameters of an Ovis-U1 checkpoint, read from its config.json and preprocessor_config.json.

Nothing here is assumed that the checkpoint states itself (SPEC §E): window size, full-attention blocks, positional
embedding interpolation, timestep shift, pixel budgets and sequence limits all come from the files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import CheckpointError, read_json


@dataclass(frozen=True)
class VisionParams:
    """AIMv2 native-resolution encoder + probabilistic visual tokenizer head."""

    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_layers: int = 24
    num_heads: int = 8
    num_channels: int = 3
    image_size: int = 448
    patch_size: int = 14
    hidden_stride: int = 2
    temporal_patch_size: int = 1
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] | None = None  # None: every block attends over the whole image
    preserve_original_pe: bool = True
    interpolate_pe_method: str = "one_dim"
    disable_rope: bool = False
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    use_bias: bool = False
    vocab_size: int = 65536  # visual vocabulary incl. the 4 indicator rows
    tokenize_function: str = "softmax"
    tau: float = 1.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class MMDiTParams:
    """The Yak MMDiT visual decoder and its token refiner (``visual_generator.backbone``)."""

    in_channels: int = 16
    out_channels: int = 16
    vec_in_dim: int = 1536
    context_in_dim: int = 4096
    hidden_size: int = 1536
    mlp_ratio: float = 4.0
    num_heads: int = 12
    depth: int = 6
    depth_single_blocks: int = 12
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10000
    qkv_bias: bool = True
    guidance_embed: bool = False
    timestep_shift: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class VAEParams:
    """SDXL-style AutoencoderKL (``visual_generator.vae``)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.13025
    shift_factor: float | None = None
    mid_block_add_attention: bool = True

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class PreprocessParams:
    """Image preprocessing of the visual tokenizer (CLIPImageProcessor settings + Ovis extras)."""

    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255
    patch_size: int = 14
    hidden_stride: int = 2
    temporal_patch_size: int = 1
    min_pixels: int = 200704
    max_pixels: int = 3211264


@dataclass(frozen=True)
class OvisU1Params:
    llm_config: dict = field(repr=False)
    hidden_size: int
    multimodal_max_length: int
    vision: VisionParams
    mmdit: MMDiTParams
    vae: VAEParams
    preprocess: PreprocessParams

    @property
    def llm_hidden_size(self) -> int:
        return int(self.llm_config["hidden_size"])


def _pick(cls, raw: dict, **renames):
    """Build dataclass ``cls`` from the keys of ``raw`` it knows (``renames``: field → key in raw)."""
    kwargs = {}
    for name in cls.__dataclass_fields__:
        key = renames.get(name, name)
        if key in raw and raw[key] is not None:
            value = raw[key]
            kwargs[name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def _fullatt_indexes(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):  # the official config allows "0|7|15"
        return tuple(int(v) for v in value.split("|") if v.strip())
    return tuple(int(v) for v in value)


def _section(raw: dict, *path: str) -> dict:
    """``raw[path[0]][path[1]]…`` as a dict; a missing or non-object section names itself."""
    node = raw
    for i, key in enumerate(path):
        node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            where = ".".join(path[: i + 1])
            state = "is missing" if node is None else f"is a {type(node).__name__}, not an object"
            raise CheckpointError(
                f"config.json section {where!r} {state}; the config is incomplete — download the checkpoint's "
                "config.json again"
            )
    return node


def params_from_dicts(config: dict, preprocessor: dict | None = None) -> OvisU1Params:
    if config.get("model_type") != "ovis_u1":
        raise CheckpointError(f"config.json has model_type {config.get('model_type')!r}, expected 'ovis_u1'")
    try:
        return _params(config, preprocessor)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a value of the wrong type deep in a section
        raise CheckpointError(f"config.json holds a value Ovis-U1 cannot use ({type(e).__name__}: {e}); "
                              "download the checkpoint's config.json again") from e


def _params(config: dict, preprocessor: dict | None) -> OvisU1Params:
    vt = _section(config, "visual_tokenizer_config")
    bb = dict(_section(config, "visual_tokenizer_config", "backbone_config"))
    bb["fullatt_block_indexes"] = _fullatt_indexes(bb.get("fullatt_block_indexes"))
    vision = _pick(VisionParams, {**bb, **{k: vt[k] for k in ("vocab_size", "tokenize_function", "tau") if k in vt}},
                   num_layers="num_hidden_layers", num_heads="num_attention_heads")
    if vt.get("depths"):
        vision = VisionParams(**{**vision.__dict__, "num_layers": int(str(vt["depths"]).split("|")[0])})
    if vision.tokenize_function != "softmax":
        raise CheckpointError(f"visual tokenize_function {vision.tokenize_function!r} is not supported (only 'softmax')")
    vg = _section(config, "visual_generator_config")
    mmdit = _pick(MMDiTParams, vg)
    vae_raw = dict(_section(config, "visual_generator_config", "vae_config"))
    vae = _pick(VAEParams, vae_raw)
    pre = _pick(PreprocessParams, preprocessor or {})
    check_preprocess(pre, vision)
    llm_config = dict(_section(config, "llm_config"))
    for key in ("hidden_size", "vocab_size"):
        if not isinstance(llm_config.get(key), int) or llm_config[key] <= 0:
            raise CheckpointError(f"config.json llm_config.{key} is {llm_config.get(key)!r}, not a positive whole "
                                  "number; download the checkpoint's config.json again")
    hidden = int(config.get("hidden_size", llm_config["hidden_size"]))
    if hidden != int(llm_config["hidden_size"]):
        raise CheckpointError(f"config.json hidden_size {hidden} differs from llm_config.hidden_size "
                              f"{llm_config['hidden_size']}")
    return OvisU1Params(
        llm_config=llm_config,
        hidden_size=hidden,
        multimodal_max_length=int(config.get("multimodal_max_length", 2048)),
        vision=vision,
        mmdit=mmdit,
        vae=vae,
        preprocess=pre,
    )


def check_preprocess(pre: PreprocessParams, vision: VisionParams) -> None:
    """preprocessor_config.json values that would fail late (a ZeroDivisionError in smart_resize) or silently
    feed the encoder patches of the wrong size."""

    def bad(field: str, why: str):
        raise CheckpointError(f"preprocessor_config.json {field} is {getattr(pre, field)!r}: {why}; download the "
                              "checkpoint's preprocessor_config.json again")

    for name in ("patch_size", "hidden_stride", "temporal_patch_size", "min_pixels", "max_pixels"):
        value = getattr(pre, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            bad(name, "it must be a positive whole number")
    for name in ("patch_size", "hidden_stride", "temporal_patch_size"):
        if getattr(pre, name) != getattr(vision, name):
            bad(name, f"the vision encoder in config.json has {name} {getattr(vision, name)}")
    if pre.min_pixels > pre.max_pixels:
        bad("min_pixels", f"it exceeds max_pixels {pre.max_pixels}")
    if not isinstance(pre.rescale_factor, (int, float)) or not 0 < pre.rescale_factor < 1:
        bad("rescale_factor", "it must be a number between 0 and 1 (1/255 for uint8 images)")
    for name in ("image_mean", "image_std"):
        values = getattr(pre, name)
        if not isinstance(values, tuple) or len(values) != 3 or not all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            bad(name, "it must be three numbers (R, G, B)")
    if any(v <= 0 for v in pre.image_std):
        bad("image_std", "every value must be above 0")


def load_params(directory: str | Path) -> OvisU1Params:
    directory = Path(directory)
    config = read_json(directory / "config.json")
    pre_path = directory / "preprocessor_config.json"
    preprocessor = read_json(pre_path) if pre_path.exists() else None
    return params_from_dicts(config, preprocessor)
