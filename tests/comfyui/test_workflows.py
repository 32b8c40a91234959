"""The example workflows in ``workflows/`` against the node definitions, inside ComfyUI: UI-format graphs (what
ComfyUI's frontend saves) checked the way the frontend reads them when it loads a graph (tests/test_workflows.py
checks the files themselves; tests/comfyui/test_in_comfyui.py runs every one in a real server).

``widgets_values`` holds one value per widget input (INT, FLOAT, STRING, BOOLEAN, COMBO) in the order of the node's
inputs; a DynamicCombo's value is followed by the widgets of the chosen option (``sampling`` = sample:
``sampling.temperature``, ``sampling.top_p``, ``sampling.seed``), an Autogrow gives sockets only
(``images.image0``, ``images.image1``, ...). An INT with ``control_after_generate`` (by default any input named
``seed``/``noise_seed``) is followed by its control value; an ``image_upload`` COMBO is followed by the upload
widget's value. Links must agree with the node definitions' socket types and with the nodes' own link references. A
widget may be driven by a link (an input entry with ``"widget": {"name": ...}``, as the frontend saves a widget
converted to an input): the link then gives the value and the saved widget value stays as the fallback.

Core ComfyUI nodes are described by hand-written specs (``CORE_NODES``, copied from ComfyUI's nodes.py /
comfy_extras) so that a workflow can use only those.
"""

from __future__ import annotations

import math

import pytest

from tests.pack import COMFYUI_PATH, node_classes
from tests.test_workflows import NAMES, SIZE_SOURCE, load_workflow, nodes_of

if not COMFYUI_PATH:
    pytest.skip("in-ComfyUI tests need COMFYUI_PATH", allow_module_level=True)

MODEL_FOLDER = "Ovis-U1-3B"
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
TITLE_HEIGHT = 30  # LiteGraph draws the title bar above a node's pos


PACK_NODES = node_classes()


class CoreNode:
    """A hand-written description of a core ComfyUI node (the parts of its class a workflow depends on)."""

    def __init__(self, inputs: dict, outputs: tuple = (), output_node: bool = False):
        self.inputs, self.RETURN_TYPES, self.OUTPUT_NODE = inputs, outputs, output_node

    def INPUT_TYPES(self):
        return self.inputs


