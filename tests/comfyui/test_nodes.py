"""The pack's nodes inside ComfyUI (imported in this process, ``--cpu``), called the way ComfyUI's executor calls
V3 nodes (``execute`` with the inputs as keyword arguments; a DynamicCombo or an Autogrow input as the dict ComfyUI
builds from its API names), on the tiny_a goldens: Understand and Encode Condition reproduce the golden token ids
and LLM states, the wiring and bad-input errors name the input (by its API name, e.g. ``mode.context``) and the
fix. The generating nodes (MMDiT Sampler, Refiner, Scheduler, Edit Context Encoder) reproduce the golden images in
tests/comfyui/test_generation.py. The pack's nodes raise the pack's own copy of the library's errors (it imports
``ovis_u1`` relatively, as ComfyUI imports it), so the errors checked here are that copy's classes."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.golden import CHECKPOINT, TINY_A, assert_golden, case_params, requires_golden, tensors
from tests.pack import COMFYUI_PATH, PACK_NAME, import_pack, node_classes

if not COMFYUI_PATH:
    pytest.skip("in-ComfyUI tests need COMFYUI_PATH", allow_module_level=True)

CORE_TYPES = {"MODEL", "CLIP", "VAE", "CONDITIONING", "CLIP_VISION", "CONTROL_NET", "LATENT", "IMAGE", "MASK", "STRING",
              "INT", "FLOAT", "BOOLEAN", "NOISE", "SAMPLER", "SIGMAS", "GUIDER"}
DYNAMIC_TYPES = {"COMFY_DYNAMICCOMBO_V3", "COMFY_AUTOGROW_V3"}
LOADER_OUTPUTS = {"OVIS_U1_ENCODER": "encoder", "MODEL": "model", "VAE": "vae"}

pytestmark = requires_golden


PACK = import_pack()
NODES = node_classes(PACK)
bridge = sys.modules[f"{PACK_NAME}.nodes.comfy_bridge"]
host = sys.modules[f"{PACK_NAME}.nodes.comfy_bridge.host"]  # where Progress looks up check_interrupt
library = sys.modules[f"{PACK_NAME}.ovis_u1"]  # the pack's own copy of the library
InputError = library.OvisU1InputError
CheckpointError = library.CheckpointError


# ---------------------------------------------------------------------------------------------------- helpers
def defaults(node: str) -> dict:
    """The widget inputs at their defaults (a combo at its default or first option; a DynamicCombo at its first
    option, as the dict ComfyUI hands ``execute``)."""
    kwargs = {}
    for name, (kind, *rest) in NODES[node].INPUT_TYPES()["required"].items():
        options = rest[0] if rest else {}
        if kind == "COMFY_DYNAMICCOMBO_V3":
            kwargs[name] = {name: options["options"][0]["key"]}
        elif "default" in options:
            kwargs[name] = options["default"]
        elif kind == "COMBO" and options["options"]:  # the model list may be empty
            kwargs[name] = options["options"][0]
    return kwargs


def run(node: str, **given):
    """Call the node's ``execute`` like ComfyUI's executor; its outputs (and its ui dict, for an output node)."""
    cls = NODES[node]
    unknown = set(given) - set(cls.INPUT_TYPES()["required"]) - set(cls.INPUT_TYPES().get("optional", {}))
    assert not unknown, f"{node} has no input(s) {unknown}"
    out = cls.execute(**{**defaults(node), **given})
    assert len(out.args) == len(cls.RETURN_TYPES), f"{node} returned {out.args}"
    return (out.args, out.ui.as_dict()) if cls.OUTPUT_NODE else out.args


def use_model_root(monkeypatch, root: Path) -> None:
    """ComfyUI's ovis_u1 model folder is ``root`` alone (as an ``ovis_u1:`` line of extra_model_paths.yaml)."""
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "ovis_u1", ([str(root)], set()))


def load_image(path: Path) -> torch.Tensor:
    """An IMAGE as ComfyUI's LoadImage makes it."""
    return image_of(Image.open(path))


