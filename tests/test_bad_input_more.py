"""Bad input through the library API, second round (issue 17, item 6): config.json values of the wrong type,
safetensors headers whose offsets do not fit their tensors, an unreadable config.json, integer tensors, prompts with
a lone surrogate and empty image/latent batches. Each is the pack's own error (CheckpointError / OvisU1InputError)
naming the file, key or input and the fix — never a raw TypeError, IndexError or torch error, never a silent load —
and afterwards the same loaded model still reproduces the golden text-to-image output. The nodes:
test_bad_input_nodes.py."""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import typing

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import ovis_u1
from ovis_u1 import CheckpointError, OvisU1InputError, prompts
from ovis_u1.checkpoint import _TensorReader, check_directory, find_model_dirs, is_ovis_u1_dir, stored_shapes
from ovis_u1.config import (MMDiTParams, PreprocessParams, VAEParams, VisionParams, load_params,
                            params_from_dicts)
from ovis_u1.llm import Qwen3Params
from tests.golden import CHECKPOINT, GOLDEN, TINY_A, requires_golden

pytestmark = requires_golden


# The loaded model, the golden re-check after every case and the writable checkpoint copy of the first round.
from tests.test_bad_input_checkpoint import copy, deny_reading, golden_state, model, still_golden  # noqa: E402, F401


def error(exc_type, fn, *names: str) -> str:
    with pytest.raises(exc_type) as info:
        fn()
    for name in names:
        assert name in str(info.value), f"{name!r} not in {str(info.value)!r}"
    return str(info.value)


def load_error(path, *names: str) -> str:
    return error(CheckpointError, lambda: ovis_u1.load_model(path, device="cpu", dtype=torch.float32), *names)


def tiny_config() -> dict:
    return json.loads((CHECKPOINT / "config.json").read_text())


def tiny_preprocessor() -> dict:
    return json.loads((CHECKPOINT / "preprocessor_config.json").read_text())


def set_key(data: dict, path: str, value) -> None:
    node = data
    *sections, key = path.split(".")
    for section in sections:
        node = node[section]
    node[key] = value


# ------------------------------------------------------------------------------- (a) config values of wrong type
CONFIG_TYPES = [
    # (key path in config.json, value) — before: a raw TypeError while the model was built, or a silent load. The
    # breadth (every field of every section) is in test_every_config_field_is_type_checked.
    ("hidden_size", "64"), ("hidden_size", [64]), ("hidden_size", None), ("hidden_size", 64.5),
    ("visual_generator_config.hidden_size", "64"), ("visual_generator_config.axes_dim", 16),
    ("visual_generator_config.qkv_bias", "true"), ("visual_generator_config.vae_config.block_out_channels", 8),
    ("visual_generator_config.vae_config.scaling_factor", None),
    ("visual_tokenizer_config.backbone_config.rms_norm_eps", "1e-5"),
    ("visual_tokenizer_config.backbone_config.fullatt_block_indexes", "x"),
    ("visual_tokenizer_config.vocab_size", "64"), ("llm_config.head_dim", [16]),
    ("llm_config.rope_scaling", "linear"), ("llm_config.num_key_value_heads", 0),
]


@pytest.mark.parametrize("key, value", CONFIG_TYPES, ids=[f"{k}={json.dumps(v)}" for k, v in CONFIG_TYPES])
def test_config_values_of_the_wrong_type_are_named(copy, key, value):
    config = tiny_config()
    set_key(config, key, value)
    (copy / "config.json").write_text(json.dumps(config))
    message = load_error(copy, "config.json", key, json.dumps(value), "download the checkpoint's config.json again")
    if isinstance(value, str) and value[:1].isdigit():
        assert "without quotes" in message  # a number written as text: the fix is to drop the quotes


PREPROCESSOR_TYPES = [("min_pixels", None), ("max_pixels", "3211264"), ("image_std", [0.2, "0.2", 0.2])]


@pytest.mark.parametrize("key, value", PREPROCESSOR_TYPES, ids=[f"{k}={json.dumps(v)}" for k, v in PREPROCESSOR_TYPES])
def test_preprocessor_values_of_the_wrong_type_are_named(copy, key, value):
    pre = tiny_preprocessor()
    pre[key] = value
    (copy / "preprocessor_config.json").write_text(json.dumps(pre))
    load_error(copy, "preprocessor_config.json", key)


