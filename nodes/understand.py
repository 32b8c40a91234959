"""Ovis-U1 Understand: answer a question about images (or chat without one)."""

from __future__ import annotations

from ..ovis_u1 import estimates

from . import comfy_bridge as bridge
from .image import to_pil_list
from .loader import ENCODER_TYPE


class OvisU1Understand:
    DESCRIPTION = (
        "Answers a question about the connected images with Ovis-U1 (all images of the batch go into one prompt), "
        "or chats without an image. An optional instruction (system prompt) says how to answer, e.g. rewrite a "
        "short prompt in detail for Encode Condition. Greedy decoding by default, as the official demo; the answer "
        "is shown on the node and returned as text."
    )
    CATEGORY = "Ovis-U1"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("answer",)
    OUTPUT_TOOLTIPS = ("The generated answer.",)
    OUTPUT_NODE = True
    FUNCTION = "understand"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "encoder": (ENCODER_TYPE, {"tooltip": "The 'encoder' output of 'Ovis-U1 Model Loader'."}),
                "question": ("STRING", {
                    "multiline": True, "default": "Describe this image in detail.",
                    "tooltip": "The question or request; it must not be empty. Without an image any text, e.g. a short "
                               "prompt to rewrite.",
                }),
                "max_new_tokens": ("INT", {
                    "default": 1024, "min": 1, "max": 8192,
                    "tooltip": "Most tokens to generate; generation stops earlier at the end of the answer.",
                }),
                "do_sample": ("BOOLEAN", {
                    "default": False, "label_on": "sample", "label_off": "greedy",
                    "tooltip": "greedy: always the most likely token (deterministic, official default). "
                               "sample: draw tokens with temperature, top_p and seed.",
                }),
                "temperature": ("FLOAT", {
                    "default": 1.0, "min": 0.01, "max": 5.0, "step": 0.01,
                    "tooltip": "Sampling only: below 1 more focused, above 1 more varied.",
                }),
                "top_p": ("FLOAT", {
                    "default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                    "tooltip": "Sampling only: draw from the smallest set of tokens whose probability reaches top_p.",
                }),
                "seed": ("INT", {
                    "default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                    "control_after_generate": False,  # the frontend would add 'randomize' to any input named seed
                    "tooltip": "Sampling only: seed of the token draws.",
                }),
            },
            "optional": {
                "image": ("IMAGE", {
                    "tooltip": "Images to ask about; every image of the batch goes into the same prompt. "
                               "Leave unconnected for a text-only chat.",
                }),
                # last, so the widget values of workflows saved before it existed keep their places
                "instruction": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "Optional system prompt: how to answer (e.g. 'Rewrite the prompt as one detailed "
                               "paragraph'), given to the model apart from the question. Empty: none (the "
                               "official prompt).",
                }),
            },
        }

    def understand(self, encoder, question, max_new_tokens=1024, do_sample=False, temperature=1.0, top_p=1.0,
                   seed=0, image=None, instruction=""):
        images = to_pil_list(image, "image") if image is not None else None
        progress = bridge.Progress(max_new_tokens)
        memory = estimates.understand_request_memory(encoder.params, images, f"{instruction or ''}{question}",
                                                     max_new_tokens, bridge.dtype_size(encoder.dtype),
                                                     encoder.attention)
        ovis = encoder.load(memory)
        result = ovis.understand(
            images, question, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
            top_p=top_p, seed=seed, on_token=lambda done, total: progress.update(done), instruction=instruction,
        )
        progress.finish()
        notes = [f"⚠ {note}" for note in getattr(result, "warnings", [])]
        return {"ui": {"text": [result.text, *notes]}, "result": (result.text,)}
