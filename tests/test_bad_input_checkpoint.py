"""Bad checkpoint folders through load_model (issue 9, classes 1, 3 (weights) and 6): each is a CheckpointError that
names the file or section and the fix — never a silently wrong tokenizer, a raw KeyError/ZeroDivisionError/torch
error — and afterwards the good model still reproduces the golden text-to-image output."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import ovis_u1
from ovis_u1 import CheckpointError
from tests.golden import CHECKPOINT, requires_golden
from tests.model_state import fingerprint, golden_state_fixture

pytestmark = requires_golden


@pytest.fixture(scope="module")
def model():
    return ovis_u1.load_model(CHECKPOINT, device="cpu", dtype=torch.float32)


golden_state = golden_state_fixture()


@pytest.fixture(autouse=True)
def still_golden(model, golden_state):
    """After every case the model is in the very state that rendered the golden image (the image itself is rendered
    again after the module's last case: tests/model_state.py)."""
    yield
    assert fingerprint(model) == golden_state, "the bad input changed the model (weights, settings or hooks)"


@pytest.fixture
def copy(tmp_path):
    """A writable copy of the tiny checkpoint (the weights linked, not copied, unless a case rewrites them)."""
    target = tmp_path / "ckpt"
    target.mkdir()
    for f in CHECKPOINT.iterdir():
        if f.name == "model.safetensors":
            (target / f.name).symlink_to(f)
        else:
            shutil.copyfile(f, target / f.name)
    return target


def load_error(path, *names: str) -> str:
    with pytest.raises(CheckpointError) as info:
        ovis_u1.load_model(path, device="cpu", dtype=torch.float32)
    for name in names:
        assert name in str(info.value), f"{name!r} not in {str(info.value)!r}"
    return str(info.value)


def edit_json(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------------------- 1. tokenizer files
TOKENIZER_CASES = [
    # (files removed, what the message must name) — before: a 5-token tokenizer or <|endoftext|> as end of turn
    (("tokenizer.json", "vocab.json", "merges.txt"), ["tokenizer.json", "vocab.json", "merges.txt"]),
    (("tokenizer.json", "vocab.json"), ["vocab.json", "tokenizer.json"]),
    (("tokenizer.json", "merges.txt"), ["merges.txt"]),
    (("tokenizer_config.json", "special_tokens_map.json"), ["tokenizer_config.json", "<|endoftext|>", "<|im_end|>"]),
    (("tokenizer.json", "tokenizer_config.json", "added_tokens.json"), ["tokenizer_config.json", "added_tokens.json"]),
    (("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
      "added_tokens.json"), ["tokenizer.json", "vocab.json"]),
]


@pytest.mark.parametrize("removed, names", TOKENIZER_CASES, ids=["+".join(r) for r, _ in TOKENIZER_CASES])
def test_missing_tokenizer_files_are_named(copy, removed, names):
    for name in removed:
        (copy / name).unlink()
    message = load_error(copy, "tokenizer", *names)
    assert "copy the tokenizer files" in message


def test_a_tokenizer_larger_than_the_llm_vocabulary(copy):
    edit_json(copy / "config.json", lambda c: c["llm_config"].update(vocab_size=300))
    load_error(copy, "320 tokens", "vocab_size 300")


def test_a_tokenizer_with_another_end_of_turn(copy):
    edit_json(copy / "tokenizer_config.json", lambda c: c.update(eos_token="<|endoftext|>"))
    edit_json(copy / "special_tokens_map.json", lambda c: c.update(eos_token="<|endoftext|>"))
    load_error(copy, "end-of-sequence token is '<|endoftext|>'", "<|im_end|>")


def test_a_corrupt_tokenizer_json(copy):
    (copy / "tokenizer.json").write_text("{ not json")
    (copy / "vocab.json").unlink()
    load_error(copy, "tokenizer", "cannot be loaded", "vocab.json")


# -------------------------------------------------------------------------------------- 6. config files
CONFIG_CASES = [
    ("invalid JSON", lambda d: (d / "config.json").write_text('{"model_type": "ovis_u1",'),
     ["config.json", "not valid JSON"]),
    ("a JSON list", lambda d: (d / "config.json").write_text("[1, 2]"), ["config.json", "not an object"]),
    ("no visual_generator_config",
     lambda d: edit_json(d / "config.json", lambda c: c.pop("visual_generator_config")),
     ["'visual_generator_config'", "is missing"]),
    ("no vae_config", lambda d: edit_json(d / "config.json", lambda c: c["visual_generator_config"].pop("vae_config")),
     ["'visual_generator_config.vae_config'"]),
    ("no llm_config", lambda d: edit_json(d / "config.json", lambda c: c.pop("llm_config")), ["'llm_config'"]),
    ("llm_config a string", lambda d: edit_json(d / "config.json", lambda c: c.update(llm_config="qwen3")),
     ["'llm_config'", "str"]),
    ("no backbone_config",
     lambda d: edit_json(d / "config.json", lambda c: c["visual_tokenizer_config"].pop("backbone_config")),
     ["'visual_tokenizer_config.backbone_config'"]),
    ("no llm hidden_size", lambda d: edit_json(d / "config.json", lambda c: c["llm_config"].pop("hidden_size")),
     ["llm_config.hidden_size"]),
    ("preprocessor invalid JSON", lambda d: (d / "preprocessor_config.json").write_text("{"),
     ["preprocessor_config.json", "not valid JSON"]),
    ("preprocessor patch_size 0",
     lambda d: edit_json(d / "preprocessor_config.json", lambda c: c.update(patch_size=0)),
     ["preprocessor_config.json patch_size is 0"]),
    ("preprocessor patch_size differs from the encoder",
     lambda d: edit_json(d / "preprocessor_config.json", lambda c: c.update(patch_size=16)),
     ["patch_size is 16", "vision encoder"]),
    ("preprocessor min above max",
     lambda d: edit_json(d / "preprocessor_config.json", lambda c: c.update(min_pixels=10**7)),
     ["min_pixels", "max_pixels"]),
    ("preprocessor std 0",
     lambda d: edit_json(d / "preprocessor_config.json", lambda c: c.update(image_std=[0.2, 0.0, 0.2])),
     ["image_std"]),
    ("preprocessor max_pixels a string",
     lambda d: edit_json(d / "preprocessor_config.json", lambda c: c.update(max_pixels="big")),
     ["max_pixels"]),
]


@pytest.mark.parametrize("case, damage, names", CONFIG_CASES, ids=[c for c, _, _ in CONFIG_CASES])
def test_broken_config_files_are_named(copy, case, damage, names):
    damage(copy)
    load_error(copy, *names)


def deny_reading(monkeypatch, owner, attr: str, file_name: str) -> None:
    """``owner.attr`` — a reader taking the file first (``Path.read_text``, ``Path.open``, ``io.open``,
    ``builtins.open``) — raises PermissionError for files called ``file_name``: as root chmod cannot deny reading,
    so the error is injected where the file is read."""
    real = getattr(owner, attr)

    def denied(file, *args, **kwargs):
        if isinstance(file, (str, pathlib.PurePath)) and pathlib.Path(file).name == file_name:
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(owner, attr, denied)


def test_unreadable_config(copy, monkeypatch):
    deny_reading(monkeypatch, pathlib.Path, "read_text", "config.json")
    load_error(copy, "config.json", "permission denied")


def test_unreadable_weights(copy, monkeypatch):
    import builtins

    deny_reading(monkeypatch, builtins, "open", "model.safetensors")
    load_error(copy, "model.safetensors", "permission denied")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_path_that_is_a_file(name):
    load_error(CHECKPOINT / name, name, "is a file", "use its folder")


# ------------------------------------------------------------------------- weights: integer dtype, NaN/inf
@pytest.fixture(scope="module")
def stored():
    return load_file(str(CHECKPOINT / "model.safetensors"))


def rewrite_weights(copy, stored, change) -> str:
    (copy / "model.safetensors").unlink()
    weights = dict(stored)
    key = change(weights)
    save_file(weights, str(copy / "model.safetensors"))
    return key


def test_an_integer_tensor_is_named(copy, stored):
    def to_int(w):
        key = "vte.weight"
        w[key] = w[key].to(torch.int64)
        return key

    key = rewrite_weights(copy, stored, to_int)
    load_error(copy, key, "I64", "not floating point")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_found_at_load(copy, stored, value):
    def poison(w):
        key = "visual_generator.backbone.final_layer.linear.weight"
        if key not in w:
            key = sorted(k for k in w if k.startswith("visual_generator.backbone."))[-1]
        w[key] = w[key].clone()
        w[key].view(-1)[0] = value
        return key

    key = rewrite_weights(copy, stored, poison)
    load_error(copy, key, "NaN or infinite", "download them again")
