"""Ovis-U1 Understand: answer a question about images (or chat without one)."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..ovis_u1 import OvisU1InputError

from . import comfy_bridge as bridge
from .image import to_pil_list
from .loader import ENCODER_INPUT, Encoder

NOT_API_NAMES = ("not this node's API input names (a prompt of the classic node?): send sampling 'greedy', or "
                 "'sample' with sampling.temperature, sampling.top_p and sampling.seed; images go to images.image0, "
                 "images.image1, ... (README, 'API input names')")
IMAGES_TOOLTIP = ("Images to ask about: a new socket appears for each one connected (each may be a batch; all go into "
                  "the same prompt). Connect none for a text-only chat.")
SAMPLING = [
    io.DynamicCombo.Option("greedy", []),
    io.DynamicCombo.Option("sample", [
        io.Float.Input("temperature", default=1.0, min=0.01, max=5.0, step=0.01,
                       tooltip="Below 1 more focused, above 1 more varied."),
        io.Float.Input("top_p", default=1.0, min=0.01, max=1.0, step=0.01,
                       tooltip="Draw from the smallest set of tokens whose probability reaches top_p."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Seed of the token draws.",
                     control_after_generate=False),  # the frontend would add 'randomize' to any input named seed
    ]),
]


class OvisU1Understand(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OvisU1Understand", display_name="Ovis-U1 Understand", category="Ovis-U1",
            description=(
                "Answers a question about the connected images with Ovis-U1 (every image of every connected input "
                "goes into one prompt), or chats without an image. An optional instruction (system prompt) says how "
                "to answer, e.g. rewrite a short prompt in detail for Encode Condition. Greedy decoding by default, "
                "as the official demo; the answer is shown on the node and returned as text."
            ),
            search_aliases=["caption", "VQA", "describe image", "image to text", "chat", "prompt rewrite", "LLM"],
            inputs=[
                Encoder.Input("encoder", **ENCODER_INPUT),
                io.Autogrow.Input("images", optional=True, tooltip=IMAGES_TOOLTIP, template=io.Autogrow.TemplatePrefix(
                    io.Image.Input("image", tooltip=IMAGES_TOOLTIP), prefix="image", min=0, max=16)),
                io.String.Input("question", multiline=True, default="Describe this image in detail.", tooltip=(
                    "The question or request; it must not be empty. Without an image any text, e.g. a short prompt "
                    "to rewrite.")),
                io.Int.Input("max_new_tokens", default=1024, min=1, max=8192,
                             tooltip="Most tokens to generate; generation stops earlier at the end of the answer."),
                io.DynamicCombo.Input("sampling", options=SAMPLING, tooltip=(
                    "greedy: always the most likely token (deterministic, official default). sample: draw tokens "
                    "with temperature, top_p and seed.")),
                io.String.Input("instruction", multiline=True, default="", optional=True, tooltip=(
                    "Optional system prompt: how to answer (e.g. 'Rewrite the prompt as one detailed paragraph'), "
                    "given to the model apart from the question. Empty: none (the official prompt).")),
            ],
            outputs=[io.String.Output(display_name="answer", tooltip="The generated answer.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, encoder, question: str, max_new_tokens: int, sampling: dict | None = None,
                images: dict | None = None, instruction: str = "", **classic) -> io.NodeOutput:
        if sampling is None or classic:  # ComfyUI requires a DynamicCombo only when the prompt names it
            raise OvisU1InputError(f"{', '.join(classic) or 'sampling'}: {NOT_API_NAMES}")
        connected = sorted((images or {}).items(), key=lambda item: int(item[0].removeprefix("image")))
        pictures = [p for name, image in connected for p in to_pil_list(image, f"images.{name}")] or None
        progress = bridge.Progress(max_new_tokens)
        ovis = encoder.load_for_understanding(pictures, f"{instruction or ''}{question}", max_new_tokens)
        result = ovis.understand(
            pictures, question, max_new_tokens=max_new_tokens, do_sample=sampling["sampling"] == "sample",
            temperature=sampling.get("temperature", 1.0), top_p=sampling.get("top_p", 1.0),
            seed=sampling.get("seed", 0), on_token=lambda done, total: progress.update(done),
            instruction=instruction,
        )
        progress.finish()
        shown = "\n\n".join([result.text, *(f"⚠ {note}" for note in getattr(result, "warnings", []))])
        return io.NodeOutput(result.text, ui=ui.PreviewText(shown))
