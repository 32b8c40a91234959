"""Prompt templates and tokenization — the one place they live (official configuration_ovis_u1.py,
Qwen3ConversationFormatter; modeling_ovis_u1.py, OvisU1.preprocess_inputs and
BaseVisualTokenizer.construct_image_placeholders; the prompts of the official test scripts).

Text is formatted as Qwen3 chat turns; each turn is tokenized on its own and, inside a turn, split where an image goes
so that every image becomes the placeholder group ``[-301, -300, -302]`` (start indicator, atom, end indicator). The
atom is later replaced by the image's visual embeddings (``merge``).

User text is text. The official code splits the whole turn on the literal ``<image>`` (or on ``<video>`` when that
occurs anywhere), so a user who types ``<image>`` gets an extra placeholder with no image behind it and the official
code fails (here: an IndexError). This module splits only where the template puts an image, so ``<image>`` and
``<video>`` in a prompt are tokenized as the plain text they are; prompts without them tokenize exactly as the
official code. The chat markup the tokenizer treats as special tokens (``<|im_start|>``, ``<|im_end|>``,
``<|endoftext|>``…) would be parsed as markup inside user text too and end the user's turn early; it cannot be
made plain text without changing the tokenization of the surrounding words, so it is refused with a clear error.

An understanding prompt may start with a system turn holding an instruction (how to answer, e.g. "rewrite this
prompt in detail"); the official prompt has none, and an empty instruction writes none.
"""

from __future__ import annotations

from pathlib import Path

from transformers import Qwen2TokenizerFast

from .checkpoint import read_json
from .errors import CheckpointError, OvisU1InputError
from .inputs import check_characters

IMAGE_TOKEN = "<image>"
IMAGE_ATOM_ID = -300
IMAGE_INDICATOR_IDS = (-301, -302, -303, -304)
IMAGE_PLACEHOLDER = (IMAGE_INDICATOR_IDS[0], IMAGE_ATOM_ID, IMAGE_INDICATOR_IDS[1])

T2I_PREFIX = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "and spatial relationships of the objects:"
)
UNCONDITIONAL_TEXT = "Generate an image."

# Which text and which image each classifier-free-guidance branch of a mode gets (official test_txt_to_img.py,
# pipe_t2i; test_img_edit.py, pipe_img_edit).
# "canvas" = a white image of the target size, "source" = the (resized) image being edited.
BRANCHES = {
    "t2i": {"cond": ("prompt", "canvas"), "no_both": ("unconditional", "canvas")},
    "edit": {
        "cond": ("prompt", "source"),
        "no_txt": ("unconditional", "source"),
        "no_both": ("unconditional", "canvas"),
    },
}


# The files a Qwen2 tokenizer is saved as; tokenizer.json alone, or vocab.json + merges.txt, hold the vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json")
# Tokens the templates write (each must be one token of the checkpoint's vocabulary) and the end of a turn, which
# ends an answer (the tokenizer's eos).
TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")
END_OF_TURN = "<|im_end|>"
ROUND_TRIP_TEXT = "Describe the image in detail."


