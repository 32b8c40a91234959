"""The CONDITIONING layout of Encode Condition (``nodes/comfy_bridge/conditioning.py``; the pack imports only inside
ComfyUI): which official
classifier-free-guidance branch each output carries, where an edit's source latent goes, the pack's mark, and the
checks the MODEL and the MMDiT Sampler make with it — a foreign CONDITIONING is named by its likely origin, swapped
wires are named, an edit without its image-only branch is refused. The module is the pack's own (imported as ComfyUI
imports the pack), so its errors are the pack's copy of ``OvisU1InputError``."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.pack import COMFYUI_PATH, PACK_NAME, import_pack

if not COMFYUI_PATH:
    pytest.skip("in-ComfyUI tests need COMFYUI_PATH", allow_module_level=True)

PACK = import_pack()
conditioning = sys.modules[f"{PACK_NAME}.nodes.comfy_bridge.conditioning"]
library = sys.modules[f"{PACK_NAME}.ovis_u1"]
InputError = library.OvisU1InputError

BRANCHES = {"t2i": ["cond", "no_both"], "edit": ["cond", "no_txt", "no_both"]}


def condition(mode: str, width: int = 64, height: int = 64):
    """A Condition whose branch states are told apart by their values (branch i is filled with i)."""
    states = {b: torch.full((1, 3 + i, 8), float(i)) for i, b in enumerate(BRANCHES[mode])}
    return library.Condition(mode, width, height, states)


def named(outputs: tuple) -> dict:
    """Encode Condition's outputs by name."""
    return dict(zip(("positive", "middle", "negative"), outputs))


def outputs(mode: str, reference=None) -> dict:
    return named(conditioning.conditioning_outputs(condition(mode), reference))


def raises(fn, *texts: str) -> str:
    with pytest.raises(InputError) as info:
        fn()
    for text in texts:
        assert text in str(info.value), f"{text!r} not in {str(info.value)!r}"
    return str(info.value)


# --------------------------------------------------------------------------------------------------- layout
def test_text_to_image_layout():
    c = condition("t2i")
    out = named(conditioning.conditioning_outputs(c))
    assert set(out) == {"positive", "middle", "negative"}
    for output, branch in (("positive", "cond"), ("middle", "no_both"), ("negative", "no_both")):
        (entry,) = out[output]
        states, options = entry
        assert states is c.branches[branch], output
        assert options == {"ovis_u1": {"mode": "t2i", "branch": branch, "refined": False}}, output
    # a reference latent given for text-to-image is not attached: nothing in t2i sees a source image
    with_latent = conditioning.conditioning_outputs(c, torch.zeros(1, 4, 8, 8))
    assert all("reference_latents" not in entries[0][1] for entries in with_latent)


def test_an_edit_attaches_the_source_latent_to_cond_and_no_txt_only():
    c, latent = condition("edit", 96, 64), torch.randn(1, 4, 8, 12)
    out = named(conditioning.conditioning_outputs(c, latent))
    for output, branch in (("positive", "cond"), ("middle", "no_txt"), ("negative", "no_both")):
        (entry,) = out[output]
        assert entry[0] is c.branches[branch]
        assert entry[1]["ovis_u1"] == {"mode": "edit", "branch": branch, "refined": False}
    assert out["positive"][0][1]["reference_latents"] == [latent]
    assert out["positive"][0][1]["reference_latents"][0] is latent
    assert out["middle"][0][1]["reference_latents"][0] is latent
    assert "reference_latents" not in out["negative"][0][1]  # the unconditional branch sees no image
    without = conditioning.conditioning_outputs(c)
    assert all("reference_latents" not in entries[0][1] for entries in without)


def test_the_layout_is_the_official_branch_table():
    """Every branch the library encodes for a mode is on some output, and the outputs name only those branches."""
    assert set(conditioning.OUTPUT_BRANCHES) == set(BRANCHES)
    for mode, table in conditioning.OUTPUT_BRANCHES.items():
        assert set(table.values()) == set(library.prompts.BRANCHES[mode]) == set(BRANCHES[mode])
    assert conditioning.CONTEXT_BRANCHES == {"cond", "no_txt"}
    assert conditioning.MARK == "ovis_u1"


# ------------------------------------------------------------------------------------------ foreign entries
def test_a_t5_conditioning_is_refused_with_its_origin():
    foreign = [torch.zeros(1, 77, 4096), {"pooled_output": torch.zeros(1, 768)}]
    message = raises(lambda: conditioning.mark_of(foreign, "positive"), "positive:",
                     "did not come from 'Ovis-U1 Encode Condition'", "[1, 77, 4096]", "a pooled_output of 768",
                     "T5-XXL", "CLIPTextEncode", "connect 'Ovis-U1 Encode Condition' instead")
    assert message.startswith("positive:")


@pytest.mark.parametrize("width, origin", [(768, "CLIP-L"), (2048, "SDXL"), (3584, "Qwen2.5-VL"),
                                           (1000, "another model's text encoder")])
