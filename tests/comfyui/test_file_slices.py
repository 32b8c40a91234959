"""Inside a real ComfyUI (in this process, ``--cpu``): the weights the pack uses as they are stored carry ComfyUI's
file-slice mark, so that Dynamic VRAM reads them from the file as it reads a core model's (issue 22, item 5).

ComfyUI 0.18.1 and later read a weight from its file when its storage carries ``_comfy_tensor_file_slice``
(``comfy.memory_management.read_tensor_file_slice_into``, which ``model_management.cast_to_gathered`` calls as Dynamic
VRAM stages each weight; ``comfy.utils.load_safetensors`` puts the mark on a core model's weights). A CPU cannot run
Dynamic VRAM, so the test calls that reader itself, into a CPU buffer, on every loaded weight: each one kept in its
stored dtype reads back the checkpoint's bytes, and no converted one (fresh memory) carries a mark. ComfyUI 0.3.64
has no such reader: there the pack adds no mark.

Run: COMFYUI_PATH=~/.cache/comfy-0.33.0/ComfyUI ~/.cache/comfy-0.33.0/venv/bin/python -m pytest tests/comfyui/test_file_slices.py
(and the same for 0.18.1 and 0.3.64; OVIS_U1_LAZY_LAYERS=1 for lazy layers); skipped without COMFYUI_PATH.
"""

from __future__ import annotations

import sys

import pytest
import torch

from tests.comfyui.test_memory import COMFYUI_PATH, load, pack  # noqa: F401  (pack: the in-process pack fixture)
from tests.golden import CHECKPOINT, requires_golden

pytestmark = [
    requires_golden,
    pytest.mark.skipif(not COMFYUI_PATH, reason="in-ComfyUI tests need COMFYUI_PATH=/path/to/ComfyUI and a Python "
                                               "with ComfyUI's requirements"),
]

MARK = "_comfy_tensor_file_slice"
PARTS = ("llm.", "visual_tokenizer.", "vte.", "visual_generator.backbone.", "visual_generator.vae.")


def slice_reader():
    """``comfy.memory_management.read_tensor_file_slice_into``, or None where this ComfyUI has none (0.3.64)."""
    try:
        import comfy.memory_management as memory_management
    except ImportError:
        return None
    return getattr(memory_management, "read_tensor_file_slice_into", None)


def stored(pack) -> dict[str, tuple[torch.dtype, bytes]]:
    """key → (stored dtype, bytes) of every tensor of the test checkpoint, read with the pack's own header reader."""
    checkpoint = sys.modules[f"{pack.__name__}.ovis_u1.checkpoint"]
    out = {}
    for path in checkpoint.weight_files(CHECKPOINT):
        with open(path, "rb") as f:
            data_start, header = checkpoint.read_header(f, path)
            for key, info in header.items():
                begin, end = info["data_offsets"]
                f.seek(data_start + begin)
                out[key] = (checkpoint._STORED_DTYPES[info["dtype"]], f.read(end - begin))
    return out


def loaded_weights(pack, **widgets) -> dict[str, torch.Tensor]:
    """The loaded model's tensors under their checkpoint keys, as the loader node gives them to ComfyUI."""
    encoder, _, _ = load(pack, **widgets)
    return dict(encoder.model.state_dict(keep_vars=True))


def marked(tensor: torch.Tensor) -> bool:
    return getattr(tensor.untyped_storage(), MARK, None) is not None


def read_back(read, tensor: torch.Tensor) -> bytes | None:
    """What ComfyUI's reader puts into a CPU buffer for ``tensor``; None where it reads nothing."""
    buffer = torch.zeros(tensor.numel() * tensor.element_size(), dtype=torch.uint8)
    return bytes(buffer.numpy()) if read(tensor, buffer) else None


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_weights_used_as_stored_read_back_from_their_file_and_no_other(pack, dtype):
    """fp32 keeps every weight of the (fp32) test checkpoint as stored; bf16 keeps only the VAE's."""
    read = slice_reader()
    checkpoint = stored(pack)
    weights = loaded_weights(pack, dtype=dtype)
    assert set(checkpoint) <= set(weights)
    if read is None:  # ComfyUI 0.3.64: no file slices, no marks
        assert not any(marked(weights[key]) for key in checkpoint)
        return
    as_stored = {key for key, (stored_dtype, _) in checkpoint.items() if weights[key].dtype == stored_dtype}
    assert {part for part in PARTS for key in as_stored if key.startswith(part)} == (
        set(PARTS) if dtype == "fp32" else {"visual_generator.vae."})
    unread = sorted(key for key in as_stored if read_back(read, weights[key]) != checkpoint[key][1])
    assert not unread, f"{len(unread)} of {len(as_stored)} weights used as stored are not read from the file: {unread[:5]}"
    converted = sorted(key for key in set(checkpoint) - as_stored if marked(weights[key]))
    assert not converted, f"converted weights carry a file-slice mark: {converted[:5]}"


def test_the_switch_turns_the_marks_off(pack, monkeypatch):
    """``OVIS_U1_FILE_SLICES=0`` leaves every weight unmarked (for measuring the RAM the marks save); by default the
    weights used as stored are marked where ComfyUI reads file slices."""
    checkpoint = stored(pack)
    default = loaded_weights(pack)
    monkeypatch.setenv("OVIS_U1_FILE_SLICES", "0")
    off = loaded_weights(pack)
    assert not any(marked(off[key]) for key in checkpoint)
    assert all(marked(default[key]) for key in checkpoint) == (slice_reader() is not None)