def _sections(config: dict, pre: dict):
    """(dict, where, dataclass, field → key) of every place a config value is read from."""
    vt = config["visual_tokenizer_config"]
    vg = config["visual_generator_config"]
    vision_keys = {f: {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads"}.get(f, f)
                   for f in VisionParams.__dataclass_fields__}
    yield vt["backbone_config"], "visual_tokenizer_config.backbone_config", VisionParams, {
        f: k for f, k in vision_keys.items() if f not in ("vocab_size", "tokenize_function", "tau")}
    yield vt, "visual_tokenizer_config", VisionParams, {f: f for f in ("vocab_size", "tokenize_function", "tau")}
    yield vg, "visual_generator_config", MMDiTParams, {f: f for f in MMDiTParams.__dataclass_fields__}
    yield vg["vae_config"], "visual_generator_config.vae_config", VAEParams, {
        f: f for f in VAEParams.__dataclass_fields__}
    yield config["llm_config"], "llm_config", Qwen3Params, {f: f for f in Qwen3Params.__dataclass_fields__}
    yield pre, "", PreprocessParams, {f: f for f in PreprocessParams.__dataclass_fields__}


def test_every_config_field_is_type_checked():
    """Not one key special-cased: every dataclass field that config.json or preprocessor_config.json fills refuses a
    list of text and, unless its type allows null, null — each naming its file and key."""
    checked = 0
    for index, (_, where, cls, keys) in enumerate(_sections(tiny_config(), tiny_preprocessor())):
        hints = typing.get_type_hints(cls)
        for field_name, key in keys.items():
            for value in (["x"], None):
                if value is None and (type(None) in typing.get_args(hints[field_name])
                                      or (cls is Qwen3Params and key in ("num_key_value_heads", "rope_theta"))):
                    continue  # an Optional field, or one transformers fills in when null
                config, pre = tiny_config(), tiny_preprocessor()
                list(_sections(config, pre))[index][0][key] = value
                file = "preprocessor_config.json" if cls is PreprocessParams else "config.json"
                full_key = f"{where}.{key}" if where else key
                error(CheckpointError, lambda: params_from_dicts(config, pre), file, full_key, json.dumps(value))
                checked += 1
    assert checked > 60


ARCHITECTURE = [
    ("visual_generator_config.num_heads", 5, "not a multiple of num_heads 5"),
    ("visual_generator_config.axes_dim", [4, 6, 8], "sum to the head size 16"),
    ("visual_generator_config.vae_config.norm_num_groups", 3, "norm_num_groups 3 does not divide"),
    ("visual_tokenizer_config.backbone_config.num_attention_heads", 3, "not a multiple of num_attention_heads 3"),
    ("visual_tokenizer_config.backbone_config.fullatt_block_indexes", [7], "beyond the 3 blocks"),
    ("visual_tokenizer_config.backbone_config.window_size", 14, "window_size 14"),
    ("visual_tokenizer_config.vocab_size", 4, "indicator"),
    ("llm_config.num_key_value_heads", 3, "num_key_value_heads 3"),
]


@pytest.mark.parametrize("key, value, why", ARCHITECTURE, ids=[f"{k}={json.dumps(v)}" for k, v, _ in ARCHITECTURE])
def test_values_that_cannot_describe_a_model_are_named(copy, key, value, why):
    """The right type, but a model cannot be built from it: before, a raw ValueError/ZeroDivisionError while the
    model was built (or at the first forward), naming no file."""
    config = tiny_config()
    set_key(config, key, value)
    (copy / "config.json").write_text(json.dumps(config))
    load_error(copy, "config.json", why)


def test_valid_configs_give_the_same_params_as_before():
    """Unambiguous values still load: whole numbers written as 2.0, the official "0|2" full-attention string, and
    the real checkpoint's config parses to whole-number fields of type int."""
    config = tiny_config()
    config["visual_tokenizer_config"]["backbone_config"]["num_attention_heads"] = 2.0
    config["visual_tokenizer_config"]["backbone_config"]["fullatt_block_indexes"] = "0|2"
    config["llm_config"]["num_key_value_heads"] = None  # transformers: as many as the attention heads
    params = params_from_dicts(config, tiny_preprocessor())
    assert params.vision.num_heads == 2 and type(params.vision.num_heads) is int
    assert params.vision.fullatt_block_indexes == (0, 2)
    reference = load_params(CHECKPOINT)
    assert params.mmdit == reference.mmdit and params.vae == reference.vae
    full = params_from_dicts(json.loads((GOLDEN / "full_size" / "config.json").read_text()))
    assert full.vision.fullatt_block_indexes is None and full.vae.shift_factor is None
    for part in (full.vision, full.mmdit, full.vae):
        for f in dataclasses.fields(part):
            value = getattr(part, f.name)
            if f.type == "int":
                assert type(value) is int, f.name


# ------------------------------------------------------------------ (b) safetensors offsets that do not fit
def rewrite_header(target: pathlib.Path, change) -> str:
    """Write the tiny checkpoint's weights into ``target`` with ``change(header, keys in file order)`` applied to the
    header (the data unchanged); returns the key the change names."""
    raw = (CHECKPOINT / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    keys = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    key = change(header, keys)
    encoded = json.dumps(header).encode()
    (target / "model.safetensors").unlink()
    (target / "model.safetensors").write_bytes(len(encoded).to_bytes(8, "little") + encoded + raw[8 + n :])
    return key


def _offsets(fn):
    """A change that replaces the data_offsets of the second tensor in the file by ``fn(begin, end, header, keys)``."""

    def change(header, keys):
        key = keys[1]
        begin, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = fn(begin, end, header, keys)
        return key

    return change


def _entry(field, value):
    def change(header, keys):
        header[keys[1]][field] = value
        return keys[1]

    return change


def _drop(field):
    def change(header, keys):
        header[keys[1]].pop(field)
        return keys[1]

    return change


def _replace(value):
    def change(header, keys):
        header[keys[1]] = value
        return keys[1]

    return change


def _shift_into_previous(header, keys):
    """Both offsets 4 bytes earlier: the right length, but sharing 4 bytes with the tensor before it."""
    key = keys[1]
    begin, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [begin - 4, end - 4]
    return key


def _same_bytes_as_first(header, keys):
    key = keys[1]
    begin, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [0, end - begin]
    return key


def _past_the_end(header, keys):
    key = keys[-1]
    begin, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [begin + 4096, end + 4096]
    return key


def _metadata(header, keys):
    header["__metadata__"] = ["format", "pt"]
    return "__metadata__"


HEADERS = [
    ("length 4 bytes short", _offsets(lambda b, e, h, k: [b, e - 4]), ["252 bytes", "takes 256 bytes"]),
    ("length 4 bytes long", _offsets(lambda b, e, h, k: [b, e + 4]), ["260 bytes", "takes 256 bytes"]),
    ("dtype that does not fit the length", _entry("dtype", "F16"), ["in F16 takes 128 bytes"]),
    ("begin after end", _offsets(lambda b, e, h, k: [e, b]), ["begins after it ends"]),
    ("negative begin", _offsets(lambda b, e, h, k: [-4, e - b - 4]), ["[-4,"]),
    ("one offset", _offsets(lambda b, e, h, k: [b]), ["[begin, end]"]),
    ("float offsets", _offsets(lambda b, e, h, k: [float(b), e + 0.5]), ["[begin, end]"]),
    ("overlapping the previous tensor", _shift_into_previous, ["overlap"]),
    ("on the bytes of another tensor", _same_bytes_as_first, ["overlap"]),
    ("beyond the end of the file", _past_the_end, ["truncated", "bytes on disk"]),
    ("no data_offsets", _drop("data_offsets"), ["has no data_offsets"]),
    ("metadata a list", _metadata, ["__metadata__"]),
]


@pytest.mark.parametrize("case, change, names", HEADERS, ids=[c for c, *_ in HEADERS])
def test_safetensors_offsets_that_do_not_fit_are_named(copy, case, change, names):
    """Before: a silent load of whatever bytes the offsets pointed at, or a raw IndexError/TypeError/torch size
    mismatch naming no file or key."""
    key = rewrite_header(copy, change)
    path = copy / "model.safetensors"
    load_error(copy, "model.safetensors", key, "download it again", *names)
    # the same check guards every reader of the file, also the one that reads the weights
    error(CheckpointError, lambda: stored_shapes([path]), str(path), key)
    error(CheckpointError, lambda: _TensorReader(path), str(path), key)


MORE_HEADERS = [
    ("shape that does not fit the length", _entry("shape", [65]), ["[65]", "takes 260 bytes"]),
    ("three offsets", _offsets(lambda b, e, h, k: [b, e, e]), ["[begin, end]"]),
    ("text offsets", _offsets(lambda b, e, h, k: f"{b},{e}"), ["[begin, end]"]),
    ("null offsets", _offsets(lambda b, e, h, k: None), ["[begin, end]"]),
    ("boolean offsets", _offsets(lambda b, e, h, k: [False, True]), ["[begin, end]"]),
    ("no shape", _drop("shape"), ["has no shape"]),
    ("no dtype", _drop("dtype"), ["has no dtype"]),
    ("negative shape", _entry("shape", [-1, 64]), ["[-1, 64]"]),
    ("text shape", _entry("shape", "64"), ["shape \"64\""]),
    ("dtype a number", _entry("dtype", 4), ["dtype 4"]),
    ("entry a list", _replace([0, 256]), ["is a JSON list"]),
]


def test_every_header_problem_is_named(copy):
    """The cases above and more, through the header check alone (no load: one golden check for all)."""
    path = copy / "model.safetensors"
    for case, change, names in HEADERS + MORE_HEADERS:
        key = rewrite_header(copy, change)
        message = error(CheckpointError, lambda: stored_shapes([path]), str(path), key, "download it again", *names)
        assert "Traceback" not in message, case


def test_a_header_in_another_order_still_loads(copy, model):
    """The format sorts nothing: entries listed in any order (and tensors in any order in the data) are valid."""

    def reverse(header, keys):
        reordered = dict(reversed(list(header.items())))  # the same entries, listed in reverse
        header.clear()
        header.update(reordered)
        return keys[0]

    rewrite_header(copy, reverse)
    loaded = ovis_u1.load_model(copy, device="cpu", dtype=torch.float32)
    assert torch.equal(loaded.vte.weight, model.vte.weight)


# ----------------------------------------------------------------------------------- (c) unreadable config.json
DENY = {"Path.read_text": (pathlib.Path, "read_text"), "Path.open": (pathlib.Path, "open"), "io.open": (io, "open")}
READERS = {
    "load_model": lambda d: ovis_u1.load_model(d, device="cpu", dtype=torch.float32),
    "check_directory": check_directory,
    "load_params": load_params,
    "load_tokenizer": prompts.load_tokenizer,  # reads config.json for the LLM's vocab_size
}


@pytest.mark.parametrize("deny", DENY, ids=list(DENY))
def test_an_unreadable_config_is_named_by_every_reader(copy, monkeypatch, deny):
    """As root chmod cannot deny reading, so the PermissionError is injected where the file is opened (three ways).
    Every reader says which file and how to fix it; listing folders skips it quietly (loading it then explains)."""
    with monkeypatch.context() as mp:
        deny_reading(mp, *DENY[deny], "config.json")
        for name, read in READERS.items():
            message = error(CheckpointError, lambda: read(copy), str(copy / "config.json"), "permission denied",
                            "chmod a+r")
            assert "tokenizer" not in message, name
        assert is_ovis_u1_dir(copy) is False
        assert find_model_dirs([copy.parent, copy]) == []


def test_a_tokenizer_file_that_cannot_be_read_is_named(copy, monkeypatch):
    import builtins

    deny_reading(monkeypatch, builtins, "open", "tokenizer.json")
    load_error(copy, "tokenizer.json", "permission denied", "chmod a+r")


# --------------------------------------------------------------------------------- (d) integer-typed tensors
@pytest.fixture(scope="module")
def stored():
    return load_file(str(CHECKPOINT / "model.safetensors"))


INTEGER = [(torch.int32, "I32", "vte.weight", None), (torch.int64, "I64", "llm.model.norm.weight", None),
           (torch.uint8, "U8", "visual_generator.vae.decoder.conv_out.bias", "fp8_e4m3fn"),
           (torch.bool, "BOOL", "llm.model.layers.0.self_attn.q_proj.weight", None)]


@pytest.mark.parametrize("dtype, name, key, weight_dtype", INTEGER,
                         ids=[f"{n}-{w or 'default'}" for _, n, _, w in INTEGER])
def test_integer_tensors_are_named_before_any_weight_is_read(copy, stored, monkeypatch, dtype, name, key,
                                                             weight_dtype):
    """Checked from the header alone, whatever the storage dtype asked for (the node loader calls load_model too:
    test_bad_input_nodes.py)."""
    assert key in stored
    weights = dict(stored)
    weights[key] = weights[key].to(dtype)
    (copy / "model.safetensors").unlink()
    save_file(weights, str(copy / "model.safetensors"))
    monkeypatch.setattr(_TensorReader, "read", lambda *a: pytest.fail("a weight was read before the check"))
    error(CheckpointError, lambda: ovis_u1.load_model(copy, device="cpu", dtype=torch.float32,
                                                      weight_dtype=weight_dtype),
          "model.safetensors", key, f"({name})", "not floating point", "unmodified ATH-MaaS/Ovis-U1-3B")


# ------------------------------------------------------------------------------------ (e) lone surrogates
SURROGATE_CALLS = [
    ("t2i", lambda m, t: m.text_to_image(t, width=64, height=64, steps=1), "prompt"),
    ("edit", lambda m, t: m.edit(Image.open(TINY_A / "cases" / "edit" / "input.png"), t, steps=1), "instruction"),
    ("understand", lambda m, t: m.understand([], t, max_new_tokens=1), "question"),
    ("encode_condition", lambda m, t: m.encode_condition(t, "t2i", width=64, height=64), "prompt"),
    ("prompts.condition_ids", lambda m, t: prompts.condition_ids(m.tokenizer, "t2i", "cond", t), "prompt"),
    ("prompts.understanding_ids", lambda m, t: prompts.understanding_ids(m.tokenizer, t, 1), "question"),
]
SURROGATE_CASES = [(entry, call, name, "a cat \ud800", "U+D800") for entry, call, name in SURROGATE_CALLS] + [
    ("t2i", SURROGATE_CALLS[0][1], "prompt", text, code)
    for text, code in (("\udfff", "U+DFFF"),)]


@pytest.mark.parametrize("entry, call, name, text, code", SURROGATE_CASES,
                         ids=[f"{e}-{c}" for e, _, _, _, c in SURROGATE_CASES])
def test_a_lone_surrogate_in_text_is_named(model, monkeypatch, entry, call, name, text, code):
    """Before: a TypeError from the tokenizer. Now checked before anything is encoded."""
    monkeypatch.setattr(model, "_visual_embeds", lambda *a: pytest.fail("an image was encoded before the check"))
    error(OvisU1InputError, lambda: call(model, text), name, code, "remove it")


def test_a_lone_surrogate_on_the_command_line(tmp_path, monkeypatch, capsys):
    """Python turns argument bytes that are not UTF-8 into lone surrogates (surrogateescape)."""
    import ovis_u1.__main__ as cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    argv = ["t2i", b"a cat \xff".decode("utf-8", "surrogateescape"), "--model", str(CHECKPOINT), "--device", "cpu"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: prompt") and "U+DCFF" in err and "Traceback" not in err


def test_text_that_is_valid_unicode_still_works(model):
    ids = prompts.condition_ids(model.tokenizer, "t2i", "cond", "a cat 🐱 ✓ \u00e9")
    assert ids.count(prompts.IMAGE_ATOM_ID) == 1


# ------------------------------------------------------------------------------------- (f) empty batches
@pytest.mark.parametrize("call, names", [
    (lambda m: m.vae_encode(torch.zeros(0, 3, 64, 64)), ["pixels", "empty batch", "0 images", "at least one"]),
    (lambda m: m.vae_decode(torch.zeros(0, 4, 8, 8)), ["latent", "empty batch", "0 latents", "at least one"]),
    (lambda m: m.decode_to_pil(torch.zeros(0, 4, 8, 8)), ["latent", "empty batch"]),
], ids=["vae_encode", "vae_decode", "decode_to_pil"])
def test_empty_batches_are_named(model, call, names):
    """Before: an unhelpful shape message, or a torch error deeper down."""
    error(OvisU1InputError, lambda: call(model), *names)


def test_flash_attn_without_the_package_is_an_input_error(monkeypatch):
    """attention 'flash_attn' where flash-attn cannot run: the pack's error naming the package and the choices, before
    any weight is read (it was a ValueError)."""
    from ovis_u1 import attention

    monkeypatch.setattr(attention, "flash_attn_available", lambda: False)
    with pytest.raises(OvisU1InputError, match="flash-attn.*'auto' / 'sdpa'"):
        ovis_u1.load_model(CHECKPOINT, device="cpu", attention="flash_attn")
    with pytest.raises(OvisU1InputError, match="attention 'xformers' is unknown: use one of auto, sdpa"):
        ovis_u1.load_model(CHECKPOINT, device="cpu", attention="xformers")
