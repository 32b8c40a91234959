"""Hyperparameters of an Ovis-U1 checkpoint, read from its config.json and preprocessor_config.json.

Nothing here is assumed that the checkpoint states itself (the official configuration_aimv2.py, configuration_yak.py
and configuration_ovis_u1.py read them from config.json too): window size, full-attention blocks, positional
embedding interpolation, timestep shift, pixel budgets and sequence limits all come from the files.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from .checkpoint import read_json
from .errors import CheckpointError


@dataclass(frozen=True)
class Qwen3Params:
    """The shape-defining fields of a Qwen3 ``llm_config``; defaults are transformers' ``Qwen3Config`` defaults."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    tie_word_embeddings: bool = False

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


def qwen3_params(llm_config: dict) -> Qwen3Params:
    """Parse the checkpoint's ``llm_config``; features this Qwen3 does not implement are errors, not ignored."""
    if llm_config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"llm_config.hidden_act {llm_config['hidden_act']!r} is not supported: Qwen3 uses 'silu'")
    # transformers 4.x writes rope_theta + rope_scaling; 5.x writes rope_parameters {rope_type, rope_theta}
    rope = {**(llm_config.get("rope_scaling") or {}), **(llm_config.get("rope_parameters") or {})}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"llm_config.rope_scaling / rope_parameters {rope!r} is not supported: Ovis-U1 uses plain "
                         "RoPE (rope_scaling null)")
    if llm_config.get("use_sliding_window"):
        raise ValueError("llm_config.use_sliding_window is true: Ovis-U1's Qwen3 uses full causal attention; set false")
    values = {f.name: llm_config[f.name] for f in fields(Qwen3Params) if llm_config.get(f.name) is not None}
    if "rope_theta" in rope:
        values.setdefault("rope_theta", rope["rope_theta"])
    values.setdefault("num_key_value_heads", values.get("num_attention_heads", Qwen3Params.num_attention_heads))
    params = Qwen3Params(**values)
    if params.num_attention_heads % params.num_key_value_heads:
        raise ValueError(
            f"llm_config.num_attention_heads {params.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {params.num_key_value_heads}"
        )
    return params


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


# ------------------------------------------------------------------------------------ typed config values
# A config value of the wrong type fails late and far from its key otherwise (a string hidden_size: "not all
# arguments converted during string formatting" while the model is built; a string rms_norm_eps: a TypeError at the
# first forward). Every value read from config.json / preprocessor_config.json is therefore checked once, here,
# against the type of the dataclass field it fills, and a wrong one names its file, key and the fix.
_COUNTS = {"depth", "depth_single_blocks", "num_layers", "num_hidden_layers", "layers_per_block",
           "fullatt_block_indexes"}  # whole numbers that may be 0 (every other whole number is a size: at least 1)
_ANY_SIGN = {"base_shift", "max_shift", "shift_factor", "image_mean"}  # numbers that may be 0 or negative
_PLURAL = {"a positive whole number": "positive whole numbers", "a whole number (0 or more)": "whole numbers "
           "(0 or more)", "a number above 0": "numbers above 0", "a finite number": "numbers"}


class _Bad(Exception):
    """A value that does not fit its field."""


def _kind(hint, name: str) -> str:
    """What a value of the field type ``hint`` must be, in words."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return f"null or {_kind(hint, name)}"
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        count = "" if args[-1] is Ellipsis else f"{len(args)} "
        return f"a list of {count}{_PLURAL[_kind(args[0], name)]}"
    if hint is int:
        return "a whole number (0 or more)" if name in _COUNTS else "a positive whole number"
    if hint is float:
        return "a finite number" if name in _ANY_SIGN else "a number above 0"
    return {bool: "true or false", str: "text", dict: "an object"}[hint]


def _scalar(value, hint, name: str):
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad
        if isinstance(value, float) and not math.isfinite(value):
            raise _Bad
        if hint is int:
            if value != int(value):  # 2048.0 is unambiguous, 2048.5 is not
                raise _Bad
            value = int(value)
            if value < (0 if name in _COUNTS else 1):
                raise _Bad
        elif name not in _ANY_SIGN and value <= 0:
            raise _Bad
        return value
    if not isinstance(value, hint):
        raise _Bad
    return value


def _typed(value, hint, name: str):
    """``value`` as the dataclass field type ``hint`` (int, float, bool, str, dict, tuple[...], X | None)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return None
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or (args[-1] is not Ellipsis and len(value) != len(args)):
            raise _Bad
        return tuple(_scalar(v, args[0], name) for v in value)
    if value is None:
        raise _Bad
    return _scalar(value, hint, name)


