"""API-format prompts (what the frontend POSTs to /prompt) from the UI-format workflows in ``workflows/``, with the
widget mapping of tests/test_workflows.py (checked there against the node definitions), and the golden cases'
settings."""

from __future__ import annotations

from tests.golden import case_params
from tests.test_workflows import CI_OVERRIDES, Executor, load_workflow, topological

# The golden t2i case (prompt "a cute cat", 64×64, 3 steps, txt_cfg 5, seed 42) in fp32, by widget name: applied to
# every node that has an input of that name.
GOLDEN_T2I = {**{k: case_params("t2i")[k] for k in ("prompt", "width", "height", "steps", "txt_cfg", "seed")},
              "dtype": "fp32"}


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
        inputs = Executor.widget_kwargs(node)
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


def workflow_prompt(name: str, images: list[str] = (), by_name: dict | None = None) -> dict:
    """A workflow of ``workflows/`` as CI runs it: few sampling steps and tokens, everything else as saved."""
    return api_prompt(load_workflow(name), images, CI_OVERRIDES, by_name)


def nodes_of(prompt: dict, class_type: str) -> list[str]:
    return [node_id for node_id, node in prompt.items() if node["class_type"] == class_type]
