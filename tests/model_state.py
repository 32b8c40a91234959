"""What the bad-input tests check after every case: the loaded model is exactly as it was when it reproduced the
golden text-to-image output — every weight and buffer bit for bit, every module's settings (attention kernel, flags,
hooks), the tokenizer on the golden prompt and torch's global switches. A model in the same state makes the same
image, so each module renders the golden image only twice (before its first case and after its last) instead of after
every case, and a case that changes anything is still named by the test that did it."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest
import torch

from ovis_u1 import prompts
from tests.golden import assert_golden_image, case_params, tensors

PLAIN = (bool, int, float, str, type(None), tuple)
HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
         "_load_state_dict_pre_hooks")


def _attribute(value) -> str:
    if isinstance(value, PLAIN) or hasattr(value, "__dataclass_fields__"):
        return repr(value)
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return f"{type(value).__name__}:{getattr(value, 'name', '')}"  # e.g. the attention Kernel, by its name


def fingerprint(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(repr((name, data.dtype, tensor.device.type, tuple(tensor.shape), tensor.requires_grad)).encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    for name, module in model.named_modules():
        settings = sorted((k, _attribute(v)) for k, v in vars(module).items()
                          if not k.startswith("_") and k != "tokenizer")
        hooks = [len(getattr(module, h, {})) for h in HOOKS]
        digest.update(repr((name, type(module).__qualname__, module.training, settings, hooks)).encode())
    p = case_params("t2i")
    ids = prompts.condition_ids(model.tokenizer, "t2i", "cond", p["prompt"])
    assert ids == tensors("t2i")["cond.input_ids"].reshape(-1).tolist(), "the tokenizer no longer gives the golden ids"
    digest.update(repr((torch.get_default_dtype(), torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
                        torch.are_deterministic_algorithms_enabled())).encode())
    return digest.hexdigest()


def assert_renders_the_golden(model) -> None:
    p = case_params("t2i")
    image = model.text_to_image(p["prompt"], width=p["width"], height=p["height"], steps=p["steps"],
                                txt_cfg=p["txt_cfg"], seed=p["seed"])
    assert_golden_image(np.asarray(image), tensors("t2i")["output_image_uint8"])


def golden_state_fixture(model_fixture: str = "model"):
    """A module-scoped fixture: the golden image before the module's first case, the model's fingerprint for the
    per-case checks, and the golden image again after its last case."""

    @pytest.fixture(scope="module")
    def golden_state(request):
        model = request.getfixturevalue(model_fixture)
        assert_renders_the_golden(model)
        yield fingerprint(model)
        assert_renders_the_golden(model)

    return golden_state
