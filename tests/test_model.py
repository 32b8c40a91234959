"""The composed model against the official goldens: understanding, conditions, context, end-to-end images,
the full-size key list, checkpoint errors, half precision and the self-built smoke model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import ovis_u1
from ovis_u1 import prompts
from ovis_u1.checkpoint import CheckpointError
from ovis_u1.config import params_from_dicts
from ovis_u1.model import OvisU1
from ovis_u1.sampling import initial_noise
from tests.golden import CHECKPOINT, GOLDEN, TINY_A, assert_golden, assert_golden_image, case_params, requires_golden, tensors

pytestmark = requires_golden


@pytest.fixture(scope="module")
def model():
    return ovis_u1.load_model(CHECKPOINT, device="cpu", dtype=torch.float32)


def edit_input() -> Image.Image:
    return Image.open(TINY_A / "cases" / "edit" / "input.png")


# ------------------------------------------------------------------------------------------ understanding
def test_understanding_matches_golden(model):
    g, p = tensors("understand"), case_params("understand")
    image = Image.open(TINY_A / "cases" / "understand" / "input.png")
    ids = prompts.understanding_ids(model.tokenizer, p["question"], 1)
    assert_golden(torch.tensor([ids]), g["input_ids"], "input_ids")
    embeds = model._merge(ids, model._visual_embeds([image]))
    assert_golden(embeds[None], g["inputs_embeds"], "inputs_embeds")
    scores: list[torch.Tensor] = []
    result = model.understand([image], p["question"], max_new_tokens=p["max_new_tokens"], scores=scores)
    assert_golden(scores[0][None], g["last_prompt_logits"], "last_prompt_logits")
    assert_golden(torch.stack(scores), g["generation_scores"], "generation_scores")
    assert result.token_ids == g["generated_ids"].tolist()
    assert result.text == model.tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_understanding_without_and_with_several_images(model):
    image = Image.open(TINY_A / "cases" / "understand" / "input.png")
    text_only = model.understand([], "Hello?", max_new_tokens=3)
    two = model.understand([image, edit_input()], "Compare them.", max_new_tokens=3)
    assert 1 <= len(text_only.token_ids) <= 3 and 1 <= len(two.token_ids) <= 3
    ids = prompts.understanding_ids(model.tokenizer, "Compare them.", 2)
    assert ids.count(prompts.IMAGE_ATOM_ID) == 2


def test_sampled_understanding_follows_seed(model):
    kwargs = dict(max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.9)
    a = model.understand([], "Say something.", seed=1, **kwargs).token_ids
    b = model.understand([], "Say something.", seed=1, **kwargs).token_ids
    assert a == b


# ------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("case", ["t2i", "edit"])
def test_conditions_match_golden(model, case):
    g, p = tensors(case), case_params(case)
    if case == "t2i":
        condition = model.encode_condition(p["prompt"], "t2i", width=p["width"], height=p["height"])
    else:
        condition = model.encode_condition(p["prompt"], "edit", image=edit_input())
    assert sorted(condition.branches) == sorted(prompts.BRANCHES[case])
    for branch, txt in condition.branches.items():
        assert_golden(txt, g[f"{branch}.txt"], f"{branch}.txt")


def test_edit_context_matches_golden(model):
    g, p = tensors("edit"), case_params("edit")
    context = model.encode_context(edit_input(), seed=p["vae_sample_seed"])
    assert (context.width, context.height) == (96, 64)
    assert_golden(context.tokens, g["context.tokens"], "context.tokens")


def test_noise_is_the_official_noise():
    assert torch.equal(initial_noise(42, 64, 64), tensors("t2i")["noise_bf16"])


def test_text_to_image_reproduces_golden_image_exactly(model):
    p = case_params("t2i")
    image = model.text_to_image(p["prompt"], p["width"], p["height"], steps=p["steps"], txt_cfg=p["txt_cfg"],
                                seed=p["seed"])
    assert_golden_image(image, tensors("t2i")["output_image_uint8"])


def test_edit_reproduces_golden_image_exactly(model):
    p = case_params("edit")
    image = model.edit(edit_input(), p["prompt"], steps=p["steps"], img_cfg=p["img_cfg"], txt_cfg=p["txt_cfg"],
                       seed=p["seed"], context_seed=p["vae_sample_seed"])
    assert_golden_image(image, tensors("edit")["output_image_uint8"])


def test_sample_steps_match_golden_latents(model):
    g, p = tensors("t2i"), case_params("t2i")
    refined = model.refine(model.encode_condition(p["prompt"], "t2i", width=64, height=64))
    latents = []
    model.sample(refined, 64, 64, steps=p["steps"], txt_cfg=p["txt_cfg"], seed=p["seed"],
                 callback=lambda step, total, x, denoised: latents.append(x.clone()))
    for s, x in enumerate(latents):
        assert_golden(x, g[f"step{s}.latent_out"], f"step{s}.latent_out")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cpu_gives_finite_images(dtype):
    model = ovis_u1.load_model(CHECKPOINT, device="cpu", dtype=dtype)
    assert model.llm.model.embed_tokens.weight.dtype == dtype
    t2i = model.text_to_image("a cute cat", 64, 64, steps=2, seed=1)
    edit = model.edit(edit_input(), "add a hat", steps=2, seed=1)
    for image in (t2i, edit):
        a = np.asarray(image)
        assert a.std() > 0  # a real picture, not a blank
    latent = model.sample(model.refine(model.encode_condition("a cat", "t2i", width=64, height=64)), 64, 64, steps=2)
    assert torch.isfinite(latent).all()


# ------------------------------------------------------------------------------------------- checkpoint
def full_size_expected() -> dict[str, list[int]]:
    return json.loads((GOLDEN / "full_size" / "state_dict_shapes.json").read_text())["shapes"]


def test_full_size_model_has_exactly_the_real_keys_and_shapes():
    config = json.loads((GOLDEN / "full_size" / "config.json").read_text())
    with torch.device("meta"):
        model = OvisU1(params_from_dicts(config))
    ours = {k: list(t.shape) for k, t in model.state_dict().items() if k != "llm.lm_head.weight"}
    expected = full_size_expected()
    assert len(expected) == 1060
    assert ours == expected


def _copy_checkpoint(tmp_path, edit_state=None):
    target = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINT, target)
    if edit_state is not None:
        state = load_file(str(target / "model.safetensors"))
        edit_state(state)
        save_file(state, str(target / "model.safetensors"))
    return target


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda s: s.pop("vte.weight"), "missing key(s): vte.weight"),
        (lambda s: s.__setitem__("visual_generator.backbone.extra.weight", torch.zeros(2)),
         "unexpected key(s): visual_generator.backbone.extra.weight"),
        (lambda s: s.__setitem__("visual_generator.backbone.img_in.bias", torch.zeros(3)),
         "wrong shape: visual_generator.backbone.img_in.bias"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_bad_keys_are_named(tmp_path, edit, needle):
    with pytest.raises(CheckpointError, match=None) as err:
        ovis_u1.load_model(_copy_checkpoint(tmp_path, edit), device="cpu", dtype=torch.float32)
    assert needle in str(err.value)


@pytest.mark.parametrize("conv_shaped", [False, True])
def test_legacy_vae_attention_names_load_the_same_weights(tmp_path, model, conv_shaped):
    """Old diffusers wrote the VAE attention as query/key/value/proj_attn, possibly as 1×1 convolutions."""
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def to_legacy(state):
        for key in [k for k in state if ".mid_block.attentions.0." in k]:
            new = next((n for n in legacy if f".attentions.0.{n}." in key), None)
            if new is not None:
                value = state.pop(key)
                if conv_shaped and value.dim() == 2:
                    value = value[:, :, None, None]
                state[key.replace(f".attentions.0.{new}.", f".attentions.0.{legacy[new]}.")] = value

    target = _copy_checkpoint(tmp_path, to_legacy)
    assert any(".attentions.0.query." in k for k in load_file(str(target / "model.safetensors")))
    loaded = ovis_u1.load_model(target, device="cpu", dtype=torch.float32)
    reference = model.vae.state_dict()
    for key, value in loaded.vae.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_truncated_weights_are_reported(tmp_path):
    target = _copy_checkpoint(tmp_path)
    path = target / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        ovis_u1.load_model(target, device="cpu", dtype=torch.float32)


def test_sharded_checkpoint_loads(tmp_path, model):
    target = _copy_checkpoint(tmp_path)
    state = load_file(str(target / "model.safetensors"))
    (target / "model.safetensors").unlink()
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(target / name))
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = ovis_u1.load_model(target, device="cpu", dtype=torch.float32)
    assert torch.equal(loaded.vte.weight, model.vte.weight)
    assert loaded.llm.lm_head.weight.data_ptr() == loaded.llm.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("setup", ["empty", "not_ovis", "missing"])
def test_unusable_folders_are_explained(tmp_path, setup):
    folder = tmp_path / "folder"
    if setup != "missing":
        folder.mkdir()
    if setup == "not_ovis":
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError) as err:
        ovis_u1.load_model(folder, device="cpu")
    assert str(folder) in str(err.value) or "config.json" in str(err.value)


# ------------------------------------------------------------------------------------------ smoke model
def test_smoke_model_runs_every_task(tmp_path):
    from ovis_u1.smoke import build_smoke_model, is_smoke_model

    path = build_smoke_model(tmp_path / "smoke")
    assert is_smoke_model(path)
    model = ovis_u1.load_model(path, device="cpu", dtype=torch.float32)
    image = model.text_to_image("a fox", 64, 64, steps=2)
    assert image.size == (64, 64)
    assert model.edit(image, "make it blue", steps=2).size == (64, 64)
    assert model.understand([image], "What is it?", max_new_tokens=4).token_ids


def test_a_part_computes_where_its_manager_says(model):
    """A partially loaded part (ComfyUI lowvram) keeps weights on the offload device: the manager's
    ``execution_device`` decides where inputs go, not the first weight's device."""
    from ovis_u1.model import _device_of

    assert _device_of(model.mmdit) == torch.device("cpu")
    model.mmdit.execution_device = torch.device("meta")
    try:
        assert _device_of(model.mmdit) == torch.device("meta")
    finally:
        del model.mmdit.execution_device
    assert _device_of(model.mmdit) == torch.device("cpu")
