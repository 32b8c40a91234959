"""The ComfyUI nodes, called the way ComfyUI calls them (the pack imported from its folder like a custom node,
kwargs built from INPUT_TYPES), on the tiny_a goldens. ComfyUI itself is not importable here: this is also the
check that every node imports and runs on the CPU without it."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovis_u1 import CheckpointError, OvisU1InputError
from ovis_u1.checkpoint import MODELS_DIR_ENV
from tests.pack import PACK_NAME, ROOT, import_pack
from tests.golden import CHECKPOINT, TINY_A, assert_golden, assert_golden_image, case_params, requires_golden, tensors

CORE_TYPES = {"MODEL", "CLIP", "VAE", "CONDITIONING", "CLIP_VISION", "CONTROL_NET", "LATENT", "IMAGE", "MASK", "STRING",
              "INT", "FLOAT", "BOOLEAN", "NOISE", "SAMPLER", "SIGMAS", "GUIDER"}

pytestmark = requires_golden


PACK = import_pack()
NODES = PACK.NODE_CLASS_MAPPINGS
bridge = sys.modules[f"{PACK_NAME}.nodes.comfy_bridge"]


# ---------------------------------------------------------------------------------------------------- helpers
def kwargs_for(node: str, **given) -> dict:
    """What ComfyUI passes: every required input (widgets at their default, or a combo's first option unless
    given), optional inputs only when given (connected)."""
    spec = NODES[node].INPUT_TYPES()
    kwargs = {}
    for section in ("required", "optional"):
        for name, (kind, *rest) in spec.get(section, {}).items():
            options = rest[0] if rest else {}
            if name in given:
                kwargs[name] = given[name]
            elif section == "required":
                if "default" in options:
                    kwargs[name] = options["default"]
                elif isinstance(kind, list) and kind:
                    kwargs[name] = kind[0]
                else:
                    raise AssertionError(f"{node}.{name} is a required socket: pass it")
    unknown = set(given) - set(kwargs)
    assert not unknown, f"{node} has no input(s) {unknown}"
    return kwargs


def run(node: str, **given):
    """Call the node's FUNCTION like ComfyUI's executor and return its result tuple (and the ui dict, if any)."""
    cls = NODES[node]
    out = getattr(cls(), cls.FUNCTION)(**kwargs_for(node, **given))
    ui = None
    if isinstance(out, dict):
        ui, out = out.get("ui"), out["result"]
    assert isinstance(out, tuple) and len(out) == len(cls.RETURN_TYPES), f"{node} returned {type(out)}"
    return (out, ui) if cls.__dict__.get("OUTPUT_NODE") else out


def load_image(path: Path) -> torch.Tensor:
    """An IMAGE as ComfyUI's LoadImage makes it."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB")).astype(np.float32) / 255.0)[None]


def save_uint8(image: torch.Tensor) -> torch.Tensor:
    """The pixels ComfyUI's SaveImage writes: uint8(clip(255·x))."""
    return torch.from_numpy(np.clip(255.0 * image[0].cpu().numpy(), 0, 255).astype(np.uint8))


def t2i(model, seed=None, **sampler):
    p = case_params("t2i")
    condition, *_ = run("OvisU1EncodeCondition", model=model, prompt=p["prompt"], mode="text-to-image",
                       width=p["width"], height=p["height"])
    (refined,) = run("OvisU1Refiner", model=model, condition=condition)
    sampler = {"width": p["width"], "height": p["height"], "steps": p["steps"], "txt_cfg": p["txt_cfg"],
               "seed": p["seed"] if seed is None else seed, **sampler}
    (latent,) = run("OvisU1Sampler", model=model, refined=refined, **sampler)
    (image,) = run("OvisU1VAEDecode", model=model, samples=latent)
    return condition, refined, latent, image


def edit_inputs(model, image=None):
    p = case_params("edit")
    image = load_image(TINY_A / "cases" / "edit" / "input.png") if image is None else image
    context, resized, _ = run("OvisU1EditContextEncoder", model=model, image=image, seed=p["vae_sample_seed"])
    return context, resized


