"""The Model Loader loads only what ComfyUI lists, tried as a client of ComfyUI's API would (``POST /prompt`` to the
real server of conftest.py): a name that is not one entry of an ``ovis_u1`` model folder — an absolute path, a ``..``
chain, an embedded ``..``, a path through a symbolic link in the model folder — is refused when ComfyUI validates the
prompt, whatever it points at (here a valid copy of the checkpoint outside the model folders), so nothing of it is
read; the refusal names no folder outside the model folders. Every listed model loads, a link that is itself an entry
of the model folder too (ComfyUI's own loaders follow such links: see ``ovis_u1.checkpoint.model_dir_named``).

Run: COMFYUI_PATH=~/.cache/comfy-0.33.0/ComfyUI ~/.cache/comfy-0.33.0/venv/bin/python -m pytest tests/comfyui
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request

import pytest

from tests.golden import CHECKPOINT, requires_golden

pytestmark = requires_golden

LOADER = "1"


def loader_prompt(model: str) -> dict:
    """The loader feeding a core VAEDecode of an empty latent: the smallest prompt that runs it."""
    return {
        LOADER: {"class_type": "OvisU1ModelLoader", "inputs": {"model": model, "dtype": "fp32", "attention": "auto"}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": [LOADER, 2]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }


def post_prompt(comfy, prompt: dict) -> tuple[int, dict]:
    """What ComfyUI answers to ``POST /prompt``: (HTTP status, JSON body); 400 carries the validation errors."""
    request = urllib.request.Request(comfy.url + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def places(comfy):
    """Outside the model folder: ``outside/ckpt``, a valid copy of the checkpoint. In it: ``linked`` (a link to that
    copy: an entry of the model folder, listed) and ``shared`` (a link to ``outside``, a folder that is no
    checkpoint: ``shared/ckpt`` is a path through it)."""
    root = comfy.base / "models" / "ovis_u1"
    outside = comfy.base / "outside"
    shutil.copytree(CHECKPOINT, outside / "ckpt")
    (root / "linked").symlink_to(outside / "ckpt", target_is_directory=True)
    (root / "shared").symlink_to(outside, target_is_directory=True)
    try:
        yield root, outside
    finally:
        (root / "linked").unlink()
        (root / "shared").unlink()
        shutil.rmtree(outside)


def refused_names(outside) -> dict[str, str]:
    return {
        "absolute path": str(outside / "ckpt"),
        "a .. chain": "../../outside/ckpt",
        "an embedded ..": "linked/../../outside/ckpt",
        "the issue's embedded ..": "Ovis-U1-3B/../../x",
        "a path through a link in the model folder": "shared/ckpt",
    }


@pytest.mark.parametrize("case", ["absolute path", "a .. chain", "an embedded ..", "the issue's embedded ..",
                                  "a path through a link in the model folder"])
def test_a_name_outside_the_model_folders_is_refused_at_validation(comfy, places, case):
    root, outside = places
    name = refused_names(outside)[case]
    history_before = len(comfy.get("/history"))
    status, answer = post_prompt(comfy, loader_prompt(name))
    assert status == 400 and LOADER in answer.get("node_errors", {}), f"{case}: not refused: {status} {answer}"
    (error,) = answer["node_errors"][LOADER]["errors"]
    message = json.dumps(error)
    assert "is not an Ovis-U1 checkpoint folder" in message, message
    # nothing ran, so nothing of the folder was read
    assert len(comfy.get("/history")) == history_before and not comfy.get("/queue")["queue_running"]
    # the refusal names no folder outside the model folders: the same words for a name that points nowhere
    elsewhere = name.replace("outside", "nowhere").replace("ckpt", "nothing")
    _, other = post_prompt(comfy, loader_prompt(elsewhere))
    (other_error,) = other["node_errors"][LOADER]["errors"]

    def without(text: str, n: str) -> str:
        return text.replace(json.dumps(n)[1:-1], "NAME")

    assert without(json.dumps(other_error), elsewhere) == without(message, name)
    assert str(outside) not in without(message, name)


@pytest.mark.parametrize("model", ["Ovis-U1-3B", "linked"])
def test_every_listed_model_loads(comfy, places, model):
    info = comfy.get("/object_info/OvisU1ModelLoader")["OvisU1ModelLoader"]["input"]["required"]["model"]
    listed = info[0] if isinstance(info[0], list) else info[1]["options"]
    assert model in listed, listed
    run = comfy.run(loader_prompt(model))
    assert run.status == "success", run.explain()