def image_of(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB")).astype(np.float32) / 255.0)[None]


def save_uint8(image: torch.Tensor) -> torch.Tensor:
    """The pixels ComfyUI's SaveImage writes: uint8(clip(255·x))."""
    return torch.from_numpy(np.clip(255.0 * image[0].cpu().numpy(), 0, 255).astype(np.uint8))


def empty_latent(width: int, height: int, batch: int = 1) -> dict:
    """A LATENT as EmptyLatentImage makes it."""
    return {"samples": torch.zeros(batch, 4, height // 8, width // 8)}


def t2i_condition(encoder, **given):
    p = case_params("t2i")
    given = {"prompt": p["prompt"], "mode": "text-to-image", "latent": empty_latent(p["width"], p["height"]),
             **given}
    return run("OvisU1EncodeCondition", encoder=encoder, **given)


def resized_image() -> torch.Tensor:
    """The golden edit input as the Edit Context Encoder's 'resized_image' (the pack's own edit_source)."""
    source = sys.modules[f"{PACK_NAME}.ovis_u1.model"].edit_source(Image.open(TINY_A / "cases" / "edit" / "input.png"))
    return image_of(source)


def edit_context(seed: int = 0, batch: int = 1) -> dict:
    """A LATENT of the edit size (96×64) standing in for the Edit Context Encoder's 'context'."""
    return {"samples": torch.randn(batch, 4, 8, 12, generator=torch.Generator().manual_seed(seed))}


def edit_condition(encoder, **given):
    given = {"prompt": case_params("edit")["prompt"], "mode": "edit", "image": resized_image(),
             "context": edit_context(), **given}
    return run("OvisU1EncodeCondition", encoder=encoder, **given)


def understand(encoder, image="golden", **given):
    """Understand on the golden question; ``image`` on its first image socket (None: none connected)."""
    p = case_params("understand")
    if isinstance(image, str) and image == "golden":
        image = load_image(TINY_A / "cases" / "understand" / "input.png")
    given = {"images": {} if image is None else {"image0": image}, "question": p["question"],
             "max_new_tokens": p["max_new_tokens"], **given}
    (answer,), ui = run("OvisU1Understand", encoder=encoder, **given)
    return answer, ui


def assert_understands(encoder):
    """The encoder still answers exactly as the golden (used after every error)."""
    ids = tensors("understand")["generated_ids"].tolist()
    answer, _ = understand(encoder)
    assert answer == encoder.model.tokenizer.decode(ids, skip_special_tokens=True)


def raises(fn, *texts: str, error=None) -> str:
    with pytest.raises(error or InputError) as info:
        fn()
    for text in texts:
        assert text in str(info.value), f"{text!r} not in {str(info.value)!r}"
    return str(info.value)


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """ComfyUI's ovis_u1 model folder with a good checkpoint (symlink), an empty folder, a non-Ovis folder and a
    checkpoint whose model.safetensors is truncated."""
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
        use_model_root(mp, root)
        yield root


@pytest.fixture(scope="module")
def loaded(models_dir):
    """The loader's outputs, loaded once per module with the default dtype and attention."""
    return run("OvisU1ModelLoader", model="tiny_a")


@pytest.fixture(scope="module")
def encoder(loaded):
    return loaded[0]


@pytest.fixture
def loads(encoder, monkeypatch):
    """The memory every ``encoder.load`` of a test asked for (the encoder still loads)."""
    asked = []
    original = encoder.load

    def load(memory_required=0):
        asked.append(memory_required)
        return original(memory_required)

    monkeypatch.setattr(encoder, "load", load)
    return asked


# ----------------------------------------------------------------------------------------------- registration
def test_the_nodes_of_the_pack():
    """ComfyUI registers the nodes from comfy_entrypoint (V3), not from NODE_CLASS_MAPPINGS (which would win)."""
    assert list(NODES) == ["OvisU1ModelLoader", "OvisU1Understand", "OvisU1EncodeCondition", "OvisU1Refiner",
                           "OvisU1EditContextEncoder", "OvisU1Sampler", "OvisU1Scheduler"]
    assert not hasattr(PACK, "NODE_CLASS_MAPPINGS") and PACK.WEB_DIRECTORY == "./nodes/web"


def test_every_node_follows_the_conventions():
    for name, cls in NODES.items():
        schema = cls.GET_SCHEMA()
        assert name.startswith("OvisU1") and schema.display_name.startswith("Ovis-U1 "), name
        assert cls.CATEGORY == "Ovis-U1" and cls.DESCRIPTION.strip() and schema.search_aliases, name
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) and all(t.strip() for t in cls.OUTPUT_TOOLTIPS)
        names = cls.RETURN_NAMES
        assert len(names) == len(cls.RETURN_TYPES) and len(set(names)) == len(names), name
        for kind in cls.RETURN_TYPES:
            assert kind in CORE_TYPES or kind.startswith("OVIS_U1_"), f"{name} returns {kind}"
        for section, inputs in cls.INPUT_TYPES().items():
            assert section in ("required", "optional", "hidden"), f"{name}: section {section}"
            for input_name, (kind, *rest) in inputs.items() if section != "hidden" else ():
                assert rest and rest[0].get("tooltip") or kind == "COMFY_AUTOGROW_V3", f"{name}.{input_name}"
                assert kind in CORE_TYPES | DYNAMIC_TYPES | {"COMBO"} or kind.startswith("OVIS_U1_"), (
                    f"{name}.{input_name}: {kind}")


def test_inputs_are_named_after_the_outputs_that_feed_them():
    """A socket fed by the loader is named as the loader's output; the guidance inputs as Encode Condition's outputs,
    so each output goes to the input of the same name."""
    loader = NODES["OvisU1ModelLoader"]
    assert list(loader.RETURN_TYPES) == ["OVIS_U1_ENCODER", "MODEL", "VAE"]
    assert list(loader.RETURN_NAMES) == ["encoder", "model", "vae"]
    for name, cls in NODES.items():
        for inputs in cls.INPUT_TYPES().values():
            for input_name, (kind, *_) in inputs.items():
                if isinstance(kind, str) and kind in LOADER_OUTPUTS:
                    assert input_name == LOADER_OUTPUTS[kind], f"{name}.{input_name} takes the loader's {kind}"
    branches = list(NODES["OvisU1EncodeCondition"].RETURN_NAMES)
    assert branches == ["positive", "middle", "negative"]
    assert list(NODES["OvisU1Refiner"].RETURN_NAMES) == branches
    assert list(NODES["OvisU1EncodeCondition"].RETURN_TYPES) == ["CONDITIONING"] * 3
    for node in ("OvisU1Refiner", "OvisU1Sampler"):
        spec = NODES[node].INPUT_TYPES()
        assert {n for n, (k, *_) in {**spec["required"], **spec["optional"]}.items() if k == "CONDITIONING"} == set(
            branches), node
        assert list(spec["optional"]) == ["middle"], f"{node}: middle is optional (text-to-image has none)"
    context = NODES["OvisU1EditContextEncoder"]
    assert list(context.RETURN_NAMES) == ["resized_image", "context", "latent"]
    assert list(context.RETURN_TYPES) == ["IMAGE", "LATENT", "LATENT"]
    optional = NODES["OvisU1EncodeCondition"].INPUT_TYPES()["optional"]
    assert [optional[n][0] for n in ("latent", "image", "context")] == ["LATENT", "IMAGE", "LATENT"]
    assert "'resized_image'" in optional["image"][1]["tooltip"]
    assert "'context'" in optional["context"][1]["tooltip"]


def spec_of(node: str, name: str):
    spec = NODES[node].INPUT_TYPES()
    return {**spec["required"], **spec.get("optional", {})}[name]


def test_defaults_are_the_official_demo():
    assert spec_of("OvisU1EncodeCondition", "mode")[1]["options"] == ["text-to-image", "edit"]
    assert defaults("OvisU1EncodeCondition")["mode"] == "text-to-image"
    smp = defaults("OvisU1Sampler")
    assert (smp["steps"], smp["txt_cfg"], smp["img_cfg"], smp["seed"], smp["timestep_shift"]) == (
        50, 5.0, 1.5, 42, "config")
    assert spec_of("OvisU1Sampler", "seed")[1]["control_after_generate"] is True
    sampling = {o["key"]: o["inputs"]["required"] for o in spec_of("OvisU1Understand", "sampling")[1]["options"]}
    assert list(sampling) == ["greedy", "sample"] and not sampling["greedy"]  # greedy first: the official default
    assert list(sampling["sample"]) == ["temperature", "top_p", "seed"]
    # fixed seeds: no re-run on every queue
    assert sampling["sample"]["seed"][1]["control_after_generate"] is False
    assert spec_of("OvisU1EditContextEncoder", "seed")[1]["control_after_generate"] is False
    assert defaults("OvisU1Understand")["max_new_tokens"] == 1024
    assert defaults("OvisU1EditContextEncoder")["seed"] == 42
    sched = defaults("OvisU1Scheduler")
    assert (sched["steps"], sched["timestep_shift"], sched["denoise"]) == (50, "config", 1.0)
    assert spec_of("OvisU1ModelLoader", "dtype")[1]["options"] == ["auto", "bf16", "fp16", "fp32"]
    assert spec_of("OvisU1ModelLoader", "dtype")[1]["default"] == "auto"
    assert spec_of("OvisU1ModelLoader", "attention")[1]["options"] == ["auto", "sdpa", "flash_attn"]
    assert spec_of("OvisU1ModelLoader", "weight_dtype")[1]["options"] == [
        "default", "fp8_e4m3fn", "fp8_e5m2", "fp8_e4m3fn_scaled"]


# ------------------------------------------------------------------------------------------------------ loader
def test_loader_lists_only_ovis_checkpoints(models_dir):
    names = spec_of("OvisU1ModelLoader", "model")[1]["options"]
    assert "tiny_a" in names and "truncated" in names
    assert "empty" not in names and "not_ovis" not in names
    assert NODES["OvisU1ModelLoader"].validate_inputs("tiny_a") is True
    message = NODES["OvisU1ModelLoader"].validate_inputs("nowhere")
    assert isinstance(message, str) and "models/ovis_u1" in message and "'nowhere'" in message


def test_the_loader_gives_the_encoder_the_model_and_the_vae(loaded):
    """dtype auto is fp32 on the CPU; the encoder's parts are under their own patcher, the MMDiT and the VAE are the
    core MODEL and VAE."""
    encoder, model, vae = loaded
    assert isinstance(encoder, bridge.OvisU1Encoder) and encoder.patcher is not None
    assert (encoder.dtype, encoder.attention, encoder.name) == (torch.float32, "auto", "tiny_a")
    assert "tiny_a" in repr(encoder)
    assert model.model.diffusion_model is not None and vae.patcher is not None
    ovis = encoder.load()
    assert isinstance(ovis, library.OvisU1) and ovis is encoder.model and encoder.params is ovis.params
    for part in (ovis.llm, ovis.visual_tokenizer, ovis.vte):
        weight = next(part.parameters())
        assert weight.device.type == "cpu" and weight.dtype == torch.float32


def test_loader_choices_reach_the_encoder(models_dir):
    encoder, *_ = run("OvisU1ModelLoader", model="tiny_a", dtype="bf16", attention="sdpa")
    assert encoder.dtype == torch.bfloat16 and encoder.attention == "sdpa"
    assert next(encoder.load().llm.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "name, expected",
    [
        ("empty", ["model 'empty'", "no config.json", "Ovis-U1-3B"]),
        ("not_ovis", ["model 'not_ovis'", "model_type must be 'ovis_u1'"]),
        ("truncated", ["model 'truncated'", "truncated", "download it again"]),
    ],
)
def test_loader_errors_name_the_input_and_the_fix(models_dir, encoder, name, expected):
    raises(lambda: run("OvisU1ModelLoader", model=name), *expected, error=CheckpointError)
    assert_understands(encoder)


# -------------------------------------------------------------------------------------------------- understand
def test_understand_reproduces_the_golden_token_ids(encoder, monkeypatch, loads):
    seen = []
    original = type(encoder.model).understand

    def spy(self, *args, **kwargs):
        seen.append(original(self, *args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(type(encoder.model), "understand", spy)
    answer, ui = understand(encoder)
    ids = tensors("understand")["generated_ids"].tolist()
    assert seen[-1].token_ids == ids
    assert answer == seen[-1].text == encoder.model.tokenizer.decode(ids, skip_special_tokens=True)
    assert ui == {"text": (answer,)}  # ui.PreviewText
    assert NODES["OvisU1Understand"].OUTPUT_NODE is True
    assert len(loads) == 1 and loads[0] > 0  # the encoder is loaded once, with the request's activation estimate


def test_understand_without_image_and_with_an_image_batch(encoder):
    text_only, _ = understand(encoder, image=None)
    assert isinstance(text_only, str)
    image = load_image(TINY_A / "cases" / "understand" / "input.png")
    batch, _ = understand(encoder, image=torch.cat([image, image.flip(2)]))
    assert isinstance(batch, str)


def test_every_image_socket_goes_into_one_prompt_in_socket_order(encoder, monkeypatch):
    """Autogrow: image0, image1, ... (ComfyUI hands them as a dict); each socket may carry a batch."""
    seen = []
    original = type(encoder.model).understand

    def spy(self, images, *args, **kwargs):
        seen.append([image.size for image in images])
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(type(encoder.model), "understand", spy)
    wide, tall = torch.full((2, 32, 48, 3), 0.5), torch.full((1, 80, 32, 3), 0.25)
    understand(encoder, image=None, images={"image10": wide[:1], "image2": tall, "image0": wide}, max_new_tokens=1)
    assert seen == [[(48, 32), (48, 32), (32, 80), (48, 32)]]  # each image at its own size, no ImageBatch resize


def test_understand_sampling_is_seeded(encoder):
    sampling = {"sampling": "sample", "temperature": 1.5, "top_p": 0.9, "seed": 7}
    first, _ = understand(encoder, sampling=sampling)
    again, _ = understand(encoder, sampling=sampling)
    assert first == again


REWRITE = "Rewrite the user's short image prompt as one detailed paragraph. Answer with the rewritten prompt only."


def test_understand_passes_the_instruction(encoder):
    (answer,), ui = run("OvisU1Understand", encoder=encoder, question="a red fox", max_new_tokens=4,
                        instruction=REWRITE)
    assert ui["text"] == (answer,)
    assert answer == encoder.model.understand([], "a red fox", max_new_tokens=4, instruction=REWRITE).text
    (plain,), _ = run("OvisU1Understand", encoder=encoder, question="a red fox", max_new_tokens=4)
    (empty,), _ = run("OvisU1Understand", encoder=encoder, question="a red fox", max_new_tokens=4, instruction="")
    assert plain == empty


def test_understand_refuses_a_bad_instruction(encoder):
    raises(lambda: run("OvisU1Understand", encoder=encoder, question="a red fox", max_new_tokens=1, instruction=7),
           "instruction")


def test_understand_offers_the_instruction_last():
    """The newest widget comes after every older one."""
    assert NODES["OvisU1Understand"].GET_SCHEMA().inputs[-1].id == "instruction"
    kind, options = spec_of("OvisU1Understand", "instruction")
    assert kind == "STRING" and options["default"] == "" and options["multiline"] and options["tooltip"]


# --------------------------------------------------------------------------------------------- encode condition
def assert_mark(entries, mode: str, branch: str):
    assert isinstance(entries, list) and len(entries) == 1
    states, options = entries[0]
    assert options["ovis_u1"] == {"mode": mode, "branch": branch, "refined": False}
    assert isinstance(states, torch.Tensor) and states.device.type == "cpu" and states.dtype == torch.float32
    return states, options


def test_text_to_image_conditioning_is_the_golden_llm_states(encoder, loads):
    positive, middle, negative = t2i_condition(encoder)
    g = tensors("t2i")
    for entries, branch in ((positive, "cond"), (middle, "no_both"), (negative, "no_both")):
        states, options = assert_mark(entries, "t2i", branch)
        assert_golden(states, g[f"{branch}.txt"], f"{branch}.txt")
        assert set(options) == {"ovis_u1"}  # nothing in text-to-image sees a source image
    assert middle[0][0] is negative[0][0]  # no image-only branch: middle is the unconditional one
    assert len(loads) == 1 and loads[0] > 0


def test_the_canvas_is_the_latent_size(encoder, monkeypatch):
    seen = []
    original = type(encoder.model).encode_condition

    def spy(self, prompt, mode, **kwargs):
        seen.append((mode, kwargs.get("width"), kwargs.get("height"), kwargs.get("image")))
        return original(self, prompt, mode, **kwargs)

    monkeypatch.setattr(type(encoder.model), "encode_condition", spy)
    t2i_condition(encoder, latent=empty_latent(112, 80, batch=2))
    assert seen == [("t2i", 112, 80, None)]


def test_edit_conditioning_is_the_golden_llm_states_with_the_context(encoder, loads):
    context = edit_context(batch=2)
    positive, middle, negative = edit_condition(encoder, context=context)
    g = tensors("edit")
    for entries, branch in ((positive, "cond"), (middle, "no_txt"), (negative, "no_both")):
        states, options = assert_mark(entries, "edit", branch)
        assert_golden(states, g[f"{branch}.txt"], f"{branch}.txt")
    for entries in (positive, middle):  # the branches that see the source image carry its latent
        (reference,) = entries[0][1]["reference_latents"]
        assert torch.equal(reference, context["samples"][:1])
    assert "reference_latents" not in negative[0][1]
    assert len(loads) == 1 and loads[0] > 0


def test_an_rgba_or_greyscale_edit_image_is_read_as_rgb(encoder):
    image = resized_image()
    positive, *_ = edit_condition(encoder, image=image)
    rgba, *_ = edit_condition(encoder, image=torch.cat([image, torch.full_like(image[..., :1], 0.5)], dim=-1))
    assert torch.equal(positive[0][0], rgba[0][0])
    grey, *_ = edit_condition(encoder, image=image.mean(dim=-1, keepdim=True))
    assert_mark(grey, "edit", "cond")


# -------------------------------------------------------------------------------------------------- bad input
NOT_A_LATENT = [None, {"samples": None}, torch.zeros(1, 4, 8, 8), {"samples": torch.zeros(4, 8, 8)},
                {"samples": torch.zeros(0, 4, 8, 8)}]
# An unknown mode is refused by ComfyUI's validation of the combo (tests/comfyui/test_in_comfyui.py).
WIRING = [
    ("text-to-image without latent", dict(mode="text-to-image"),
     ["latent: text-to-image draws on a canvas of the latent's size", "EmptyLatentImage"]),
    *[(f"latent {i}", dict(mode="text-to-image", latent=bad), ["latent: expected a LATENT of images"])
      for i, bad in enumerate(NOT_A_LATENT[1:])],
    ("edit without image", dict(mode="edit", context=edit_context()),
     ["image: an edit needs the 'resized_image' and the 'context' of 'Ovis-U1 Edit Context Encoder'"]),
    ("edit without context", dict(mode="edit", image=torch.full((1, 64, 96, 3), 0.5)),
     ["context: an edit needs the 'resized_image' and the 'context'"]),
    ("edit without either", dict(mode="edit"), ["image: an edit needs"]),
    *[(f"context {i}", dict(mode="edit", image=torch.full((1, 64, 96, 3), 0.5), context=bad),
       ["context: expected a LATENT of images"]) for i, bad in enumerate(NOT_A_LATENT[1:])],
    ("edit image batch", dict(mode="edit", image=torch.full((2, 64, 96, 3), 0.5), context=edit_context()),
     ["image: got a batch of 2 images", "ImageFromBatch"]),
]


@pytest.mark.parametrize("case, given, texts", WIRING, ids=[c for c, *_ in WIRING])
def test_wiring_errors_are_named_before_the_encoder_loads(encoder, monkeypatch, case, given, texts):
    monkeypatch.setattr(encoder, "load", lambda *a, **k: pytest.fail("the encoder was loaded for a wiring error"))
    raises(lambda: run("OvisU1EncodeCondition", encoder=encoder, prompt="a cat", **given), *texts)


@pytest.mark.parametrize("image", ["original", "other size"])
def test_an_edit_image_not_at_the_context_size_names_the_resized_image(encoder, image):
    """Encode Condition does not resize: an image that is not the context's 'resized_image' is the wrong wire."""
    if image == "original":
        given, size = load_image(TINY_A / "cases" / "edit" / "input.png"), "90×60"
    else:
        given, size = torch.full((1, 64, 64, 3), 0.5), "64×64"
    raises(lambda: edit_condition(encoder, image=given), f"image is {size}", "the edit context is 96×64",
           "'resized_image'")
    assert_understands(encoder)


@pytest.mark.parametrize("latent, text", [((32, 64), "width 32"), ((64, 8192), "height 8192"),
                                          ((64, 72), "height 72"), ((72, 64), "multiple of 16")])
def test_bad_canvas_sizes(encoder, latent, text):
    raises(lambda: t2i_condition(encoder, latent=empty_latent(*latent)), text)
    assert_understands(encoder)


def test_empty_prompt_and_question(encoder):
    raises(lambda: t2i_condition(encoder, prompt="   "), "prompt is empty")
    raises(lambda: edit_condition(encoder, prompt=""), "prompt is empty")
    raises(lambda: understand(encoder, question=""), "question is empty")
    assert_understands(encoder)


def test_understand_rejects_an_image_that_is_no_image(encoder):
    raises(lambda: understand(encoder, image=torch.zeros(1, 8, 8, 7)), "images.image0: an image of 7 channels")
    raises(lambda: understand(encoder, image="photo.png"), "images.image0: expected an image batch", "got str")
    assert_understands(encoder)


# ------------------------------------------------------------------------------------------------- scheduler
def test_the_scheduler_at_denoise_0_needs_no_model():
    """As BasicScheduler: nothing to denoise, no SIGMAS (the node decides it before it reads the MODEL)."""
    (sigmas,) = run("OvisU1Scheduler", model=None, latent=None, denoise=0.0)
    assert sigmas.numel() == 0


# ----------------------------------------------------------------------------------------- progress, interrupt
class Interrupted(Exception):
    pass


def test_progress_checks_for_interruption_every_token(encoder, monkeypatch):
    calls, done = [], []
    monkeypatch.setattr(host, "check_interrupt", lambda: calls.append(1))
    update = bridge.Progress.update
    monkeypatch.setattr(bridge.Progress, "update", lambda self, n: (done.append((n, self.total)), update(self, n)))
    understand(encoder)
    tokens = case_params("understand")["max_new_tokens"]
    assert done == [(i, tokens) for i in range(1, tokens + 1)] and len(calls) == tokens


def test_interrupt_in_the_middle_of_an_answer(encoder, monkeypatch):
    tokens = []

    def interrupt_at_token_2():
        tokens.append(1)
        if len(tokens) == 2:
            raise Interrupted()

    monkeypatch.setattr(host, "check_interrupt", interrupt_at_token_2)
    with pytest.raises(Interrupted):
        understand(encoder)
    assert len(tokens) == 2
    monkeypatch.undo()
    assert_understands(encoder)
