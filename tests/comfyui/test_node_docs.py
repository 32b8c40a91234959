"""The node help pages (nodes/web/docs/<node>.md): one per node, where ComfyUI's frontend looks for a custom node's
help (``/extensions/<pack>/docs/<node>.md``, served from WEB_DIRECTORY; the frontend's NodeHelpService tries
``docs/<node>/<locale>.md`` first and falls back to this file), and saying the same as the node definitions: every
input in the schema's order under its API name (a DynamicCombo's inputs as ``sampling.temperature``, an Autogrow's
first socket as ``images.image0``) with its default and range, every output by name. The server serves the pages
for the V3 nodes: tests/comfyui/test_in_comfyui.py fetches one."""

from __future__ import annotations

import re

import pytest

from tests.pack import COMFYUI_PATH, ROOT, import_pack, node_classes

if not COMFYUI_PATH:
    pytest.skip("in-ComfyUI tests need COMFYUI_PATH", allow_module_level=True)

PACK = import_pack()
NODES = node_classes(PACK)
DOCS = ROOT / PACK.WEB_DIRECTORY / "docs"


def input_rows(cls) -> list[tuple[str, object, dict, str]]:
    """(API name, kind, options, section) of every input in the schema's order: a combo's kind is its choices; a
    DynamicCombo's row (its keys), then each option's inputs as ``<name>.<input>``; an Autogrow as its first socket."""
    spec = cls.INPUT_TYPES()
    sections = {name: section for section in ("required", "optional") for name in spec.get(section, {})}
    rows = []

    def add(name, kind, options, section):
        rows.append((name, options["options"] if kind == "COMBO" else kind, options, section))

    for inp in cls.GET_SCHEMA().inputs:
        kind, options = spec[sections[inp.id]][inp.id]
        if kind == "COMFY_DYNAMICCOMBO_V3":
            rows.append((inp.id, [o["key"] for o in options["options"]], options, sections[inp.id]))
            for option in options["options"]:
                for section, inputs in option["inputs"].items():
                    for name, (sub_kind, sub_options) in inputs.items():
                        add(f"{inp.id}.{name}", sub_kind, sub_options, section)
        elif kind == "COMFY_AUTOGROW_V3":
            template = options["template"]
            ((sub_kind, sub_options),) = template["input"]["required"].values()
            add(f"{inp.id}.{template['prefix']}0", sub_kind, sub_options, "optional" if not template["min"] else "required")
        else:
            add(inp.id, kind, options, sections[inp.id])
    return rows


def table(text: str, heading: str) -> list[list[str]]:
    """The rows (cells, without header and separator) of the first table under ``## heading``. Inputs are listed as
    | input | what it does | type | default |: the description second, so it shows first in the frontend's narrow
    side panel (as ComfyUI's own node docs do)."""
    section = re.search(rf"^## {heading}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section, f"no '## {heading}' section"
    rows = [line for line in section.group(1).splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def name_of(cell: str) -> str:
    assert cell.startswith("`") and cell.endswith("`"), cell
    return cell.strip("`")


def shown_default(kind, options: dict) -> str | None:
    """How a default is written in the Default column, or None where the page says it otherwise."""
    if "default" not in options:
        return None
    value = options["default"]
    if kind == "BOOLEAN":
        return f"`{options['label_on'] if value else options['label_off']}`"
    if kind == "STRING" and value == "":
        return "empty"
    return f"`{value}`"


def test_every_node_has_a_page_and_no_page_is_left_over():
    assert PACK.WEB_DIRECTORY == "./nodes/web"
    assert sorted(p.stem for p in DOCS.glob("*.md")) == sorted(NODES)


@pytest.mark.parametrize("name", sorted(NODES))
def test_page_matches_the_node_definition(name):
    text = (DOCS / f"{name}.md").read_text(encoding="utf-8")
    cls = NODES[name]
    assert text.startswith(f"# {cls.GET_SCHEMA().display_name}\n")
    for heading in ("Defaults", "Example"):
        assert re.search(rf"^## {heading}", text, re.M), f"{name}: no {heading} section"

    inputs = input_rows(cls)
    rows = table(text, "Inputs")
    assert [name_of(r[0]) for r in rows] == [n for n, *_ in inputs], f"{name}: inputs differ or are out of order"
    for (input_name, kind, options, section), (_, _, type_cell, default_cell) in zip(inputs, rows):
        where = f"{name}.{input_name}"
        widget = isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN")
        if not widget:  # a socket: its type, and whether it must be connected (a widget always has a value)
            assert ("optional" in type_cell) == (section == "optional"), f"{where}: optional is '{type_cell}'"
            shown = re.findall(r"[A-Z][A-Z0-9_]+", type_cell)
            assert kind in shown, f"{where}: the page says '{type_cell}', the node {kind}"
        want = shown_default(kind, options)
        if want is not None:
            assert default_cell == want, f"{where}: the page says {default_cell}, the node {want}"
        if isinstance(kind, list):
            shown = [c.strip() for c in type_cell.split(",")[0].split("/")]
            assert kind == shown or type_cell == "list", f"{where}: choices {shown}, the node {kind}"
        if kind in ("INT", "FLOAT") and "min" in options and options.get("max", 0) < 2**32:
            found = re.search(r"([\d.]+)–([\d.]+)", type_cell)
            assert found and (float(found[1]), float(found[2])) == (options["min"], options["max"]), (
                f"{where}: range '{type_cell}', the node {options['min']}–{options['max']}")

    outputs = table(text, "Outputs")
    names = cls.RETURN_NAMES
    assert [name_of(r[0]) for r in outputs] == list(names), f"{name}: outputs"
    assert [r[1] for r in outputs] == list(cls.RETURN_TYPES), f"{name}: output types"


GONE = ("OVIS_U1_MODEL", "OVIS_U1_CONDITION", "OVIS_U1_REFINED", "OVIS_U1_CONTEXT", "OvisU1VAEDecode",
        "OvisU1VAEEncode", "Ovis-U1 VAE Decode", "Ovis-U1 VAE Encode")


@pytest.mark.parametrize("name", sorted(NODES))
def test_page_names_nothing_the_pack_no_longer_has(name):
    """The socket types and nodes of the old API (before one generation path in ComfyUI) are gone."""
    text = (DOCS / f"{name}.md").read_text(encoding="utf-8")
    left = [gone for gone in GONE if gone in text]
    assert not left, f"{name}.md still names {left}"