# Only these core nodes may appear in a workflow. Options that the frontend fills from the server (files in input/)
# are listed with ComfyUI's shipped example image.
CORE_NODES = {
    "LoadImage": CoreNode({"required": {"image": (["example.png"], {"image_upload": True})}}, ("IMAGE", "MASK")),
    "SaveImage": CoreNode({"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}},
                          output_node=True),
    "PreviewImage": CoreNode({"required": {"images": ("IMAGE",)}}, output_node=True),
    "Canny": CoreNode({"required": {
        "image": ("IMAGE",),
        "low_threshold": ("FLOAT", {"default": 0.4, "min": 0.01, "max": 0.99, "step": 0.01}),
        "high_threshold": ("FLOAT", {"default": 0.8, "min": 0.01, "max": 0.99, "step": 0.01}),
    }}, ("IMAGE",)),
    "Note": CoreNode({"required": {"text": ("STRING", {"multiline": True})}}),
    # ComfyUI's own latent, sampling and VAE nodes (inputs as in 0.3.64 and 0.18.1)
    "EmptyLatentImage": CoreNode({"required": {
        "width": ("INT", {"default": 512, "min": 16, "max": 16384, "step": 8}),
        "height": ("INT", {"default": 512, "min": 16, "max": 16384, "step": 8}),
        "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
    }}, ("LATENT",)),
    "CFGGuider": CoreNode({"required": {
        "model": ("MODEL",), "positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
        "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
    }}, ("GUIDER",)),
    "DualCFGGuider": CoreNode({"required": {
        "model": ("MODEL",), "cond1": ("CONDITIONING",), "cond2": ("CONDITIONING",), "negative": ("CONDITIONING",),
        "cfg_conds": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
        "cfg_cond2_negative": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
        "style": (["regular", "nested"],),
    }}, ("GUIDER",)),
    "KSamplerSelect": CoreNode({"required": {"sampler_name": (["euler", "dpmpp_2m", "res_multistep"],)}},
                               ("SAMPLER",)),
    "RandomNoise": CoreNode({"required": {"noise_seed": ("INT", {
        "default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True})}}, ("NOISE",)),
    "SamplerCustomAdvanced": CoreNode({"required": {
        "noise": ("NOISE",), "guider": ("GUIDER",), "sampler": ("SAMPLER",), "sigmas": ("SIGMAS",),
        "latent_image": ("LATENT",),
    }}, ("LATENT", "LATENT")),
    "VAEDecode": CoreNode({"required": {"samples": ("LATENT",), "vae": ("VAE",)}}, ("IMAGE",)),
    "EasyCache": CoreNode({"required": {
        "model": ("MODEL",),
        "reuse_threshold": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 3.0, "step": 0.01}),
        "start_percent": ("FLOAT", {"default": 0.15, "min": 0.0, "max": 1.0, "step": 0.01}),
        "end_percent": ("FLOAT", {"default": 0.95, "min": 0.0, "max": 1.0, "step": 0.01}),
        "verbose": ("BOOLEAN", {"default": False}),
    }}, ("MODEL",)),
}
# COMBOs whose options are files or folders on disk: checked by value below, not against a list.
DISK_COMBOS = {("LoadImage", "image"), ("OvisU1ModelLoader", "model")}

# The official demo's settings (and this pack's choices) that the saved workflows must keep. The image size is set
# once, on the EmptyLatentImage (text-to-image) or by the Edit Context Encoder (edit): no other node has a size.
SIZE = {"width": 1024, "height": 1024}
T2I_SAMPLER = {"steps": 50, "txt_cfg": 5.0, "seed": 42, "seed:control": "fixed", "timestep_shift": "config"}
EDIT_SAMPLER = {"steps": 50, "txt_cfg": 6.0, "img_cfg": 1.5, "seed": 42, "seed:control": "fixed",
                "timestep_shift": "config"}
CORE_SAMPLING = {"KSamplerSelect": {"sampler_name": "euler"},
                 "RandomNoise": {"noise_seed": 42, "noise_seed:control": "fixed"},
                 "OvisU1Scheduler": {"steps": 50, "timestep_shift": "config", "denoise": 1.0}}
EXPECTED_WIDGETS = {
    "text_to_image": {"OvisU1EncodeCondition": {"mode": "text-to-image"}, "EmptyLatentImage": {**SIZE, "batch_size": 1},
                      "OvisU1Sampler": T2I_SAMPLER},
    "image_edit": {"OvisU1EncodeCondition": {"mode": "edit"}, "OvisU1EditContextEncoder": {"seed": 42},
                   "OvisU1Sampler": EDIT_SAMPLER},
    "canny_to_image": {"OvisU1EncodeCondition": {"mode": "edit"}, "OvisU1EditContextEncoder": {"seed": 42},
                       "OvisU1Sampler": EDIT_SAMPLER},
    "image_understanding": {"OvisU1Understand": {"sampling": "greedy"}},
    "multi_image_understanding": {"OvisU1Understand": {"sampling": "greedy"}},
    "native_text_to_image": {
        "OvisU1EncodeCondition": {"mode": "text-to-image"}, "EmptyLatentImage": {**SIZE, "batch_size": 2},
        "CFGGuider": {"cfg": 5.0}, **CORE_SAMPLING,
    },
    "prompt_rewrite_to_image": {
        # a rewrite of 80–150 words needs about 200 tokens; 256 caps an answer that runs on (the note says so)
        "OvisU1Understand": {"sampling": "greedy", "max_new_tokens": 256},
        "OvisU1EncodeCondition": {"mode": "text-to-image"}, "EmptyLatentImage": {**SIZE, "batch_size": 1},
        "OvisU1Sampler": T2I_SAMPLER,
    },
    "native_image_edit": {
        "OvisU1EncodeCondition": {"mode": "edit"}, "OvisU1EditContextEncoder": {"seed": 42},
        "DualCFGGuider": {"cfg_conds": 6.0, "cfg_cond2_negative": 1.5, "style": "regular"}, **CORE_SAMPLING,
    },
}
EVERY_WORKFLOW_WIDGETS = {
    "OvisU1ModelLoader": {"model": MODEL_FOLDER, "dtype": "auto", "attention": "auto", "weight_dtype": "default"},
    "LoadImage": {"image": "example.png", "image:upload": "image"},
}
# (source type, source output slot, target type, target input) links each workflow must have.
T2I_LINKS = [
    ("OvisU1ModelLoader", 0, "OvisU1EncodeCondition", "encoder"),
    ("EmptyLatentImage", 0, "OvisU1EncodeCondition", "latent"),
    ("OvisU1ModelLoader", 1, "OvisU1Refiner", "model"),
    ("OvisU1EncodeCondition", 0, "OvisU1Refiner", "positive"), ("OvisU1EncodeCondition", 2, "OvisU1Refiner", "negative"),
    ("OvisU1ModelLoader", 1, "OvisU1Sampler", "model"),
    ("OvisU1Refiner", 0, "OvisU1Sampler", "positive"), ("OvisU1Refiner", 2, "OvisU1Sampler", "negative"),
    ("EmptyLatentImage", 0, "OvisU1Sampler", "latent"),
    ("OvisU1Sampler", 0, "VAEDecode", "samples"), ("OvisU1ModelLoader", 2, "VAEDecode", "vae"),
    ("VAEDecode", 0, "SaveImage", "images"),
]
EDIT_LINKS = [
    ("OvisU1ModelLoader", 2, "OvisU1EditContextEncoder", "vae"),
    ("OvisU1ModelLoader", 0, "OvisU1EncodeCondition", "encoder"),
    ("OvisU1EditContextEncoder", 0, "OvisU1EncodeCondition", "image"),
    ("OvisU1EditContextEncoder", 1, "OvisU1EncodeCondition", "context"),
]
EDIT_PACK_LINKS = EDIT_LINKS + [
    ("OvisU1ModelLoader", 1, "OvisU1Refiner", "model"),
    ("OvisU1EncodeCondition", 0, "OvisU1Refiner", "positive"), ("OvisU1EncodeCondition", 1, "OvisU1Refiner", "middle"),
    ("OvisU1EncodeCondition", 2, "OvisU1Refiner", "negative"),
    ("OvisU1ModelLoader", 1, "OvisU1Sampler", "model"),
    ("OvisU1Refiner", 0, "OvisU1Sampler", "positive"), ("OvisU1Refiner", 1, "OvisU1Sampler", "middle"),
    ("OvisU1Refiner", 2, "OvisU1Sampler", "negative"),
    ("OvisU1EditContextEncoder", 2, "OvisU1Sampler", "latent"),
    ("OvisU1Sampler", 0, "VAEDecode", "samples"), ("OvisU1ModelLoader", 2, "VAEDecode", "vae"),
    ("VAEDecode", 0, "SaveImage", "images"),
]
EXPECTED_LINKS = {
    "text_to_image": T2I_LINKS,
    "image_edit": [("LoadImage", 0, "OvisU1EditContextEncoder", "image"),
                   ("OvisU1EditContextEncoder", 0, "PreviewImage", "images")] + EDIT_PACK_LINKS,
    "canny_to_image": [("LoadImage", 0, "Canny", "image"), ("Canny", 0, "OvisU1EditContextEncoder", "image"),
                       ("Canny", 0, "PreviewImage", "images")] + EDIT_PACK_LINKS,
    "image_understanding": [("OvisU1ModelLoader", 0, "OvisU1Understand", "encoder"),
                            ("LoadImage", 0, "OvisU1Understand", "images.image0")],
    "native_text_to_image": [
        ("OvisU1ModelLoader", 0, "OvisU1EncodeCondition", "encoder"),
        ("EmptyLatentImage", 0, "OvisU1EncodeCondition", "latent"),
        ("OvisU1ModelLoader", 1, "CFGGuider", "model"), ("OvisU1EncodeCondition", 0, "CFGGuider", "positive"),
        ("OvisU1EncodeCondition", 2, "CFGGuider", "negative"), ("CFGGuider", 0, "SamplerCustomAdvanced", "guider"),
        ("OvisU1ModelLoader", 1, "OvisU1Scheduler", "model"), ("EmptyLatentImage", 0, "OvisU1Scheduler", "latent"),
        ("OvisU1Scheduler", 0, "SamplerCustomAdvanced", "sigmas"),
        ("KSamplerSelect", 0, "SamplerCustomAdvanced", "sampler"), ("RandomNoise", 0, "SamplerCustomAdvanced", "noise"),
        ("EmptyLatentImage", 0, "SamplerCustomAdvanced", "latent_image"),
        ("SamplerCustomAdvanced", 0, "VAEDecode", "samples"), ("OvisU1ModelLoader", 2, "VAEDecode", "vae"),
        ("VAEDecode", 0, "SaveImage", "images"),
    ],
    "native_image_edit": [("LoadImage", 0, "OvisU1EditContextEncoder", "image")] + EDIT_LINKS + [
        ("OvisU1ModelLoader", 1, "OvisU1Scheduler", "model"),
        ("OvisU1EditContextEncoder", 2, "OvisU1Scheduler", "latent"),
        ("OvisU1EditContextEncoder", 2, "SamplerCustomAdvanced", "latent_image"),
        ("OvisU1ModelLoader", 1, "EasyCache", "model"), ("EasyCache", 0, "DualCFGGuider", "model"),
        ("OvisU1EncodeCondition", 0, "DualCFGGuider", "cond1"), ("OvisU1EncodeCondition", 1, "DualCFGGuider", "cond2"),
        ("OvisU1EncodeCondition", 2, "DualCFGGuider", "negative"),
        ("DualCFGGuider", 0, "SamplerCustomAdvanced", "guider"),
        ("OvisU1Scheduler", 0, "SamplerCustomAdvanced", "sigmas"),
        ("KSamplerSelect", 0, "SamplerCustomAdvanced", "sampler"), ("RandomNoise", 0, "SamplerCustomAdvanced", "noise"),
        ("SamplerCustomAdvanced", 0, "VAEDecode", "samples"), ("OvisU1ModelLoader", 2, "VAEDecode", "vae"),
        ("VAEDecode", 0, "SaveImage", "images"),
    ],
    "multi_image_understanding": [
        ("LoadImage", 0, "OvisU1Understand", "images.image0"), ("LoadImage", 0, "OvisU1Understand", "images.image1"),
        ("OvisU1ModelLoader", 0, "OvisU1Understand", "encoder"),
    ],
    "prompt_rewrite_to_image": [("OvisU1ModelLoader", 0, "OvisU1Understand", "encoder"),
                                ("OvisU1Understand", 0, "OvisU1EncodeCondition", "prompt")] + T2I_LINKS,
}
# ------------------------------------------------------------------------------------------------ graph helpers
def node_class(type_: str):
    if type_ in PACK_NODES:
        return PACK_NODES[type_]
    if type_ in CORE_NODES:
        return CORE_NODES[type_]
    raise AssertionError(f"node type {type_!r} is neither one of this pack's nodes nor an allowed core node")


def _split(spec) -> tuple:
    return spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})


def _is_widget(kind, options) -> bool:
    return (isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES) and not options.get("forceInput")


def inputs_of(cls) -> list[tuple[str, object, dict, str]]:
    """(name, kind, options, section) of every input in the order the frontend shows them (a V3 node's schema
    order; a core node's INPUT_TYPES order: required, then optional); a combo's kind is its list of choices."""
    spec = cls.INPUT_TYPES()
    sections = {name: section for section in ("required", "optional") for name in spec.get(section, {})}
    order = [i.id for i in cls.GET_SCHEMA().inputs] if hasattr(cls, "GET_SCHEMA") else list(sections)
    inputs = []
    for name in order:
        kind, options = _split(spec[sections[name]][name])
        inputs.append((name, options["options"] if kind == "COMBO" else kind, options, sections[name]))
    return inputs


def layout(cls, values: list | None = None) -> tuple[list[tuple[str, object, dict]], dict[str, tuple[str, bool]]]:
    """The node's widgets in the order of ``widgets_values`` (with the frontend's extra widgets: ``<name>:control``
    after a seed-like INT, ``<name>:upload`` after an image-upload COMBO) and its sockets (API name → (type,
    required)). A DynamicCombo brings the inputs of the option that ``values`` (the node's widgets_values) chose,
    its first option without them, as ``<name>.<input>``; an Autogrow its sockets ``<name>.<prefix><i>``."""
    slots, sockets = [], {}

    def add(name, kind, options, required):
        if not _is_widget(kind, options):
            sockets[name] = (kind, required)
            return
        slots.append((name, kind, options))
        if kind == "INT" and options.get("control_after_generate", name in ("seed", "noise_seed")):
            slots.append((f"{name}:control", "CONTROL", {}))
        if options.get("image_upload"):
            slots.append((f"{name}:upload", "UPLOAD", {}))

    for name, kind, options, section in inputs_of(cls):
        if kind == "COMFY_AUTOGROW_V3":
            template = options["template"]
            ((sub_kind, _),) = [_split(v) for inputs in template["input"].values() for v in inputs.values()]
            for i in range(template["max"]):
                sockets[f"{name}.{template['prefix']}{i}"] = (sub_kind, i < template["min"])
        elif kind == "COMFY_DYNAMICCOMBO_V3":
            keys = [option["key"] for option in options["options"]]
            chosen = values[len(slots)] if values is not None and len(values) > len(slots) else keys[0]
            add(name, keys, options, section == "required")
            for option in (o for o in options["options"] if o["key"] == chosen):
                for sub_section, inputs in option["inputs"].items():
                    for sub, spec in inputs.items():
                        sub_kind, sub_options = _split(spec)
                        sub_kind = sub_options["options"] if sub_kind == "COMBO" else sub_kind
                        add(f"{name}.{sub}", sub_kind, sub_options, sub_section == "required")
        else:
            add(name, kind, options, section == "required")
    return slots, sockets


def widget_slots(cls, values: list | None = None) -> list[tuple[str, object, dict]]:
    return layout(cls, values)[0]


def socket_types(cls, values: list | None = None) -> dict[str, tuple[str, bool]]:
    """name → (type, required) of the inputs that are sockets (links), not widgets."""
    return layout(cls, values)[1]


def input_type(cls, name: str, values: list | None = None) -> str | None:
    """The type a link into input ``name`` must carry: a socket's type, or a linkable widget's (INT, FLOAT, STRING,
    BOOLEAN; a COMBO is 'COMBO'); None when the node has no such input."""
    slots, sockets = layout(cls, values)
    if name in sockets:
        return sockets[name][0]
    for widget, kind, _ in slots:
        if widget == name:
            return "COMBO" if isinstance(kind, (list, tuple)) else kind
    return None


def widget_values(node: dict) -> dict[str, object]:
    """The node's widgets_values by widget name (the lengths are checked by the validation)."""
    values = node.get("widgets_values") or []
    return dict(zip((name for name, _, _ in widget_slots(node_class(node["type"]), values)), values))


def widget_kwargs(node: dict) -> dict:
    """The widget values of the API prompt, by API name (without the frontend-only control and upload widgets)."""
    return {name: value for name, value in widget_values(node).items() if ":" not in name}


# ------------------------------------------------------------------------------------------------- validation
def check_widget_value(where: str, kind, options: dict, value) -> None:
    if kind == "CONTROL":
        assert value in CONTROL_VALUES, f"{where}: control_after_generate {value!r} not in {CONTROL_VALUES}"
    elif kind == "UPLOAD":
        assert value == "image", f"{where}: upload widget value {value!r}, the frontend saves 'image'"
    elif isinstance(kind, (list, tuple)):
        assert value in kind, f"{where}: {value!r} is not one of {list(kind)}"
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r} is not an INT"
        assert options.get("min", -math.inf) <= value <= options.get("max", math.inf), f"{where}: {value} out of range"
        if "step" in options:
            assert value % options["step"] == 0, f"{where}: {value} is not a multiple of {options['step']}"
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r} is not a FLOAT"
        assert options.get("min", -math.inf) <= value <= options.get("max", math.inf), f"{where}: {value} out of range"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}: {value!r} is not a STRING"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {value!r} is not a BOOLEAN"


