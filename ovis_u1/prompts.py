"""Prompt templates and tokenization (SPEC §B.1, §B.2, §B.7, §C.1) — the one place they live.

Text is formatted as Qwen3 chat turns; each turn is tokenized on its own and, inside a turn, split on the literal
``<image>`` so that every image becomes the placeholder group ``[-301, -300, -302]`` (start indicator, atom, end
indicator). The atom is later replaced by the image's visual embeddings (``merge``).
"""

from __future__ import annotations

from pathlib import Path

IMAGE_TOKEN = "<image>"
IMAGE_ATOM_ID = -300
IMAGE_INDICATOR_IDS = (-301, -302, -303, -304)
IMAGE_PLACEHOLDER = (IMAGE_INDICATOR_IDS[0], IMAGE_ATOM_ID, IMAGE_INDICATOR_IDS[1])

T2I_PREFIX = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "and spatial relationships of the objects:"
)
UNCONDITIONAL_TEXT = "Generate an image."

# Which text and which image each classifier-free-guidance branch of a mode gets (SPEC §C.1).
# "canvas" = a white image of the target size, "source" = the (resized) image being edited.
BRANCHES = {
    "t2i": {"cond": ("prompt", "canvas"), "no_both": ("unconditional", "canvas")},
    "edit": {
        "cond": ("prompt", "source"),
        "no_txt": ("unconditional", "source"),
        "no_both": ("unconditional", "canvas"),
    },
}


def load_tokenizer(directory: str | Path):
    """The checkpoint's Qwen2 tokenizer, by its concrete class.

    The Auto classes would read config.json's ``auto_map`` and (transformers 5.x) ask on stdin whether to run
    remote code (SPEC §D.11), so they are never used here.
    """
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast.from_pretrained(str(directory))


def user_turn(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n"


def assistant_preface() -> str:
    """Start of the answer with thinking switched off (Qwen3 ``enable_thinking=False``)."""
    return "<|im_start|>assistant\n<think>\n\n</think>\n\n"


def understanding_query(question: str, num_images: int) -> str:
    if num_images == 0:
        return question
    if num_images == 1:
        return f"{IMAGE_TOKEN}\n{question}"
    lines = "".join(f"Image {i + 1}: {IMAGE_TOKEN}\n" for i in range(num_images))
    return lines + question


def condition_text(mode: str, branch: str, prompt: str) -> str:
    """The user text of one generation branch (the image is given separately)."""
    kind = BRANCHES[mode][branch][0]
    if kind == "unconditional":
        return UNCONDITIONAL_TEXT
    if mode == "t2i":
        return T2I_PREFIX + prompt
    return prompt.strip()


def tokenize_turn(tokenizer, turn: str) -> list[int]:
    """Tokenize one chat turn, mapping each ``<image>`` to the placeholder group."""
    ids: list[int] = []
    chunks = turn.split(IMAGE_TOKEN)
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.extend(IMAGE_PLACEHOLDER)
        if chunk:
            ids.extend(tokenizer(chunk, add_special_tokens=False).input_ids)
    return ids


def understanding_ids(tokenizer, question: str, num_images: int) -> list[int]:
    query = understanding_query(question, num_images)
    return tokenize_turn(tokenizer, user_turn(query)) + tokenize_turn(tokenizer, assistant_preface())


def condition_ids(tokenizer, mode: str, branch: str, prompt: str) -> list[int]:
    text = condition_text(mode, branch, prompt)
    return tokenize_turn(tokenizer, user_turn(f"{IMAGE_TOKEN}\n{text}"))