def edit(model, encode_image="resized", **sampler):
    p = case_params("edit")
    context, resized = edit_inputs(model)
    source = resized if encode_image == "resized" else load_image(TINY_A / "cases" / "edit" / "input.png")
    condition, *_ = run("OvisU1EncodeCondition", model=model, prompt=p["prompt"], mode="edit", image=source)
    (refined,) = run("OvisU1Refiner", model=model, condition=condition)
    sampler = {"steps": p["steps"], "txt_cfg": p["txt_cfg"], "img_cfg": p["img_cfg"], "seed": p["seed"], **sampler}
    (latent,) = run("OvisU1Sampler", model=model, refined=refined, context=context, **sampler)
    (image,) = run("OvisU1VAEDecode", model=model, samples=latent)
    return condition, refined, context, latent, image


def understand(model, **given):
    p = case_params("understand")
    given = {"image": load_image(TINY_A / "cases" / "understand" / "input.png"), "question": p["question"],
             "max_new_tokens": p["max_new_tokens"], **given}
    (answer,), ui = run("OvisU1Understand", model=model, **given)
    return answer, ui


def assert_understands(model):
    """The model still answers exactly as the golden (used after every error)."""
    ids = tensors("understand")["generated_ids"].tolist()
    answer, _ = understand(model)
    assert answer == model.model.tokenizer.decode(ids, skip_special_tokens=True)


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """An OVIS_U1_MODELS_DIR with a good checkpoint (symlink), an empty folder, a non-Ovis folder and a checkpoint
    whose model.safetensors is truncated."""
    root = tmp_path_factory.mktemp("models") / "ovis_u1"
    root.mkdir()
    (root / "tiny_a").symlink_to(CHECKPOINT, target_is_directory=True)
    (root / "empty").mkdir()
    (root / "not_ovis").mkdir()
    (root / "not_ovis" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    truncated = root / "truncated"
    shutil.copytree(CHECKPOINT, truncated)
    weights = truncated / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) * 2 // 3])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(MODELS_DIR_ENV, str(root))
        yield root


@pytest.fixture(scope="module")
def model(models_dir):
    """Loaded once per module through the loader node, with its default dtype and attention."""
    model, *_ = run("OvisU1ModelLoader", model="tiny_a")
    return model


# ----------------------------------------------------------------------------------------------- registration
def test_every_node_follows_the_conventions():
    assert set(NODES) == set(PACK.NODE_DISPLAY_NAME_MAPPINGS)
    assert PACK.WEB_DIRECTORY == "./nodes/web" and (ROOT / "nodes" / "web" / "show_text.js").is_file()
    for name, cls in NODES.items():
        assert name.startswith("OvisU1") and PACK.NODE_DISPLAY_NAME_MAPPINGS[name].startswith("Ovis-U1 ")
        assert cls.CATEGORY == "Ovis-U1" and cls.DESCRIPTION.strip()
        assert callable(getattr(cls(), cls.FUNCTION))
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
        for kind in cls.RETURN_TYPES:
            assert kind in CORE_TYPES or kind.startswith("OVIS_U1_"), f"{name} returns {kind}"
        for section, inputs in cls.INPUT_TYPES().items():
            assert section in ("required", "optional")
            for input_name, (kind, *rest) in inputs.items():
                assert rest and rest[0].get("tooltip"), f"{name}.{input_name} has no tooltip"
                if isinstance(kind, str):
                    assert kind in CORE_TYPES or kind.startswith("OVIS_U1_"), f"{name}.{input_name}: {kind}"
                    assert kind not in ("MODEL", "CLIP", "VAE", "CONDITIONING")


