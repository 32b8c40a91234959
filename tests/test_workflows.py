"""The example workflows in ``workflows/`` as files: exactly the examples, each with a note that says where the
weights go and a thumbnail, the multi-image one without core's deprecated ImageBatch. Checked against the node
definitions (which import only inside ComfyUI) in tests/comfyui/test_workflows.py, and run in a real server by
tests/comfyui/test_in_comfyui.py."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.pack import ROOT

WORKFLOWS = ROOT / "workflows"
NAMES = ("text_to_image", "image_edit", "image_understanding", "multi_image_understanding", "canny_to_image",
         "native_text_to_image", "native_image_edit", "prompt_rewrite_to_image")
# Where each workflow's LATENT inputs get the size from: the one node that sets it.
SIZE_SOURCE = {"text_to_image": "EmptyLatentImage", "prompt_rewrite_to_image": "EmptyLatentImage",
               "native_text_to_image": "EmptyLatentImage", "image_edit": "OvisU1EditContextEncoder",
               "canny_to_image": "OvisU1EditContextEncoder", "native_image_edit": "OvisU1EditContextEncoder"}


def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))


def nodes_of(graph: dict, type_: str) -> list[dict]:
    return [n for n in graph["nodes"] if n["type"] == type_]


def topological(graph: dict) -> list[dict]:
    """The executable nodes (not notes) so that every link goes from an earlier to a later node."""
    deps = {n["id"]: {link[1] for link in graph["links"] if link[3] == n["id"]} for n in graph["nodes"]}
    order, done = [], set()
    while len(order) < len(deps):
        ready = sorted(i for i in deps if i not in done and deps[i] <= done)
        assert ready, "the graph has a cycle"
        order.append(ready[0])
        done.add(ready[0])
    by_id = {n["id"]: n for n in graph["nodes"]}
    return [by_id[i] for i in order if by_id[i]["type"] != "Note"]


def test_the_workflow_folder_holds_exactly_the_examples():
    assert sorted(p.stem for p in WORKFLOWS.glob("*.json")) == sorted(NAMES)
    assert sorted(p.stem for p in WORKFLOWS.glob("*.jpg")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_workflow_has_a_note_and_a_thumbnail(name):
    graph = load_workflow(name)
    notes = nodes_of(graph, "Note")
    assert notes, f"{name}: no Note node"
    text = " ".join(n["widgets_values"][0] for n in notes)
    assert "models/ovis_u1/Ovis-U1-3B" in text, f"{name}: the note must say where the weights go"
    # nothing of the old API: no size to keep equal by hand, no outputs or nodes that are gone
    for stale in ("must be the same", "at the same size", "on the sampler are ignored", "diffusion_model",
                  "Ovis-U1 VAE", "native path", "OVIS_U1_", "do_sample", "Batch Images"):
        assert stale not in text, f"{name}: the note still says {stale!r}"
    if name in SIZE_SOURCE:
        assert SIZE_SOURCE[name] != "EmptyLatentImage" or "Image size" in text, f"{name}: the note must say where " \
                                                                                 "the size is set"
    with Image.open(WORKFLOWS / f"{name}.jpg") as thumb:
        assert thumb.format == "JPEG"
        assert 400 <= thumb.width <= 1600 and 200 <= thumb.height <= 1200, thumb.size
        thumb.load()


def test_no_workflow_batches_images_with_the_deprecated_image_batch():
    """Understand takes every image on its own socket (Autogrow): no core ImageBatch (deprecated) in front of it."""
    for name in NAMES:
        assert not nodes_of(load_workflow(name), "ImageBatch"), name
    (understand,) = nodes_of(load_workflow("multi_image_understanding"), "OvisU1Understand")
    linked = [i["name"] for i in understand["inputs"] if i.get("link") is not None]
    assert linked == ["encoder", "images.image0", "images.image1"]
