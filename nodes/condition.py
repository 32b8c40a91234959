"""Ovis-U1 Encode Condition (prompt [+ image] → CONDITIONING of every guidance branch) and Ovis-U1 Refiner."""

from __future__ import annotations

from comfy_api.latest import io

from ..ovis_u1.inputs import check_mode_inputs

from . import comfy_bridge as bridge
from .comfy_bridge import conditioning, sampling
from .image import to_pil
from .loader import ENCODER_INPUT, Encoder

# A plain combo and optional sockets, not a DynamicCombo: the frontends of ComfyUI 0.18.1 (1.42) and 0.33.0 (1.49)
# fail to build a node whose DynamicCombo shows a link input for its default option (README, "Encode Condition").
MODES = {"text-to-image": "t2i", "edit": "edit"}
BRANCH_OUTPUTS = [
    io.Conditioning.Output(display_name="positive", tooltip=(
        "The prompt branch (official 'cond'): positive of 'Ovis-U1 MMDiT Sampler', CFGGuider, KSampler; cond1 of "
        "DualCFGGuider.")),
    io.Conditioning.Output(display_name="middle", tooltip=(
        "The image-only branch of an edit (official 'no_txt', with the source latent): middle of the MMDiT Sampler, "
        "cond2 of DualCFGGuider. Text-to-image has none: the same as negative.")),
    io.Conditioning.Output(display_name="negative", tooltip=(
        "The unconditional branch (official 'no_both'): negative of every sampler and guider.")),
]


class OvisU1EncodeCondition(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OvisU1EncodeCondition", display_name="Ovis-U1 Encode Condition", category="Ovis-U1",
            description=(
                "Runs the prompt (and for an edit the source image) through Ovis-U1's visual encoder and LLM once, "
                "giving the CONDITIONING of every classifier-free-guidance branch the mode needs: text-to-image "
                "prompt and unconditional; edit prompt, image-only and unconditional, the first two carrying the "
                "source latent."
            ),
            search_aliases=["text encode", "prompt", "instruct edit", "image edit", "text to image", "unified"],
            inputs=[
                Encoder.Input("encoder", **ENCODER_INPUT),
                io.String.Input("prompt", multiline=True, default="", tooltip=(
                    "What the image should show (text-to-image) or how to change the image (edit).")),
                io.Combo.Input("mode", options=list(MODES), default="text-to-image", tooltip=(
                    "text-to-image: draw from the prompt on a white canvas of the latent's size. edit: change the "
                    "image as the prompt says.")),
                io.Latent.Input("latent", optional=True, tooltip=(
                    "Text-to-image: the latent you will sample (e.g. EmptyLatentImage); its size is the canvas the "
                    "prompt is drawn on. Not used for an edit.")),
                io.Image.Input("image", optional=True, tooltip=(
                    "Edit: the 'resized_image' of 'Ovis-U1 Edit Context Encoder' (one image).")),
                io.Latent.Input("context", optional=True, tooltip=(
                    "Edit: the 'context' of 'Ovis-U1 Edit Context Encoder' (the source latent), attached to "
                    "positive and middle.")),
            ],
            outputs=BRANCH_OUTPUTS,
        )

    @classmethod
    def execute(cls, encoder, prompt: str, mode: str, latent=None, image=None, context=None) -> io.NodeOutput:
        check_mode_inputs(MODES[mode], {"latent": latent, "image": image, "context": context}, mode)
        if MODES[mode] == "t2i":
            width, height = bridge.latent_size(latent, "latent")
            condition = encoder.load_for_condition("t2i", width, height).encode_condition(
                prompt, "t2i", width=width, height=height)
            return io.NodeOutput(*conditioning.conditioning_outputs(condition))
        width, height = bridge.latent_size(context, "context")
        source = to_pil(image, "image")
        condition = encoder.load_for_condition("edit", width, height).encode_condition(
            prompt, "edit", image=source, width=width, height=height)
        return io.NodeOutput(*conditioning.conditioning_outputs(condition, context["samples"][:1]))


class OvisU1Refiner(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OvisU1Refiner", display_name="Ovis-U1 Refiner", category="Ovis-U1",
            description=(
                "Runs the MMDiT's token refiner (with the MODEL's LoRAs and patches) on Encode Condition's "
                "CONDITIONING. It does not depend on the timestep, so it runs once per prompt; ComfyUI keeps its "
                "result while only the seed or the sampler settings change. Optional: the MODEL refines unrefined "
                "conditioning by itself."
            ),
            search_aliases=["token refiner", "refine conditioning"],
            inputs=[
                io.Model.Input("model", tooltip="The 'model' output of 'Ovis-U1 Model Loader' (LoRAs applied)."),
                io.Conditioning.Input("positive", tooltip="'positive' of 'Ovis-U1 Encode Condition'."),
                io.Conditioning.Input("negative", tooltip="'negative' of 'Ovis-U1 Encode Condition'."),
                io.Conditioning.Input("middle", optional=True,
                                      tooltip="'middle' of 'Ovis-U1 Encode Condition' (edits)."),
            ],
            outputs=BRANCH_OUTPUTS,  # the same branches, refined
        )

    @classmethod
    def execute(cls, model, positive, negative, middle=None) -> io.NodeOutput:
        positive, negative = sampling.refine(model, positive, "positive"), sampling.refine(model, negative, "negative")
        middle = negative if middle is None else sampling.refine(model, middle, "middle")
        return io.NodeOutput(positive, middle, negative)