def test_defaults_are_the_official_demo():
    enc = kwargs_for("OvisU1EncodeCondition", model=None)
    assert (enc["width"], enc["height"], enc["mode"]) == (1024, 1024, "text-to-image")
    smp = kwargs_for("OvisU1Sampler", model=None, refined=None)
    assert (smp["steps"], smp["txt_cfg"], smp["img_cfg"], smp["seed"], smp["timestep_shift"]) == (
        50, 5.0, 1.5, 42, "config")
    assert NODES["OvisU1Sampler"].INPUT_TYPES()["required"]["seed"][1]["control_after_generate"] is True
    for node in ("OvisU1Understand", "OvisU1EditContextEncoder"):  # fixed seeds: no re-run on every queue
        assert NODES[node].INPUT_TYPES()["required"]["seed"][1]["control_after_generate"] is False
    und = kwargs_for("OvisU1Understand", model=None)
    assert (und["max_new_tokens"], und["do_sample"]) == (1024, False)
    assert kwargs_for("OvisU1EditContextEncoder", model=None, image=None)["seed"] == 42
    loader = NODES["OvisU1ModelLoader"].INPUT_TYPES()["required"]
    assert loader["dtype"][0] == ["auto", "bf16", "fp16", "fp32"] and loader["dtype"][1]["default"] == "auto"
    assert loader["attention"][0] == ["auto", "sdpa", "flash_attn"]


# ------------------------------------------------------------------------------------------------------ loader
def test_loader_lists_only_ovis_checkpoints(models_dir):
    names = NODES["OvisU1ModelLoader"].INPUT_TYPES()["required"]["model"][0]
    assert "tiny_a" in names and "truncated" in names
    assert "empty" not in names and "not_ovis" not in names
    assert NODES["OvisU1ModelLoader"].VALIDATE_INPUTS("tiny_a") is True
    message = NODES["OvisU1ModelLoader"].VALIDATE_INPUTS("nowhere")
    assert isinstance(message, str) and "models/ovis_u1" in message and "'nowhere'" in message


def test_loader_result_wraps_the_model_on_cpu(model):
    assert isinstance(model, bridge.ManagedModel)
    assert next(model.model.parameters()).device.type == "cpu"
    assert next(model.model.llm.parameters()).dtype == torch.float32  # auto without ComfyUI: fp32 on the CPU


@pytest.mark.parametrize(
    "name, expected",
    [
        ("empty", ["model 'empty'", "no config.json", "Ovis-U1-3B"]),
        ("not_ovis", ["model 'not_ovis'", "model_type must be 'ovis_u1'"]),
        ("truncated", ["model 'truncated'", "truncated", "download it again"]),
        ("nowhere", ["model 'nowhere'", "models/ovis_u1"]),
    ],
)
def test_loader_errors_name_the_input_and_the_fix(models_dir, model, name, expected):
    with pytest.raises(CheckpointError) as info:
        run("OvisU1ModelLoader", model=name)
    for text in expected:
        assert text in str(info.value)
    assert_understands(model)


def test_loader_rejects_unknown_options(models_dir):
    with pytest.raises(CheckpointError, match="dtype 'fp8'"):
        run("OvisU1ModelLoader", model="tiny_a", dtype="fp8")
    with pytest.raises(CheckpointError, match="weight_dtype 'fp4'.*fp8_e4m3fn"):
        run("OvisU1ModelLoader", model="tiny_a", weight_dtype="fp4")


def test_loader_core_outputs_need_comfyui(models_dir):
    """Outside ComfyUI there is no core MODEL or VAE to make; the pack's own nodes still get the model."""
    model, core_model, core_vae = run("OvisU1ModelLoader", model="tiny_a")
    assert core_model is None and core_vae is None and model.patchers == {}