def load_tokenizer(directory: str | Path, llm_vocab_size: int | None = None):
    """The checkpoint's Qwen2 tokenizer, by its concrete class, checked to be the one the prompts need.

    The Auto classes would read config.json's ``auto_map`` and (transformers 5.x) ask on stdin whether to run
    remote code (transformers' dynamic_module_utils.resolve_trust_remote_code), so they are never used here.
    transformers builds *some* tokenizer from almost any subset of the files — without
    tokenizer.json/vocab.json/merges.txt a 5-token one that turns every prompt into nothing, without
    tokenizer_config.json + special_tokens_map.json one whose end of turn is ``<|endoftext|>`` — so the result is
    checked and a failure names the missing files. ``llm_vocab_size`` defaults to config.json's
    ``llm_config.vocab_size``.
    """
    directory = Path(directory)
    missing = [name for name in TOKENIZER_FILES if not (directory / name).is_file()]

    def fail(problem: str, cause: Exception | None = None):
        files = f" (missing: {', '.join(missing)})" if missing else ""
        raise CheckpointError(
            f"the tokenizer in {str(directory)!r} is not the Ovis-U1 checkpoint's: {problem}{files}; "
            "copy the tokenizer files of the ATH-MaaS/Ovis-U1-3B download (tokenizer.json, tokenizer_config.json, "
            "vocab.json, merges.txt, special_tokens_map.json, added_tokens.json) into the folder"
        ) from cause

    if "tokenizer.json" in missing and ("vocab.json" in missing or "merges.txt" in missing):
        fail("no vocabulary (tokenizer.json, or vocab.json with merges.txt)")
    # transformers 4.x reads tokenizer.json in Rust, whose permission error is no PermissionError: open each file here
    for name in TOKENIZER_FILES:
        if name not in missing:
            try:
                open(directory / name, "rb").close()
            except PermissionError as e:
                raise CheckpointError(f"cannot read {directory / name}: permission denied; make the file readable "
                                      "(e.g. chmod a+r)") from e
    try:
        tokenizer = Qwen2TokenizerFast.from_pretrained(str(directory))
    except PermissionError as e:
        name = e.filename or f"the tokenizer files in {str(directory)!r}"
        raise CheckpointError(f"cannot read {name}: permission denied; make the file readable (e.g. chmod a+r)") from e
    except Exception as e:  # transformers/tokenizers raise ValueError, JSON, and Rust exception types
        fail(f"it cannot be loaded ({type(e).__name__}: {e})", e)
    if llm_vocab_size is None:
        llm_vocab_size = _llm_vocab_size(directory)
    check_tokenizer(tokenizer, llm_vocab_size, fail)
    return tokenizer


def _llm_vocab_size(directory: Path) -> int | None:
    """config.json's llm_config.vocab_size; a config.json that cannot be read is a CheckpointError naming it (also
    when the tokenizer is loaded on its own), a missing or wrong value is left to load_params to report."""
    vocab_size = (read_json(directory / "config.json").get("llm_config") or {}).get("vocab_size")
    return vocab_size if isinstance(vocab_size, int) and not isinstance(vocab_size, bool) else None


def check_tokenizer(tokenizer, llm_vocab_size: int | None, fail) -> None:
    """Every template token is a single id, the end of turn is the eos, plain text survives a round trip, and no id
    lies outside the LLM's embedding table. ``fail(problem)`` raises."""
    for token in TEMPLATE_TOKENS:
        ids = tokenizer(token, add_special_tokens=False).input_ids
        if len(ids) != 1:
            fail(f"{token} is not one token (it tokenizes to {ids})")
    if tokenizer.eos_token != END_OF_TURN:
        fail(f"its end-of-sequence token is {tokenizer.eos_token!r}, but answers end at {END_OF_TURN}")
    ids = tokenizer(ROUND_TRIP_TEXT, add_special_tokens=False).input_ids
    if tokenizer.decode(ids) != ROUND_TRIP_TEXT:
        fail(f"it does not reproduce plain text ({ROUND_TRIP_TEXT!r} → {ids})")
    if llm_vocab_size is not None and len(tokenizer) > llm_vocab_size:
        fail(f"it has {len(tokenizer)} tokens, more than the LLM's vocab_size {llm_vocab_size} in config.json")


