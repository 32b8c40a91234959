"""Ovis-U1's conditioning as ComfyUI CONDITIONING, and the check that a CONDITIONING is Ovis-U1's.

A CONDITIONING is a list of ``[tensor, options]``. Encode Condition gives one per classifier-free-guidance branch of
the official recipe: ``tensor`` is the branch's LLM hidden states [1, L, 2·hidden] and ``options`` carries the
pack's mark (``MARK``: mode, branch, refined) and, on the branches that see the source image of an edit, the source
latent as ``reference_latents`` (raw VAE latent, as ComfyUI's ReferenceLatent attaches it). The Refiner replaces the
states by the refined text tokens [1, L, hidden] and adds their pooled vector as ``pooled_output``.

The branches and the check of their wiring: ``ovis_u1.wiring``. The bridge's model class and the nodes share it.
"""

from __future__ import annotations

from ...ovis_u1 import OvisU1InputError, wiring
from ...ovis_u1.inputs import describe_foreign
from ...ovis_u1.wiring import CONTEXT_BRANCHES, NODE, OUTPUT_BRANCHES

from .host import intermediate_device

MARK = "ovis_u1"


def conditioning_outputs(condition, reference_latent=None) -> tuple[list, list, list]:
    """positive, middle and negative CONDITIONING of an ``ovis_u1.Condition``, on ComfyUI's intermediate device; an
    edit's ``reference_latent`` (raw VAE latent [1, 4, h, w]) goes on the branches that see the source image.
    Text-to-image has no image-only branch: middle is the unconditional branch there."""
    outputs = []
    for branch in OUTPUT_BRANCHES[condition.mode].values():
        options = {MARK: {"mode": condition.mode, "branch": branch, "refined": False}}
        if reference_latent is not None and condition.mode == "edit" and branch in CONTEXT_BRANCHES:
            options["reference_latents"] = [reference_latent]
        outputs.append([[condition.branches[branch].to(intermediate_device()), options]])
    return tuple(outputs)


def mark_of(entry, name: str) -> dict:
    """The pack's mark of one ``[tensor, options]`` of the CONDITIONING input ``name``; a foreign entry is an error
    that names its origin."""
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], dict)):
        raise OvisU1InputError(f"{name}: expected a CONDITIONING (a list of [tensor, options]); connect an output "
                               f"of {NODE}")
    states, options = entry
    mark = options.get(MARK)
    if not isinstance(mark, dict):
        origin = describe_foreign(states, options.get("pooled_output"))
        raise OvisU1InputError(
            f"{name}: this CONDITIONING did not come from {NODE} ({origin}); Ovis-U1's "
            f"MMDiT only understands its own LLM's conditioning: connect {NODE} instead"
        )
    return mark


def guidance_mode(positive, negative, middle=None) -> str:
    """t2i or edit (``ovis_u1.wiring.guidance_mode``) of a sampler's CONDITIONING inputs."""
    named = {"positive": positive, "negative": negative, **({} if middle is None else {"middle": middle})}
    for name, conditioning in named.items():
        if not isinstance(conditioning, list) or not conditioning:
            raise OvisU1InputError(f"{name}: expected a non-empty CONDITIONING from {NODE}")
    return wiring.guidance_mode({name: [mark_of(entry, name) for entry in c] for name, c in named.items()})