def validate(graph: dict) -> None:
    """Everything the frontend and ComfyUI's prompt validation rely on."""
    assert graph.get("version") == 0.4 and graph.get("revision") == 0
    assert isinstance(graph.get("id"), str) and len(graph["id"]) == 36
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert len(nodes) == len(graph["nodes"]), "duplicate node ids"
    links = {link[0]: link for link in graph["links"]}
    assert len(links) == len(graph["links"]), "duplicate link ids"
    assert graph["last_node_id"] >= max(nodes) and graph["last_link_id"] >= max(links, default=0)

    for node in graph["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        cls = node_class(node["type"])
        assert node.get("mode", 0) == 0, f"{where}: muted or bypassed"
        assert len(node["pos"]) == 2 and len(node["size"]) == 2
        if node["type"] != "Note":
            assert node["properties"].get("Node name for S&R") == node["type"], where

        # widgets: count, order, types, ranges
        values = node.get("widgets_values", [])
        slots, sockets = layout(cls, values)
        assert isinstance(values, list), f"{where}: widgets_values must be a list"
        assert len(values) == len(slots), (
            f"{where}: {len(values)} widgets_values for the widgets {[s[0] for s in slots]}")
        for (name, kind, options), value in zip(slots, values):
            if (node["type"], name) not in DISK_COMBOS:
                check_widget_value(f"{where}.{name}", kind, options, value)
        for name in ("prompt", "question", "text"):
            if name in widget_values(node):
                assert widget_values(node)[name].strip(), f"{where}: {name} is empty"

        # sockets: names, types, link references
        names = [i["name"] for i in node["inputs"]]
        assert len(names) == len(set(names)), f"{where}: duplicate inputs"
        for slot, inp in enumerate(node["inputs"]):
            if "widget" in inp:  # a widget listed as an input (the frontend does so when it can take a link)
                assert inp["widget"] == {"name": inp["name"]}, f"{where}: widget input {inp}"
                assert inp["name"] not in sockets and input_type(cls, inp["name"], values) == inp["type"], (
                    f"{where}: {inp['name']!r} is not a {inp['type']} widget of the node")
            else:
                assert inp["name"] in sockets, f"{where}: unknown input {inp['name']!r}"
                assert inp["type"] == sockets[inp["name"]][0], f"{where}.{inp['name']}: type {inp['type']}"
            if inp["link"] is not None:
                link = links[inp["link"]]
                assert (link[3], link[4]) == (node["id"], slot), f"{where}.{inp['name']}: link {link} points elsewhere"
        missing = [n for n, (_, required) in sockets.items() if required and not any(
            i["name"] == n and i["link"] is not None for i in node["inputs"])]
        assert not missing, f"{where}: required inputs {missing} are not connected"
        returns = tuple(cls.RETURN_TYPES)
        assert [o["type"] for o in node["outputs"]] == list(returns), f"{where}: outputs {node['outputs']}"
        for slot, out in enumerate(node["outputs"]):
            for link_id in out.get("links") or []:
                link = links[link_id]
                assert (link[1], link[2]) == (node["id"], slot), f"{where}: output link {link} points elsewhere"

    for link_id, src, src_slot, dst, dst_slot, type_ in graph["links"]:
        where = f"link {link_id}"
        assert src in nodes and dst in nodes, f"{where}: unknown node"
        out, inp = nodes[src]["outputs"][src_slot], nodes[dst]["inputs"][dst_slot]
        assert node_class(nodes[src]["type"]).RETURN_TYPES[src_slot] == out["type"] == type_, f"{where}: {type_}"
        dst_values = nodes[dst].get("widgets_values")
        assert input_type(node_class(nodes[dst]["type"]), inp["name"], dst_values) == inp["type"] == type_, where
        assert link_id in (out.get("links") or []) and inp["link"] == link_id, f"{where}: not referenced by its nodes"

    # the frontend's execution order: every link goes forward
    order = {n["id"]: n["order"] for n in graph["nodes"]}
    assert sorted(order.values()) == list(range(len(order)))
    for link in graph["links"]:
        assert order[link[1]] < order[link[3]], f"link {link}: order"


def check_layout(graph: dict) -> None:
    """No two nodes (title bar included) overlap, so the graph reads left to right as saved."""
    boxes = [(n["id"], n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in graph["nodes"]]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            overlap = a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]
            assert not overlap, f"nodes {a[0]} and {b[0]} overlap"
    # The frontend draws a node at its saved size: one that is too small hides its last widgets (a 110 px loader
    # hid weight_dtype). LiteGraph gives a slot row 20 px and a widget about 24 px; ask for at least 20 and 22.
    for node in graph["nodes"]:
        if node["type"] not in PACK_NODES:
            continue
        cls = node_class(node["type"])
        slots = widget_slots(cls, node.get("widgets_values"))
        shown = [i for i in node["inputs"] if "widget" not in i]  # an Autogrow shows its connected sockets + 1
        rows = max(len(shown) + any("." in i["name"] for i in shown), len(cls.RETURN_TYPES))
        needed = 20 * rows + 22 * len(slots)
        assert node["size"][1] >= needed, (f"node {node['id']} ({node['type']}) is {node['size'][1]} px high; its "
                                           f"{rows} slot rows and {len(slots)} widgets need {needed}")


@pytest.mark.parametrize("name", NAMES)
def test_workflow_matches_the_node_definitions(name):
    graph = load_workflow(name)
    validate(graph)
    check_layout(graph)


@pytest.mark.parametrize("name", NAMES)
def test_workflow_keeps_the_official_defaults(name):
    graph = load_workflow(name)
    assert len(nodes_of(graph, "OvisU1ModelLoader")) == 1
    expected = {**EVERY_WORKFLOW_WIDGETS, **EXPECTED_WIDGETS[name]}
    for type_, want in expected.items():
        nodes = nodes_of(graph, type_)
        assert nodes or type_ in EVERY_WORKFLOW_WIDGETS, f"{name}: no {type_} node"
        for node in nodes:
            got = widget_values(node)
            for key, value in want.items():
                assert got[key] == value and type(got[key]) is type(value), (
                    f"{name}: {type_}.{key} is {got[key]!r}, expected {value!r}")


def _source(graph: dict, node: dict, name: str) -> tuple[dict, int] | None:
    """The node and output slot linked into input ``name`` of ``node``; None when it is not connected."""
    by_id = {n["id"]: n for n in graph["nodes"]}
    links = {link[0]: link for link in graph["links"]}
    for inp in node["inputs"]:
        if inp["name"] == name and inp["link"] is not None:
            _, src, slot, *_ = links[inp["link"]]
            return by_id[src], slot
    return None


@pytest.mark.parametrize("name", NAMES)
def test_workflow_is_wired_as_described(name):
    graph = load_workflow(name)
    by_id = {n["id"]: n for n in graph["nodes"]}
    present = {(by_id[s]["type"], ss, by_id[d]["type"], by_id[d]["inputs"][ds]["name"])
               for _, s, ss, d, ds, _ in graph["links"]}
    missing = [link for link in EXPECTED_LINKS[name] if link not in present]
    assert not missing, f"{name}: missing links {missing}"
    # the encoder and the VAE come straight from the one loader; a MODEL from it or through MODEL → MODEL patches
    (loader,) = nodes_of(graph, "OvisU1ModelLoader")
    for node in graph["nodes"]:
        for inp in node["inputs"]:
            if inp["type"] not in ("OVIS_U1_ENCODER", "MODEL", "VAE") or inp["link"] is None:
                continue
            source, _ = _source(graph, node, inp["name"])
            while inp["type"] == "MODEL" and source is not loader:
                assert node_class(source["type"]).RETURN_TYPES == ("MODEL",), f"{name}: {source['type']}"
                source, _ = _source(graph, source, "model")
            assert source is loader, f"{name}: {node['type']}.{inp['name']} does not come from the loader"

    # the size is set once: no pack node has a size widget, and every latent comes from the one node that sets it
    for node in graph["nodes"]:
        if node["type"] in PACK_NODES:
            assert not {"width", "height"} & set(widget_values(node)), f"{name}: {node['type']} has a size widget"
    if name in SIZE_SOURCE:
        (sizer,) = nodes_of(graph, SIZE_SOURCE[name])
        latents = [(node, inp["name"]) for node in graph["nodes"] for inp in node["inputs"]
                   if inp["type"] == "LATENT" and inp["link"] is not None and node["type"] != "VAEDecode"
                   and inp["name"] != "context"]
        assert latents, f"{name}: nothing samples a latent"
        for node, inp in latents:
            source = _source(graph, node, inp)
            want = 2 if SIZE_SOURCE[name] == "OvisU1EditContextEncoder" else 0  # the Edit Context Encoder's latent
            assert source and source[0] is sizer and source[1] == want, (
                f"{name}: {node['type']}.{inp} does not take the latent of the {SIZE_SOURCE[name]}")
    edit = name in SIZE_SOURCE and SIZE_SOURCE[name] == "OvisU1EditContextEncoder"
    for node in nodes_of(graph, "OvisU1EncodeCondition"):
        linked = {i["name"] for i in node["inputs"] if i["link"] is not None}
        assert ({"image", "context"} <= linked) == edit and ("latent" in linked) != edit, f"{name}: {linked}"
    for node in nodes_of(graph, "OvisU1Sampler") + nodes_of(graph, "OvisU1Refiner"):
        assert ("middle" in {i["name"] for i in node["inputs"] if i["link"] is not None}) == edit, node["type"]

    if name == "prompt_rewrite_to_image":  # a text-only rewrite, told how by its instruction, feeds the prompt
        (understand,) = nodes_of(graph, "OvisU1Understand")
        assert not any(i["link"] for i in understand["inputs"] if i["name"] == "image")
        assert widget_values(understand)["instruction"].strip(), "the rewriting instruction is empty"
        condition = widget_values(nodes_of(graph, "OvisU1EncodeCondition")[0])
        # without the link, Encode Condition draws the short prompt as written (the note offers that comparison)
        assert condition["prompt"] == widget_values(understand)["question"]


def test_widget_slots_follow_the_frontend_conventions():
    """The seed of the sampler carries a control value; the seeds that opt out (control_after_generate False) and
    every other INT do not; LoadImage has its upload widget."""
    sampler = [s[0] for s in widget_slots(PACK_NODES["OvisU1Sampler"])]
    assert sampler == ["seed", "seed:control", "steps", "txt_cfg", "img_cfg", "timestep_shift"]
    assert [s[0] for s in widget_slots(PACK_NODES["OvisU1Scheduler"])] == ["steps", "timestep_shift", "denoise"]
    assert [s[0] for s in widget_slots(PACK_NODES["OvisU1EditContextEncoder"])] == ["seed"]
    understand = PACK_NODES["OvisU1Understand"]
    assert [s[0] for s in widget_slots(understand)] == ["question", "max_new_tokens", "sampling", "instruction"]
    sample = ["question", "max_new_tokens", "sampling", "sampling.temperature", "sampling.top_p", "sampling.seed",
              "instruction"]  # the option's widgets right after its combo; the seed without a control value
    assert [s[0] for s in widget_slots(understand, ["q", 8, "sample", 1.0, 1.0, 0, ""])] == sample
    assert [s[0] for s in widget_slots(CORE_NODES["LoadImage"])] == ["image", "image:upload"]


# ------------------------------------------------------------------------------------------------ API prompts
# CI runs on a small CPU: samplers run 2 steps instead of the saved 50 and an answer stops after 8 tokens (every other
# widget is executed as saved; the validation above checks the saved defaults). tests/comfyui/prompts.py applies these.
CI_OVERRIDES = {"OvisU1Sampler": {"steps": 2}, "OvisU1Scheduler": {"steps": 2},
                "OvisU1Understand": {"max_new_tokens": 8}}


def test_api_inputs_map_widgets_like_the_frontend():
    """The saved widgets become the API inputs ComfyUI's frontend sends (the control value is not one; a
    DynamicCombo's inputs under their dotted names)."""
    graph = load_workflow("text_to_image")
    (sampler,) = nodes_of(graph, "OvisU1Sampler")
    assert widget_kwargs(sampler) == {"seed": 42, "steps": 50, "txt_cfg": 5.0, "img_cfg": 1.5,
                                      "timestep_shift": "config"}
    (latent,) = nodes_of(graph, "EmptyLatentImage")
    assert widget_kwargs(latent) == {"width": 1024, "height": 1024, "batch_size": 1}
    (understand,) = nodes_of(load_workflow("image_understanding"), "OvisU1Understand")
    assert widget_kwargs({**understand, "widgets_values": ["q", 8, "sample", 0.7, 0.9, 3, ""]}) == {
        "question": "q", "max_new_tokens": 8, "sampling": "sample", "sampling.temperature": 0.7,
        "sampling.top_p": 0.9, "sampling.seed": 3, "instruction": ""}
