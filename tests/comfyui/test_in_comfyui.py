"""The pack inside a real ComfyUI: loaded as ComfyUI loads custom nodes, every example workflow through ComfyUI's
executor with its core nodes (EmptyLatentImage, VAEDecode, SamplerCustomAdvanced and the guiders, LoadImage,
SaveImage, PreviewImage, Canny), the golden text-to-image and edit images through that path, progress and
previews over the websocket (ComfyUI's own sampling callback on the MMDiT Sampler), an interrupt in the middle of
sampling, and core VAEEncode/VAEDecode on the loader's VAE. CPU, tiny checkpoint."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
from PIL import Image

from tests.comfyui.conftest import EDIT_IMAGE, UNDERSTAND_IMAGE
from tests.comfyui import layers
from tests.comfyui.prompts import GOLDEN_EDIT, GOLDEN_EDIT_SEEDS, GOLDEN_T2I, nodes_of, workflow_prompt
from tests.golden import assert_golden_image, manifest, tensors
from tests.comfyui.server import PACK_DIR_NAME
from tests.pack import node_classes
from tests.test_workflows import WORKFLOWS

WORKFLOW_NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
PACK_NODES = sorted(node_classes())
IMAGES = [EDIT_IMAGE, UNDERSTAND_IMAGE]  # to the LoadImage nodes in execution order (understanding: edit first too)


def saved_images(comfy, run, node_id: str) -> list[np.ndarray]:
    images = run.outputs.get(node_id, {}).get("images", [])
    return [np.asarray(Image.open(comfy.output_file(image)).convert("RGB")) for image in images]


def sampler_progress(run, prompt: dict) -> list[tuple[int, int]]:
    (sampler,) = nodes_of(prompt, "OvisU1Sampler")
    return [(m["value"], m["max"]) for m in run.of_type("progress") if m.get("node") == sampler]


def test_the_pack_loads_as_a_custom_node(comfy):
    log = comfy.log()
    assert "IMPORT FAILED" not in log and "Cannot import" not in log, log[-6000:]
    if layers.LAZY:  # the server really builds comfy.ops layers as Dynamic VRAM does
        assert "comfy.ops layers built lazily, as under Dynamic VRAM: True" in log, log[-6000:]
    info = comfy.get("/object_info")
    missing = [name for name in PACK_NODES if name not in info]
    assert not missing, f"nodes missing from /object_info: {missing}\n{log[-6000:]}"
    assert all("ComfyUI-Ovis-U1" in info[name].get("python_module", "") for name in PACK_NODES)
    models = info["OvisU1ModelLoader"]["input"]["required"]["model"][1]["options"]
    assert "Ovis-U1-3B" in models, f"the loader lists {models}, not the checkpoint in models/ovis_u1"


def test_the_help_pages_of_the_v3_nodes_are_served(comfy):
    """WEB_DIRECTORY still serves nodes/web for a pack that registers its nodes through comfy_entrypoint."""
    for name in PACK_NODES:
        with urllib.request.urlopen(f"{comfy.url}/extensions/{PACK_DIR_NAME}/docs/{name}.md", timeout=30) as page:
            assert page.read().decode("utf-8").startswith("# Ovis-U1 "), name


@pytest.mark.parametrize("node, name, value", [("OvisU1ModelLoader", "dtype", "fp8"),
                                               ("OvisU1ModelLoader", "weight_dtype", "fp4"),
                                               ("OvisU1EncodeCondition", "mode", "inpaint"),
                                               ("OvisU1Sampler", "timestep_shift", "maybe")])
def test_comfyui_refuses_a_choice_the_node_does_not_offer(comfy, node, name, value):
    """The nodes map their choices without checking them again: ComfyUI's validation refuses anything else."""
    prompt = workflow_prompt("text_to_image")
    (node_id,) = nodes_of(prompt, node)
    prompt[node_id]["inputs"][name] = value
    with pytest.raises(AssertionError, match=rf"(?s)value_not_in_list.*{name}"):
        comfy.run(prompt)


