"""The optional instruction (system prompt) of understanding, used e.g. to rewrite a short prompt in detail: where it
goes in the token ids (a Qwen3 system turn before the question), that an empty one is no instruction (the official
prompt, so greedy answers stay the goldens'), and that bad instructions are the pack's input errors — through the
library, the Understand node and the CLI."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import ovis_u1
from ovis_u1 import OvisU1InputError, prompts
from ovis_u1.__main__ import main
from ovis_u1.truncation import OvisU1TruncationWarning
from tests.golden import CHECKPOINT, TINY_A, case_params, requires_golden, tensors

pytestmark = requires_golden

REWRITE = ("Rewrite the user's short image prompt as one detailed paragraph: colours, shapes, textures, the setting "
           "and the light. Answer with the rewritten prompt only.")


@pytest.fixture(scope="module")
def model():
    return ovis_u1.load_model(CHECKPOINT, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(model):
    return model.tokenizer


def understand_image() -> Image.Image:
    return Image.open(TINY_A / "cases" / "understand" / "input.png")


def tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


# ------------------------------------------------------------------------------------------------ token ids
@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_instruction_is_a_system_turn_before_the_question(tokenizer, num_images):
    without = prompts.understanding_ids(tokenizer, "a red fox", num_images)
    ids = prompts.understanding_ids(tokenizer, "a red fox", num_images, REWRITE)
    system = tokens(tokenizer, f"<|im_start|>system\n{REWRITE}<|im_end|>\n")
    assert ids == system + without  # the question's turn is unchanged, the system turn comes first
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids[0] == start and ids[len(system) - 2] == end
    assert tokenizer.decode(ids[:len(system)]) == f"<|im_start|>system\n{REWRITE}<|im_end|>\n"
    assert ids.count(prompts.IMAGE_ATOM_ID) == num_images


def test_prompt_text_is_the_qwen3_chat_template_with_a_system_message(tokenizer):
    """Qwen3's chat template with messages [system, user], add_generation_prompt and enable_thinking=False writes
    this text; tokenized in one piece it gives the same ids as turn by turn (the turns end in special tokens)."""
    text = (f"<|im_start|>system\n{REWRITE}<|im_end|>\n<|im_start|>user\na red fox<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert prompts.understanding_ids(tokenizer, "a red fox", 0, REWRITE) == tokens(tokenizer, text)


@pytest.mark.parametrize("empty", [None, "", "   ", "\n\n", " \t\n"])
def test_an_empty_instruction_is_no_instruction(tokenizer, empty):
    assert prompts.check_instruction(empty) is None
    assert prompts.understanding_ids(tokenizer, "What is it?", 1, empty) == prompts.understanding_ids(
        tokenizer, "What is it?", 1)


def test_the_instruction_is_kept_as_written(tokenizer):
    """Only an all-whitespace instruction counts as none; others are not stripped (the Qwen3 template does not)."""
    assert prompts.check_instruction("  Be brief.\n") == "  Be brief.\n"
    ids = prompts.understanding_ids(tokenizer, "Hi", 0, "  Be brief.\n")
    assert tokenizer.decode(ids).startswith("<|im_start|>system\n  Be brief.\n<|im_end|>\n<|im_start|>user\nHi")


def test_image_tag_in_an_instruction_is_text(tokenizer):
    ids = prompts.understanding_ids(tokenizer, "What is it?", 1, "Describe every <image> you see.")
    assert ids.count(prompts.IMAGE_ATOM_ID) == 1


# --------------------------------------------------------------------------------------------- the model
def test_understanding_without_an_instruction_is_still_the_golden(model):
    p = case_params("understand")
    want = tensors("understand")["generated_ids"].tolist()
    for empty in (None, "", "  \n"):
        result = model.understand([understand_image()], p["question"], max_new_tokens=p["max_new_tokens"],
                                  instruction=empty)
        assert result.token_ids == want, repr(empty)


def test_the_instruction_reaches_the_model(model):
    plain, told = [], []
    model.understand([], "a red fox", max_new_tokens=1, scores=plain)
    model.understand([], "a red fox", max_new_tokens=1, scores=told, instruction=REWRITE)
    assert not torch.allclose(plain[0], told[0]), "the instruction did not change the first-token logits"
    again: list[torch.Tensor] = []
    model.understand([], "a red fox", max_new_tokens=1, scores=again, instruction=REWRITE)
    assert torch.equal(told[0], again[0])


@pytest.mark.parametrize("bad", [42, 1.5, b"be brief", ["be brief"], {"text": "be brief"}, True])
def test_an_instruction_that_is_not_text_is_an_input_error(model, bad):
    with pytest.raises(OvisU1InputError) as info:
        model.understand([], "a red fox", max_new_tokens=1, instruction=bad)
    message = str(info.value)
    assert "instruction" in message and "text" in message and type(bad).__name__ in message


@pytest.mark.parametrize("markup", ["<|im_end|>", "<|im_start|>", "<|endoftext|>"])
def test_chat_markup_in_an_instruction_is_refused(model, markup):
    with pytest.raises(OvisU1InputError) as info:
        model.understand([], "a red fox", max_new_tokens=1, instruction=f"Be brief.{markup}user")
    assert "instruction" in str(info.value) and markup in str(info.value)


def test_truncation_names_the_instruction(model):
    with pytest.warns(OvisU1TruncationWarning) as caught:
        result = model.understand([], "a red fox", max_new_tokens=1, instruction="be very detailed " * 2000)
    assert any("instruction" in str(w.message) for w in caught)
    assert any("instruction" in note for note in result.warnings)


# ------------------------------------------------------------------------------------------------- CLI
# (the Understand node's instruction: tests/comfyui/test_nodes.py)
def test_cli_takes_an_instruction(capsys, model):
    code = main(["understand", "a red fox", "--model", str(CHECKPOINT), "--device", "cpu", "--dtype", "fp32",
                 "--max-new-tokens", "3", "--instruction", REWRITE])
    assert code == 0
    want = model.understand([], "a red fox", max_new_tokens=3, instruction=REWRITE).text
    assert capsys.readouterr().out.endswith(want + "\n")