def test_edit_outputs_for_the_native_path(model):
    """Encode Condition's CONDITIONING carries the context's raw VAE latent on positive and middle (not negative);
    the Edit Context Encoder's latent is empty at the edit size."""
    p = case_params("edit")
    context, resized, empty = run("OvisU1EditContextEncoder", model=model,
                                  image=load_image(TINY_A / "cases" / "edit" / "input.png"), seed=p["vae_sample_seed"])
    assert empty["samples"].shape == (1, 4, context.height // 8, context.width // 8) and not empty["samples"].any()
    condition, positive, middle, negative = run("OvisU1EncodeCondition", model=model, prompt=p["prompt"], mode="edit",
                                                image=resized, context=context)
    reference = positive[0][1]["reference_latents"][0]
    assert middle[0][1]["reference_latents"][0] is reference and "reference_latents" not in negative[0][1]
    assert positive[0][0] is condition.branches["cond"] and middle[0][0] is condition.branches["no_txt"]
    assert negative[0][0] is condition.branches["no_both"]
    # scaled and packed as the model does it (latent format, 2×2 patches), it is the official context
    from ovis_u1.sampling import pack_latents

    scale = model.model.params.vae.scaling_factor
    assert_golden(pack_latents(reference * scale), tensors("edit")["context.tokens"], "context.tokens")


# ------------------------------------------------------------------------------------------------ the goldens
def test_text_to_image_reproduces_the_golden(model):
    condition, refined, latent, image = t2i(model)
    assert set(condition.branches) == {"cond", "no_both"} and condition.mode == "t2i"
    assert set(latent) == {"samples"}
    assert latent["samples"].shape == (1, 4, 8, 8) and latent["samples"].dtype == torch.float32
    assert_golden(latent["samples"], tensors("t2i")["vae_dec_input"], "t2i latent")
    assert image.shape == (1, 64, 64, 3) and image.dtype == torch.float32 and image.device.type == "cpu"
    assert 0 <= image.min() and image.max() <= 1
    assert_golden_image(save_uint8(image), tensors("t2i")["output_image_uint8"])


@pytest.mark.parametrize("encode_image", ["resized", "original"])
def test_edit_reproduces_the_golden(model, encode_image):
    condition, refined, context, latent, image = edit(model, encode_image)
    g = tensors("edit")
    assert set(condition.branches) == {"cond", "no_txt", "no_both"} and condition.mode == "edit"
    assert (context.width, context.height) == (96, 64)
    assert_golden(context.tokens, g["context.tokens"], "context tokens")
    assert latent["samples"].shape == (1, 4, 8, 12)
    assert_golden_image(save_uint8(image), g["output_image_uint8"])


def test_edit_context_encoder_returns_the_resized_image(model):
    context, resized = edit_inputs(model)
    expected = load_image(TINY_A / "cases" / "edit" / "input_resized.png")
    assert resized.shape == (1, 64, 96, 3) and torch.equal(resized, expected)


def test_understand_reproduces_the_golden_token_ids(model, monkeypatch):
    seen = []
    original = type(model.model).understand

    def spy(self, *args, **kwargs):
        seen.append(original(self, *args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(type(model.model), "understand", spy)
    answer, ui = understand(model)
    ids = tensors("understand")["generated_ids"].tolist()
    assert seen[-1].token_ids == ids
    assert answer == seen[-1].text == model.model.tokenizer.decode(ids, skip_special_tokens=True)
    assert ui == {"text": [answer]}
    assert NODES["OvisU1Understand"].OUTPUT_NODE is True


def test_understand_without_image_and_with_an_image_batch(model):
    text_only, _ = understand(model, image=None)
    assert isinstance(text_only, str)
    image = load_image(TINY_A / "cases" / "understand" / "input.png")
    batch, _ = understand(model, image=torch.cat([image, image.flip(2)]))
    assert isinstance(batch, str)


def test_understand_sampling_is_seeded(model):
    first, _ = understand(model, do_sample=True, temperature=1.5, top_p=0.9, seed=7)
    again, _ = understand(model, do_sample=True, temperature=1.5, top_p=0.9, seed=7)
    assert first == again


def test_vae_nodes(model):
    g = tensors("t2i")
    (image,) = run("OvisU1VAEDecode", model=model, samples={"samples": g["vae_dec_input"]})
    assert_golden_image(save_uint8(image), g["output_image_uint8"])
    context, resized = edit_inputs(model)
    (latent,) = run("OvisU1VAEEncode", model=model, image=resized)
    assert latent["samples"].shape == (1, 4, 8, 12)
    assert_golden(latent["samples"], tensors("edit")["context.latent_mean"], "posterior mean")
    (batch,) = run("OvisU1VAEEncode", model=model, image=torch.cat([resized, resized])[:, :61, :93])
    assert batch["samples"].shape == (2, 4, 7, 11)  # cropped to multiples of 8
    (images,) = run("OvisU1VAEDecode", model=model, samples=batch)
    assert images.shape == (2, 56, 88, 3)


def test_changing_only_the_seed_keeps_encode_and_refiner(model):
    c1, r1, l1, _ = t2i(model, seed=42)
    c2, r2, l2, _ = t2i(model, seed=43)
    for name in c1.branches:
        assert torch.equal(c1.branches[name], c2.branches[name])
        assert all(torch.equal(a, b) for a, b in zip(r1.branches[name], r2.branches[name]))
    assert not torch.equal(l1["samples"], l2["samples"])


# ------------------------------------------------------------------------------------------ image conversions
def test_rgba_and_greyscale_images(model):
    image = load_image(TINY_A / "cases" / "edit" / "input.png")
    rgba = torch.cat([image, torch.full_like(image[..., :1], 0.5)], dim=-1)
    ctx_rgb, resized_rgb = edit_inputs(model, image)
    ctx_rgba, resized_rgba = edit_inputs(model, rgba)
    assert torch.equal(ctx_rgb.tokens, ctx_rgba.tokens) and torch.equal(resized_rgb, resized_rgba)
    grey = image.mean(dim=-1, keepdim=True)
    ctx_grey, resized_grey = edit_inputs(model, grey)
    assert resized_grey.shape == (1, 64, 96, 3)
    assert torch.equal(resized_grey[..., 0], resized_grey[..., 2])
    (latent,) = run("OvisU1VAEEncode", model=model, image=grey)
    assert latent["samples"].shape[1] == 4


# -------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "node, size, match",
    [
        ("encode", {"width": 32}, "width 32"),
        ("encode", {"height": 8192}, "height 8192"),
        ("encode", {"width": 72}, "multiple of 16"),
        ("sampler", {"width": 48}, "width 48"),
        ("sampler", {"height": 5000}, "height 5000"),
        ("sampler", {"height": 100}, "multiple of 16"),
    ],
)
def test_bad_sizes(model, node, size, match):
    p = case_params("t2i")
    if node == "encode":
        given = {"width": p["width"], "height": p["height"], **size}
        with pytest.raises(OvisU1InputError, match=match):
            run("OvisU1EncodeCondition", model=model, prompt=p["prompt"], **given)
    else:
        with pytest.raises(OvisU1InputError, match=match):
            t2i(model, **size)
    assert_understands(model)


def test_edit_sampler_needs_a_matching_context(model):
    p = case_params("edit")
    source = load_image(TINY_A / "cases" / "edit" / "input.png")
    condition, *_ = run("OvisU1EncodeCondition", model=model, prompt=p["prompt"], mode="edit", image=source)
    (refined,) = run("OvisU1Refiner", model=model, condition=condition)
    with pytest.raises(OvisU1InputError, match="Edit Context Encoder"):
        run("OvisU1Sampler", model=model, refined=refined, steps=1)
    wrong, _ = edit_inputs(model, torch.rand(1, 64, 160, 3, generator=torch.Generator().manual_seed(0)))
    assert (wrong.width, wrong.height) != (condition.width, condition.height)
    with pytest.raises(OvisU1InputError, match="context is .* same image"):
        run("OvisU1Sampler", model=model, refined=refined, context=wrong, steps=1)
    t2i_condition, *_ = run("OvisU1EncodeCondition", model=model, prompt="a cat", width=64, height=64)
    (t2i_refined,) = run("OvisU1Refiner", model=model, condition=t2i_condition)
    context, _ = edit_inputs(model)
    with pytest.raises(OvisU1InputError, match="takes no context"):
        run("OvisU1Sampler", model=model, refined=t2i_refined, context=context, steps=1)
    with pytest.raises(OvisU1InputError, match="edit mode needs an image"):
        run("OvisU1EncodeCondition", model=model, prompt=p["prompt"], mode="edit")
    assert_understands(model)


@pytest.mark.parametrize(
    "cfg, match",
    [({"txt_cfg": -1.0}, "txt_cfg -1.0"), ({"txt_cfg": 1e6}, "txt_cfg 1000000.0"), ({"img_cfg": -0.5}, "img_cfg"),
     ({"img_cfg": 500.0}, "img_cfg 500.0"), ({"txt_cfg": math.nan}, "txt_cfg nan")],
)
def test_bad_cfg(model, cfg, match):
    with pytest.raises(OvisU1InputError, match=match) as info:
        edit(model, steps=1, **cfg)
    assert "between 0 and" in str(info.value)
    assert_understands(model)


def test_empty_prompt_and_question(model):
    with pytest.raises(OvisU1InputError, match="prompt is empty"):
        run("OvisU1EncodeCondition", model=model, prompt="   ", width=64, height=64)
    with pytest.raises(OvisU1InputError, match="question is empty"):
        understand(model, question="")
    assert_understands(model)


def test_one_image_inputs_reject_a_batch(model):
    image = load_image(TINY_A / "cases" / "edit" / "input.png")
    batch = torch.cat([image, image])
    with pytest.raises(OvisU1InputError, match="image: got a batch of 2 images"):
        run("OvisU1EncodeCondition", model=model, prompt="add a hat", mode="edit", image=batch)
    with pytest.raises(OvisU1InputError, match="image: got a batch of 2 images"):
        run("OvisU1EditContextEncoder", model=model, image=batch)
    with pytest.raises(OvisU1InputError, match="samples: expected"):
        run("OvisU1VAEDecode", model=model, samples={"samples": torch.zeros(1, 16, 8, 8)})
    assert_understands(model)


# ----------------------------------------------------------------------------------------- progress, interrupt
class Interrupted(Exception):
    pass


def test_progress_checks_for_interruption_every_step_and_token(model, monkeypatch):
    calls, done = [], []
    monkeypatch.setattr(bridge, "check_interrupt", lambda: calls.append(1))
    update = bridge.Progress.update
    monkeypatch.setattr(bridge.Progress, "update", lambda self, n, latent=None: (done.append((n, self.total)),
                                                                                 update(self, n, latent)))
    t2i(model)
    steps = case_params("t2i")["steps"]
    assert done == [(i, steps) for i in range(1, steps + 1)] + [(1, 1)]  # every sampling step, the decoded image
    assert len(calls) == len(done)
    calls.clear(), done.clear()
    understand(model)
    tokens = case_params("understand")["max_new_tokens"]
    assert done == [(i, tokens) for i in range(1, tokens + 1)] and len(calls) == tokens


def test_interrupt_in_the_middle_of_sampling(model, monkeypatch):
    steps = []

    def interrupt_at_step_2():
        steps.append(1)
        if len(steps) == 2:
            raise Interrupted()

    monkeypatch.setattr(bridge, "check_interrupt", interrupt_at_step_2)
    with pytest.raises(Interrupted):
        t2i(model)
    assert len(steps) == 2
    monkeypatch.undo()
    *_, image = t2i(model)
    assert_golden_image(save_uint8(image), tensors("t2i")["output_image_uint8"])


def test_outputs_are_plain_data(model):
    condition, refined, latent, _ = t2i(model)
    assert all(t.device.type == "cpu" for t in condition.branches.values())
    assert all(t.device.type == "cpu" for pair in refined.branches.values() for t in pair)
    assert dataclasses.is_dataclass(condition) and dataclasses.is_dataclass(refined)