def test_understand_takes_its_inputs_by_their_api_names(comfy):
    """sampling is a DynamicCombo (its inputs as sampling.temperature, ...), the images an Autogrow (images.image0,
    ...); an API prompt of the classic node (do_sample, image) is refused with the new names (ComfyUI's validation
    requires a DynamicCombo only when the prompt names it)."""
    info = comfy.get("/object_info")["OvisU1Understand"]["input"]
    assert info["required"]["sampling"][0] == "COMFY_DYNAMICCOMBO_V3"
    assert info["optional"]["images"][0] == "COMFY_AUTOGROW_V3"
    prompt = workflow_prompt("multi_image_understanding", IMAGES, by_name={"max_new_tokens": 2})
    (node,) = nodes_of(prompt, "OvisU1Understand")
    assert {"images.image0", "images.image1"} <= set(prompt[node]["inputs"])
    prompt[node]["inputs"].update({"sampling": "sample", "sampling.temperature": 1.5, "sampling.top_p": 0.9,
                                   "sampling.seed": 3})
    run = comfy.run(prompt)
    assert run.status == "success", run.explain()
    assert len(run.outputs[node]["text"]) == 1  # ui.PreviewText: one text
    classic = {k: v for k, v in prompt[node]["inputs"].items() if not k.startswith(("sampling", "images."))}
    prompt[node]["inputs"] = {**classic, "do_sample": False, "image": prompt[node]["inputs"]["images.image0"]}
    run = comfy.run(prompt)
    assert run.status == "error", run.explain()
    message = run.error["exception_message"]  # ComfyUI drops the unknown widget do_sample, passes the link on
    assert message.startswith("image: not this node's API input names") and "images.image0" in message


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_every_workflow_runs_through_comfyuis_executor(comfy, name):
    prompt = workflow_prompt(name, IMAGES)
    run = comfy.run(prompt)
    assert run.status == "success", run.explain()
    info = comfy.get("/object_info")
    output_nodes = [i for i, node in prompt.items() if info[node["class_type"]].get("output_node")]
    assert output_nodes, f"{name} has no output node"
    for node_id in output_nodes:
        node = prompt[node_id]["class_type"]
        assert node_id in run.outputs, f"{name}: {node} (node {node_id}) produced no output"
        if "images" in run.outputs[node_id]:
            for image in saved_images(comfy, run, node_id):
                assert image.ndim == 3 and image.std() > 1, f"{name}: {node} wrote a blank image"
        else:
            text = run.outputs[node_id].get("text")
            assert text and text[0].strip(), f"{name}: {node} shows no text: {run.outputs[node_id]}"


def test_text_to_image_reproduces_the_golden_image(comfy):
    prompt = workflow_prompt("text_to_image", by_name=GOLDEN_T2I)
    run = comfy.run(prompt)
    assert run.status == "success", run.explain()
    (save,) = nodes_of(prompt, "SaveImage")
    (image,) = saved_images(comfy, run, save)
    assert_golden_image(image, tensors("t2i")["output_image_uint8"])


def test_image_edit_reproduces_the_golden_image(comfy):
    """LoadImage → Edit Context Encoder (resized image, context, latent) → Encode Condition → Refiner → MMDiT Sampler
    (dual CFG) → VAEDecode on the loader's vae, as image_edit.json wires it."""
    prompt = workflow_prompt("image_edit", [EDIT_IMAGE], by_name=GOLDEN_EDIT, overrides=GOLDEN_EDIT_SEEDS)
    run = comfy.run(prompt)
    assert run.status == "success", run.explain()
    (save,) = nodes_of(prompt, "SaveImage")
    (image,) = saved_images(comfy, run, save)
    assert_golden_image(image, tensors("edit")["output_image_uint8"])


def test_understanding_reproduces_the_golden_answer(comfy):
    p = manifest()["cases"]["understand"]
    prompt = workflow_prompt("image_understanding", [UNDERSTAND_IMAGE],
                             by_name={"question": p["params"]["question"], "max_new_tokens": p["params"]["max_new_tokens"],
                                      "dtype": "fp32"})
    run = comfy.run(prompt)
    assert run.status == "success", run.explain()
    (node,) = nodes_of(prompt, "OvisU1Understand")
    assert run.outputs[node]["text"][0].strip() == p["generated_text"].strip()