def _fix(value, hint, name: str) -> str:
    """How to repair a bad value: a number written as text only needs its quotes removed."""
    if isinstance(value, str):
        try:
            return f"write it without quotes ({json.dumps(_typed(json.loads(value), hint, name))})"
        except (ValueError, _Bad):
            pass
    return "correct it"


def config_value(raw: dict, key: str, hint, where: str, file: str = "config.json", name: str | None = None):
    """``raw[key]`` checked against the dataclass field type ``hint``; a wrong value is a CheckpointError naming
    ``file``, the key's path ``where``, what the value must be and the fix. ``name``: the field (default ``key``)."""
    name, value = name or key, raw[key]
    try:
        return _typed(value, hint, name)
    except _Bad:
        try:
            shown = json.dumps(value)  # as it is written in the file
        except (TypeError, ValueError):
            shown = repr(value)
        raise CheckpointError(f"{file} {where} is {shown}, not {_kind(hint, name)}; {_fix(value, hint, name)} or "
                              f"download the checkpoint's {file} again") from None


def _fields(cls, raw: dict, where: str, file: str = "config.json", only=None, **renames) -> dict:
    """The type-checked values of ``raw`` for the fields of dataclass ``cls`` (``renames``: field → key in raw),
    ``only`` those fields if given. An absent key keeps the field's default; null is a value like any other (only
    ``X | None`` fields accept it)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name in cls.__dataclass_fields__:
        key = renames.get(name, name)
        if key in raw and (only is None or name in only):
            kwargs[name] = config_value(raw, key, hints[name], f"{where}.{key}" if where else key, file, name)
    return kwargs


def _fullatt_indexes(raw: dict, where: str) -> tuple[int, ...] | None:
    """The blocks that attend over the whole image: null, a list, or the official "0|7|15" string."""
    value = raw.get("fullatt_block_indexes")
    if isinstance(value, str):
        parts = [v.strip() for v in value.split("|") if v.strip()]
        if all(p.isdigit() for p in parts):
            return tuple(int(p) for p in parts)
    return config_value({"fullatt_block_indexes": value}, "fullatt_block_indexes", tuple[int, ...] | None, where)


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
    bb = _section(config, "visual_tokenizer_config", "backbone_config")
    where_bb = "visual_tokenizer_config.backbone_config"
    vision_values = _fields(VisionParams, {k: v for k, v in bb.items() if k != "fullatt_block_indexes"}, where_bb,
                            num_layers="num_hidden_layers", num_heads="num_attention_heads")
    vision_values.update(_fields(VisionParams, vt, "visual_tokenizer_config", only=("vocab_size", "tokenize_function",
                                                                                    "tau")))
    vision_values["fullatt_block_indexes"] = _fullatt_indexes(bb, f"{where_bb}.fullatt_block_indexes")
    if vt.get("depths"):  # the official config may give the depth as "24" or "12|12"
        first = str(vt["depths"]).split("|")[0].strip()
        if not first.isdigit():
            raise CheckpointError(f"config.json visual_tokenizer_config.depths is {json.dumps(vt['depths'])}, not "
                                  "null or a number of blocks; correct it or download the checkpoint's config.json "
                                  "again")
        vision_values["num_layers"] = int(first)
    vision = VisionParams(**vision_values)
    vg = _section(config, "visual_generator_config")
    mmdit = MMDiTParams(**_fields(MMDiTParams, vg, "visual_generator_config"))
    vae = VAEParams(**_fields(VAEParams, _section(config, "visual_generator_config", "vae_config"),
                              "visual_generator_config.vae_config"))
    pre = PreprocessParams(**_fields(PreprocessParams, preprocessor or {}, "", "preprocessor_config.json"))
    check_architecture(vision, mmdit, vae)
    check_preprocess(pre, vision)
    llm_config = _llm_config(_section(config, "llm_config"))
    top = _fields(OvisU1Params, config, "", only=("hidden_size", "multimodal_max_length"))
    hidden = top.get("hidden_size", llm_config["hidden_size"])
    if hidden != llm_config["hidden_size"]:
        raise CheckpointError(f"config.json hidden_size {hidden} differs from llm_config.hidden_size "
                              f"{llm_config['hidden_size']}; download the checkpoint's config.json again")
    return OvisU1Params(
        llm_config=llm_config,
        hidden_size=hidden,
        multimodal_max_length=top.get("multimodal_max_length", 2048),
        vision=vision,
        mmdit=mmdit,
        vae=vae,
        preprocess=pre,
    )


# llm_config fields that may be null: transformers then uses num_attention_heads, and transformers 5 keeps the
# RoPE base in rope_parameters instead.
_LLM_NULLABLE = ("num_key_value_heads", "rope_theta")
_LLM_OTHER = {"hidden_act": str, "use_sliding_window": bool, "rope_scaling": dict | None,
              "rope_parameters": dict | None}


def _llm_config(raw: dict) -> dict:
    """``llm_config`` with the Qwen3 fields type-checked (whole numbers as ints), checked whole by ``qwen3_params``
    so that an unsupported LLM is an error here, not when the model is built."""
    for key in ("hidden_size", "vocab_size"):
        if key not in raw:
            raise CheckpointError(f"config.json llm_config.{key} is missing; download the checkpoint's config.json "
                                  "again")
    rope = {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})} if all(
        isinstance(raw.get(k), (dict, type(None))) for k in ("rope_scaling", "rope_parameters")) else {}
    if "rope_theta" in raw and raw["rope_theta"] is None and "rope_theta" not in rope:
        raise CheckpointError("config.json llm_config.rope_theta is null and no rope_parameters give it; correct it "
                              "(Ovis-U1-3B: 1000000.0) or download the checkpoint's config.json again")
    present = {k: v for k, v in raw.items() if not (k in _LLM_NULLABLE and v is None)}
    llm_config = {**raw, **_fields(Qwen3Params, present, "llm_config")}
    for key, hint in _LLM_OTHER.items():
        if key in raw:
            config_value(raw, key, hint, f"llm_config.{key}")
    try:
        qwen3_params(llm_config)
    except ValueError as e:  # its messages name the llm_config field
        raise CheckpointError(f"config.json {e}; download the checkpoint's config.json again") from e
    return llm_config


def check_architecture(vision: VisionParams, mmdit: MMDiTParams, vae: VAEParams) -> None:
    """Values of the right type that still cannot describe a model (they would fail while it is built, or at the
    first forward, with an error that does not name config.json)."""

    def bad(where: str, why: str):
        raise CheckpointError(f"config.json {where} {why}; download the checkpoint's config.json again")

    bb = "visual_tokenizer_config.backbone_config"
    if vision.tokenize_function != "softmax":
        bad("visual_tokenizer_config.tokenize_function", f"is {vision.tokenize_function!r}, which is not supported "
            "(only 'softmax')")
    if vision.interpolate_pe_method not in ("one_dim", "two_dim"):
        bad(f"{bb}.interpolate_pe_method", f"is {vision.interpolate_pe_method!r}, not 'one_dim' or 'two_dim'")
    if vision.hidden_size % vision.num_heads:
        bad(f"{bb}.hidden_size", f"{vision.hidden_size} is not a multiple of num_attention_heads {vision.num_heads}")
    if vision.window_size < vision.patch_size * vision.hidden_stride:
        bad(f"{bb}.window_size", f"{vision.window_size} is smaller than one merged patch (patch_size "
            f"{vision.patch_size} × hidden_stride {vision.hidden_stride})")
    if any(i >= vision.num_layers for i in vision.fullatt_block_indexes or ()):
        bad(f"{bb}.fullatt_block_indexes", f"{list(vision.fullatt_block_indexes)} names a block beyond the "
            f"{vision.num_layers} blocks of the encoder (counted from 0)")
    if vision.vocab_size <= 4:  # the last 4 rows of the visual vocabulary are the image indicators
        bad("visual_tokenizer_config.vocab_size", f"{vision.vocab_size} leaves no visual words beside the 4 "
            "indicator tokens")
    vg = "visual_generator_config"
    if mmdit.hidden_size % mmdit.num_heads:
        bad(f"{vg}.hidden_size", f"{mmdit.hidden_size} is not a multiple of num_heads {mmdit.num_heads}")
    elif sum(mmdit.axes_dim) != mmdit.head_dim or any(d % 2 for d in mmdit.axes_dim):
        bad(f"{vg}.axes_dim", f"{list(mmdit.axes_dim)} must be even numbers that sum to the head size "
            f"{mmdit.head_dim} (hidden_size {mmdit.hidden_size} / num_heads {mmdit.num_heads})")
    if mmdit.guidance_embed:
        bad(f"{vg}.guidance_embed", "is true: guidance-distilled MMDiTs are not supported (Ovis-U1 has none)")
    if not vae.block_out_channels:
        bad(f"{vg}.vae_config.block_out_channels", "is empty")
    if any(c % vae.norm_num_groups for c in vae.block_out_channels):
        bad(f"{vg}.vae_config.norm_num_groups", f"{vae.norm_num_groups} does not divide every block_out_channels "
            f"entry {list(vae.block_out_channels)}")


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
