"""Which guidance branch each output of Encode Condition carries, and the check that a sampler's positive,
negative (and middle) inputs carry the branches of one mode, each wired to the input of its name.

The branches are those the official ``generate_img`` of Ovis-U1 runs the MMDiT on (``sampling.GUIDED_BRANCHES``):
text-to-image cond (prompt) and no_both (unconditional); edit cond, no_txt (image only) and no_both. The noise of
cond and no_txt attends to the source latent; no_both sees neither text nor image.
"""

from __future__ import annotations

from .errors import OvisU1InputError
from .sampling import GUIDED_BRANCHES

OUTPUT_BRANCHES = {
    "t2i": {"positive": "cond", "middle": "no_both", "negative": "no_both"},
    "edit": {"positive": "cond", "middle": "no_txt", "negative": "no_both"},
}
CONTEXT_BRANCHES = {name for name, sees_context in GUIDED_BRANCHES["edit"] if sees_context}
NODE = "'Ovis-U1 Encode Condition'"


def guidance_mode(marks: dict[str, list[dict]]) -> str:
    """t2i (CFG over positive/negative) or edit (dual CFG over positive/middle/negative) from the marks (mode,
    branch) of each input's entries, checked so that swapped wires are named."""
    for name, found in marks.items():
        if len({mark["mode"] for mark in found}) > 1:
            raise OvisU1InputError(f"{name}: mixes text-to-image and edit conditioning; encode both in one mode")
    mode = marks["positive"][0]["mode"]
    for name, found in marks.items():
        if found[0]["mode"] != mode:
            raise OvisU1InputError(f"{name}: encoded in another mode than positive; encode all three with one "
                                   f"{NODE}")
        have = {mark["branch"] for mark in found}
        if have != {OUTPUT_BRANCHES[mode][name]}:
            got = OUTPUT_BRANCHES[mode]
            source = [out for out in ("positive", "negative", "middle") if got[out] in have and out != name]
            hint = f" (it is the '{source[0]}' output)" if source else ""
            raise OvisU1InputError(f"{name}: expected the '{name}' output of {NODE}{hint}; connect each output to "
                                   "the input of the same name")
    if mode == "edit" and "middle" not in marks:
        raise OvisU1InputError(f"middle: an edit needs the image-only branch: connect the 'middle' output of {NODE}")
    return mode