def test_progress_and_previews_reach_the_client(comfy):
    """The MMDiT Sampler runs ComfyUI's own sampling: its callback sends one progress message per step (on the
    sampler's node) and a latent preview."""
    steps = 4
    prompt = workflow_prompt("text_to_image", by_name={**GOLDEN_T2I, "steps": steps, "seed": 7})
    run = comfy.run(prompt)
    assert run.status == "success", run.explain()
    progress = sampler_progress(run, prompt)
    assert progress and all(total == steps for _, total in progress), progress
    values = [value for value, _ in progress]
    assert values == sorted(values) and set(range(1, steps + 1)) <= set(values), progress
    assert run.previews >= 1, "no latent preview arrived (the server runs with --preview-method latent2rgb)"


def test_interrupt_mid_sampling_leaves_the_model_usable(comfy):
    steps = 400
    prompt = workflow_prompt("text_to_image", by_name={**GOLDEN_T2I, "steps": steps})
    (sampler,) = nodes_of(prompt, "OvisU1Sampler")

    def interrupt_at_first_step(server, message):
        if message["type"] == "progress" and message["data"].get("node") == sampler and not server.interrupted:
            server.interrupted = True
            server.interrupt()

    comfy.interrupted = False
    run = comfy.run(prompt, on_message=interrupt_at_first_step)
    assert comfy.interrupted, "the sampler sent no progress before finishing"
    assert run.status == "interrupted", run.explain()
    done = max(value for value, _ in sampler_progress(run, prompt))
    assert done < steps, f"the interrupt did not stop sampling ({done} of {steps} steps ran)"

    golden = workflow_prompt("text_to_image", by_name=GOLDEN_T2I)
    again = comfy.run(golden)
    assert again.status == "success", again.explain()
    assert sampler_progress(again, golden), "the sampler did not run again (served from the cache)"
    (save,) = nodes_of(golden, "SaveImage")
    (image,) = saved_images(comfy, again, save)
    assert_golden_image(image, tensors("t2i")["output_image_uint8"])


def test_core_vae_nodes_on_the_loaders_vae_with_comfyuis_latent_files(comfy):
    """No workflow encodes an image with core VAEEncode: of the Edit Context Encoder's resized image (the edit input
    at the edit size) it gives the golden posterior mean, written by ComfyUI's SaveLatent; the Edit Context
    Encoder's context is the golden seeded posterior sample; VAEDecode of the mean makes an image of the edit size."""
    from safetensors.torch import load_file

    from tests.golden import assert_golden

    vae_seed = GOLDEN_EDIT_SEEDS["OvisU1EditContextEncoder"]["seed"]
    prompt = {
        "1": {"class_type": "OvisU1ModelLoader", "inputs": {"model": "Ovis-U1-3B", "dtype": "fp32", "attention": "auto"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": EDIT_IMAGE}},
        "3": {"class_type": "OvisU1EditContextEncoder", "inputs": {"vae": ["1", 2], "image": ["2", 0], "seed": vae_seed}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["1", 2]}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "latents/ovis_u1_mean"}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 1], "filename_prefix": "latents/ovis_u1_context"}},
    }
    run = comfy.run(prompt)
    assert run.status == "success", run.explain()
    golden = tensors("edit")

    def saved_latent(node: str):
        (latent_file,) = run.outputs[node]["latents"]
        return load_file(str(comfy.output_file(latent_file)))["latent_tensor"]

    assert_golden(saved_latent("5"), golden["context.latent_mean"], "VAEEncode → SaveLatent")
    sample = golden["context.latent_mean"] + golden["context.latent_std"] * golden["context.sample_eps"]
    assert_golden(saved_latent("8"), sample, "Edit Context Encoder context → SaveLatent")
    (decoded,) = saved_images(comfy, run, "7")
    assert decoded.shape == (*golden["output_image_uint8"].shape[:2], 3)
