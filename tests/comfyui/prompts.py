"""API-format prompts (what the frontend POSTs to /prompt) from the UI-format workflows in ``workflows/``, with the
widget mapping of tests/comfyui/test_workflows.py (checked there against the node definitions, and against the
prompt the real frontend builds by tests/comfyui/test_in_comfyui.py's API-name check), and the golden cases'
settings."""

from __future__ import annotations

from tests.golden import case_params
from tests.comfyui.test_workflows import CI_OVERRIDES, widget_kwargs
from tests.test_workflows import load_workflow, topological

# The golden t2i case (prompt "a cute cat", 64×64, 3 steps, txt_cfg 5, seed 42) in fp32, by widget name: applied to
# every node that has an input of that name (width/height: the EmptyLatentImage that sets the size for Encode
# Condition and the sampler; steps, txt_cfg, seed: the MMDiT Sampler).
GOLDEN_T2I = {**{k: case_params("t2i")[k] for k in ("prompt", "width", "height", "steps", "txt_cfg", "seed")},
              "dtype": "fp32"}
# The golden edit case (the tiny_a edit input, "add a hat to this cat.", 3 steps, txt_cfg 6, img_cfg 1.5, seed 42)
# in fp32; the Edit Context Encoder draws its posterior sample with the case's own seed, by node type.
GOLDEN_EDIT = {**{k: case_params("edit")[k] for k in ("prompt", "steps", "txt_cfg", "img_cfg")}, "dtype": "fp32"}
GOLDEN_EDIT_SEEDS = {"OvisU1Sampler": {"seed": case_params("edit")["seed"]},
                     "OvisU1EditContextEncoder": {"seed": case_params("edit")["vae_sample_seed"]}}


def api_prompt(graph: dict, images: list[str] = (), overrides: dict | None = None,
               by_name: dict | None = None) -> dict:
    """``graph`` as the frontend converts it: one entry per executable node (notes dropped) with its widget values
    (without the frontend-only control/upload widgets) and its links as [source id, output slot].
    ``images`` go to the LoadImage nodes in execution order; ``overrides`` by node type, then ``by_name`` (any node
    with an input of that name) replace widget values."""
    links = {link[0]: link for link in graph["links"]}
    images = list(images)
    prompt = {}
    for node in topological(graph):
        inputs = widget_kwargs(node)
        inputs.update((overrides or {}).get(node["type"], {}))
        inputs.update({k: v for k, v in (by_name or {}).items() if k in inputs})
        if node["type"] == "LoadImage" and images:
            inputs["image"] = images.pop(0)
        for inp in node["inputs"]:
            if inp.get("link") is not None:
                _, source, slot, *_ = links[inp["link"]]
                inputs[inp["name"]] = [str(source), slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title", node["type"])}}
    return prompt


def workflow_prompt(name: str, images: list[str] = (), by_name: dict | None = None,
                    overrides: dict | None = None) -> dict:
    """A workflow of ``workflows/`` as CI runs it: few sampling steps and tokens, everything else as saved;
    ``overrides`` by node type and ``by_name`` replace more widget values."""
    merged = {t: {**CI_OVERRIDES.get(t, {}), **(overrides or {}).get(t, {})} for t in {*CI_OVERRIDES, *(overrides or {})}}
    return api_prompt(load_workflow(name), images, merged, by_name)


def nodes_of(prompt: dict, class_type: str) -> list[str]:
    return [node_id for node_id, node in prompt.items() if node["class_type"] == class_type]