def test_other_widths_name_their_origin(width, origin):
    raises(lambda: conditioning.mark_of([torch.zeros(1, 77, width), {}], "negative"), "negative:",
           f"[1, 77, {width}]", origin)


@pytest.mark.parametrize("entry", [torch.zeros(1, 3, 8), [torch.zeros(1, 3, 8)], (torch.zeros(1, 3, 8), None)],
                         ids=["tensor", "one item", "no options"])
def test_something_that_is_no_conditioning_entry(entry):
    raises(lambda: conditioning.mark_of(entry, "middle"), "middle: expected a CONDITIONING",
           "'Ovis-U1 Encode Condition'")


def test_an_entry_with_the_mark_gives_it():
    (entry,) = outputs("edit")["middle"]
    assert conditioning.mark_of(entry, "middle") == {"mode": "edit", "branch": "no_txt", "refined": False}


def test_empty_and_mixed_conditioning():
    t2i = outputs("t2i")
    raises(lambda: conditioning.guidance_mode([], t2i["negative"]), "positive: expected a non-empty CONDITIONING")
    raises(lambda: conditioning.guidance_mode(t2i["positive"], None), "negative: expected a non-empty CONDITIONING")
    mixed = outputs("t2i")["positive"] + outputs("edit")["positive"]
    raises(lambda: conditioning.guidance_mode(mixed, t2i["negative"]), "positive: mixes text-to-image and edit")
    assert conditioning.guidance_mode(t2i["positive"], t2i["negative"] * 2) == "t2i"


# ------------------------------------------------------------------------------------------ guidance mode
def test_guidance_mode_of_correct_wiring():
    t2i, edit = outputs("t2i"), outputs("edit", torch.zeros(1, 4, 8, 12))
    assert conditioning.guidance_mode(t2i["positive"], t2i["negative"]) == "t2i"
    assert conditioning.guidance_mode(t2i["positive"], t2i["negative"], t2i["middle"]) == "t2i"
    assert conditioning.guidance_mode(edit["positive"], edit["negative"], edit["middle"]) == "edit"


def test_refined_conditioning_keeps_its_branches():
    """The Refiner replaces the states and sets refined; the mark still says the mode and branch."""
    edit = outputs("edit")
    refined = {name: [[torch.zeros(1, 3, 4), {**opts, "pooled_output": torch.zeros(1, 4),
                                              "ovis_u1": {**opts["ovis_u1"], "refined": True}}]
                      for _, opts in entries] for name, entries in edit.items()}
    assert conditioning.guidance_mode(refined["positive"], refined["negative"], refined["middle"]) == "edit"


@pytest.mark.parametrize("wiring, wrong, was", [
    (("negative", "positive", "middle"), "positive", "negative"),
    (("middle", "negative", "positive"), "positive", "middle"),
    (("positive", "middle", "negative"), "negative", "middle"),
    (("positive", "negative", "negative"), "middle", "negative"),
], ids=["positive-negative swapped", "positive-middle swapped", "negative-middle swapped", "negative on middle"])
def test_swapped_edit_wires_are_named(wiring, wrong, was):
    """wiring: the outputs connected to the sampler's positive, negative and middle inputs."""
    edit = outputs("edit")
    positive, negative, middle = (edit[name] for name in wiring)
    raises(lambda: conditioning.guidance_mode(positive, negative, middle), f"{wrong}: expected the '{wrong}' output",
           f"(it is the '{was}' output)", "connect each output to the input of the same name")


def test_swapped_text_to_image_wires_are_named():
    t2i = outputs("t2i")
    raises(lambda: conditioning.guidance_mode(t2i["negative"], t2i["positive"]),
           "positive: expected the 'positive' output", "connect each output to the input of the same name")
    raises(lambda: conditioning.guidance_mode(t2i["positive"], t2i["positive"]),
           "negative: expected the 'negative' output", "(it is the 'positive' output)")


def test_an_edit_needs_its_middle():
    edit = outputs("edit")
    raises(lambda: conditioning.guidance_mode(edit["positive"], edit["negative"]),
           "middle: an edit needs the image-only branch", "connect the 'middle' output")


def test_modes_must_agree():
    t2i, edit = outputs("t2i"), outputs("edit")
    raises(lambda: conditioning.guidance_mode(edit["positive"], t2i["negative"], edit["middle"]),
           "negative: encoded in another mode than positive", "encode all three with one")
    raises(lambda: conditioning.guidance_mode(t2i["positive"], t2i["negative"], edit["middle"]),
           "middle: encoded in another mode than positive")


def test_a_foreign_input_is_named_by_the_input_it_is_on():
    edit = outputs("edit")
    foreign = [[torch.zeros(1, 77, 4096), {}]]
    for name, args in (("positive", (foreign, edit["negative"], edit["middle"])),
                       ("negative", (edit["positive"], foreign, edit["middle"])),
                       ("middle", (edit["positive"], edit["negative"], foreign))):
        raises(lambda: conditioning.guidance_mode(*args), f"{name}: this CONDITIONING did not come from", "T5-XXL")
