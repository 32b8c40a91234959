"""The pack inside a real ComfyUI: loaded as ComfyUI loads custom nodes, every example workflow through ComfyUI's
executor with its core nodes (LoadImage, SaveImage, PreviewImage, Canny, ImageBatch), the golden image through that
path, progress and previews over the websocket, and an interrupt in the middle of sampling. CPU, tiny checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.comfyui.conftest import EDIT_IMAGE, UNDERSTAND_IMAGE
from tests.comfyui import layers
from tests.comfyui.prompts import GOLDEN_T2I, nodes_of, workflow_prompt
from tests.golden import assert_golden_image, manifest, tensors
from tests.pack import import_pack
from tests.test_workflows import WORKFLOWS

WORKFLOW_NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
PACK_NODES = sorted(import_pack().NODE_CLASS_MAPPINGS)
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
    models = info["OvisU1ModelLoader"]["input"]["required"]["model"][0]
    assert "Ovis-U1-3B" in models, f"the loader lists {models}, not the checkpoint in models/ovis_u1"


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


def test_vae_nodes_with_comfyuis_latent_files(comfy):
    """The node no workflow uses: VAE Encode of the edit input at the edit size (Edit Context Encoder's resized
    image) gives the golden posterior mean, written by ComfyUI's SaveLatent; VAE Decode of it makes an image."""
    from safetensors.torch import load_file

    from tests.golden import assert_golden

    prompt = {
        "1": {"class_type": "OvisU1ModelLoader", "inputs": {"model": "Ovis-U1-3B", "dtype": "fp32", "attention": "auto"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": EDIT_IMAGE}},
        "3": {"class_type": "OvisU1EditContextEncoder", "inputs": {"model": ["1", 0], "image": ["2", 0], "seed": 0}},
        "4": {"class_type": "OvisU1VAEEncode", "inputs": {"model": ["1", 0], "image": ["3", 1]}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "latents/ovis_u1"}},
        "6": {"class_type": "OvisU1VAEDecode", "inputs": {"model": ["1", 0], "samples": ["4", 0]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
    run = comfy.run(prompt)
    assert run.status == "success", run.explain()
    (latent_file,) = run.outputs["5"]["latents"]
    latent = load_file(str(comfy.output_file(latent_file)))["latent_tensor"]
    assert_golden(latent, tensors("edit")["context.latent_mean"], "VAE Encode → SaveLatent")
    (decoded,) = saved_images(comfy, run, "7")
    assert decoded.shape == (*tensors("edit")["output_image_uint8"].shape[:2], 3)