def user_turn(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n"


def system_turn(text: str) -> str:
    """A system message as the Qwen3 chat template writes it (first turn, ``<|im_start|>system\n…<|im_end|>\n``;
    Qwen3 has no default system prompt, so without one no system turn is written) and as the official Ovis
    formatter tokenizes it (ovis/model/conversation_formatter.py, Qwen3ConversationFormatter.format: one turn, its
    own tokenizer call)."""
    return f"<|im_start|>system\n{text}<|im_end|>\n"


def assistant_preface() -> str:
    """Start of the answer with thinking switched off (Qwen3 ``enable_thinking=False``)."""
    return "<|im_start|>assistant\n<think>\n\n</think>\n\n"


class _ImageSlot:
    """Where the template puts an image (never produced by user text)."""

    def __repr__(self) -> str:
        return IMAGE_TOKEN


IMAGE = _ImageSlot()


def understanding_query(question: str, num_images: int) -> list:
    """The user text of an understanding turn as parts: strings and ``IMAGE`` slots."""
    if num_images == 0:
        return [question]
    if num_images == 1:
        return [IMAGE, f"\n{question}"]
    parts: list = []
    for i in range(num_images):
        parts += [f"Image {i + 1}: ", IMAGE, "\n"]
    return _joined(parts + [question])


def _joined(parts: list) -> list:
    """Adjacent strings joined, so every text chunk between images is tokenized in one piece (as officially)."""
    out: list = []
    for part in parts:
        if isinstance(part, str) and out and isinstance(out[-1], str):
            out[-1] += part
        elif not (isinstance(part, str) and not part):
            out.append(part)
    return out


def user_turn_parts(parts: list) -> list:
    return _joined(["<|im_start|>user\n", *parts, "<|im_end|>\n"])


def condition_text(mode: str, branch: str, prompt: str) -> str:
    """The user text of one generation branch (the image is given separately)."""
    kind = BRANCHES[mode][branch][0]
    if kind == "unconditional":
        return UNCONDITIONAL_TEXT
    if mode == "t2i":
        return T2I_PREFIX + prompt
    return prompt.strip()


def markup_in(tokenizer, text: str) -> list[str]:
    """The tokenizer's special tokens (chat markup) that occur in ``text``."""
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(token, "special", False):
            specials.add(str(token))
    return sorted(t for t in specials if t and t in text)


def check_markup(tokenizer, text: str, name: str) -> None:
    check_characters(text, name)  # for callers of the prompt functions that bypass check_prompt
    found = markup_in(tokenizer, text)
    if found:
        raise OvisU1InputError(
            f"{name} contains the model's chat markup {', '.join(found)}: the pack writes the chat template itself, "
            "and this text would be read as markup, not as words; remove it from the " + name
        )


def tokenize_parts(tokenizer, parts: list) -> list[int]:
    """Tokenize one chat turn given as parts; each ``IMAGE`` slot becomes the placeholder group."""
    ids: list[int] = []
    for part in parts:
        if part is IMAGE:
            ids.extend(IMAGE_PLACEHOLDER)
        elif part:
            ids.extend(tokenizer(part, add_special_tokens=False).input_ids)
    return ids


def tokenize_turn(tokenizer, turn: str) -> list[int]:
    """Tokenize template text (no user text) — the chat markup is parsed as markup."""
    return tokenize_parts(tokenizer, [turn])


def check_instruction(instruction) -> str | None:
    """The instruction (system prompt) of an understanding turn, or None when there is none: None, "" and text of
    only whitespace all mean "no instruction", so a cleared text box gives exactly the prompt without one."""
    if instruction is None:
        return None
    if not isinstance(instruction, str):
        raise OvisU1InputError(f"instruction must be text, got {type(instruction).__name__}: pass a string, or "
                               "leave it empty for no instruction")
    return instruction if instruction.strip() else None


def understanding_ids(tokenizer, question: str, num_images: int, instruction: str | None = None) -> list[int]:
    """Token ids of an understanding prompt: an optional system turn with ``instruction``, the user turn with the
    images and the question, and the start of the answer. Without an instruction this is the official prompt."""
    check_markup(tokenizer, question, "question")
    instruction = check_instruction(instruction)
    ids: list[int] = []
    if instruction is not None:
        check_markup(tokenizer, instruction, "instruction")
        ids += tokenize_parts(tokenizer, [system_turn(instruction)])  # plain text: no image slot in a system turn
    parts = user_turn_parts(understanding_query(question, num_images))
    return ids + tokenize_parts(tokenizer, parts) + tokenize_turn(tokenizer, assistant_preface())


def condition_ids(tokenizer, mode: str, branch: str, prompt: str) -> list[int]:
    check_markup(tokenizer, prompt, "prompt")
    text = condition_text(mode, branch, prompt)
    return tokenize_parts(tokenizer, user_turn_parts([IMAGE, f"\n{text}"]))
