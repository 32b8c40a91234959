"""Inside a real ComfyUI (in this process, ``--cpu``): where and in what dtype the pack's VAE computes, and what the
loader's ``auto`` dtype says on a GPU without bf16 — the branches a GPU takes, forced on a CPU.

The core VAE takes its device and dtype from ComfyUI as ``comfy.sd.VAE.__init__`` does (``vae_device()``,
``vae_offload_device()``, ``vae_dtype(device, working_dtypes)``), so ``--cpu-vae``, ``--bf16-vae`` and ``--fp16-vae``
apply, with fp32 (the official decode's) where no flag says otherwise; ComfyUI's flags are set by hand on its
``args``, and its GPU is the meta device (``get_torch_device``), so that a VAE left on the CPU is seen. The edit
context is encoded on ``vae.device`` in ``vae.vae_dtype`` whatever ComfyUI has loaded where: a VAE whose device is not
its weights' (under Dynamic VRAM or a partial load the first layer's weight can be anywhere) must still get its
input on its device.

Run: COMFYUI_PATH=~/.cache/comfy-0.33.0/ComfyUI ~/.cache/comfy-0.33.0/venv/bin/python -m pytest
tests/comfyui/test_vae_device.py (and the same for 0.18.1 and 0.3.64; OVIS_U1_LAZY_LAYERS=1 for lazy layers).
"""

from __future__ import annotations

import copy
import logging
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.comfyui.test_generation import call, comfy, pack_node  # noqa: F401  (comfy: fixture)
from tests.comfyui.test_memory import COMFYUI_PATH, load
from tests.golden import TINY_A, case_params, requires_golden, tensors

pytestmark = [
    requires_golden,
    pytest.mark.skipif(not COMFYUI_PATH, reason="in-ComfyUI tests need COMFYUI_PATH=/path/to/ComfyUI and a Python "
                                               "with ComfyUI's requirements"),
]

GPU = torch.device("meta")  # ComfyUI's GPU in these tests: a device no weight of the loaded model is on
# ComfyUI's VAE flags (its ``args`` attribute) → the VAE's device and dtype
FLAGS = {
    None: (GPU, torch.float32),
    "bf16_vae": (GPU, torch.bfloat16),
    "fp16_vae": (GPU, torch.float16),
    "fp32_vae": (GPU, torch.float32),
    "cpu_vae": (torch.device("cpu"), torch.float32),
}


class Stop(Exception):
    """Raised by a spy once it has seen what it watches for."""


def bridge(comfy, module: str):
    return sys.modules[f"{comfy['pack'].__name__}.nodes.comfy_bridge.{module}"]


def new_core_vae(comfy):
    """A core VAE over a copy of the loaded VAE module, built as the loader builds it under the current flags."""
    module = copy.deepcopy(comfy["vae"].first_stage_model.vae)
    return bridge(comfy, "core_vae").OvisU1CoreVAE(module)


def inputs_seen(layer: torch.nn.Module, stop: bool = False) -> list[tuple[torch.device, torch.dtype]]:
    """(device, dtype) of every input ``layer`` gets (then ``Stop`` when ``stop``)."""
    seen = []

    def spy(_, args):
        seen.append((args[0].device, args[0].dtype))
        if stop:
            raise Stop

    layer.register_forward_pre_hook(spy)
    return seen


def edit_image() -> torch.Tensor:
    image = np.array(Image.open(TINY_A / "cases" / "edit" / "input.png").convert("RGB"))
    return (torch.from_numpy(image).float() / 255.0)[None]


def edit_context(comfy, vae) -> torch.Tensor:
    _, context, _ = pack_node(comfy, "OvisU1EditContextEncoder", vae=vae, image=edit_image(),
                              seed=case_params("edit")["vae_sample_seed"])
    return context["samples"]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.abs().max()).item()


# ------------------------------------------------------------------------------------------------------- VAE
@pytest.mark.parametrize("flag", list(FLAGS), ids=lambda f: f"--{f.replace('_', '-')}" if f else "no-flag")
def test_the_vae_takes_comfyuis_vae_device_and_dtype(comfy, monkeypatch, flag):
    import comfy.model_management as mm
    from comfy.cli_args import args

    monkeypatch.setattr(mm, "get_torch_device", lambda: GPU)
    if flag:
        monkeypatch.setattr(args, flag, True)
    device, dtype = FLAGS[flag]
    vae = new_core_vae(comfy)
    assert (vae.device, vae.vae_dtype) == (device, dtype)
    assert vae.patcher.load_device == device and vae.patcher.offload_device == mm.vae_offload_device()
    assert {p.dtype for p in vae.first_stage_model.parameters()} == {dtype}, "the weights are not in the VAE dtype"


@pytest.mark.parametrize("flag", ["bf16_vae", "fp16_vae"])
def test_a_half_precision_vae_decodes_and_encodes_the_edit_context_in_it(comfy, monkeypatch, flag):
    """Core's VAEDecode and the Edit Context Encoder on the VAE made under --bf16-vae / --fp16-vae compute in that
    dtype and give the fp32 VAE's results within its rounding (relative to the largest value, as tests/test_vae.py
    bounds a bf16 VAE)."""
    from comfy.cli_args import args

    monkeypatch.setattr(args, flag, True)
    vae = new_core_vae(comfy)
    library = vae.first_stage_model.vae
    decoded_in, encoded_in = inputs_seen(library.decoder.conv_in), inputs_seen(library.encoder.conv_in)
    latent = {"samples": tensors("t2i")["vae_dec_input"]}
    (image,) = call(comfy["core"].VAEDecode, samples=latent, vae=vae)
    (reference,) = call(comfy["core"].VAEDecode, samples=latent, vae=comfy["vae"])
    context, reference_context = edit_context(comfy, vae), edit_context(comfy, comfy["vae"])
    assert {dtype for _, dtype in decoded_in + encoded_in} == {FLAGS[flag][1]}
    assert relative_error(image, reference) < 5e-2
    assert context.dtype == torch.float32 and relative_error(context, reference_context) < 5e-2


def test_the_edit_context_is_encoded_on_the_vae_device_not_where_its_weights_are(comfy, monkeypatch):
    """ComfyUI's VAE device (meta here: a GPU) with every weight left on the CPU, as after a partial load: the
    encode gets its input on the VAE device, in the VAE dtype; the first parameter's device says nothing."""
    vae = new_core_vae(comfy)
    monkeypatch.setattr(vae, "device", GPU)
    seen = inputs_seen(vae.first_stage_model.vae.encoder.conv_in, stop=True)
    with pytest.raises(Stop):
        edit_context(comfy, vae)
    assert seen == [(GPU, vae.vae_dtype)]


# ------------------------------------------------------------------------------------------- auto dtype note
@pytest.mark.parametrize("bf16", [False, True], ids=["gpu-without-bf16", "gpu-with-bf16"])
def test_auto_dtype_says_once_per_load_that_a_gpu_without_bf16_gets_fp32(comfy, monkeypatch, caplog, bf16):
    """The loader with dtype auto on a CUDA device whose bf16 ComfyUI does not use (``should_use_bf16`` false:
    Pascal, Turing) loads fp32 and says so in one console line that names fp16 as the way to half the memory."""
    import comfy.model_management as mm

    monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(mm, "should_use_bf16", lambda *args, **kwargs: bf16)
    with caplog.at_level(logging.INFO):
        encoder, _, _ = load(comfy["pack"], dtype="auto")
    notes = [r for r in caplog.records if "dtype auto" in r.getMessage()]
    if bf16:
        assert encoder.dtype == torch.bfloat16 and not notes
        return
    assert encoder.dtype == torch.float32
    assert len(notes) == 1 and notes[0].levelno == logging.WARNING, caplog.text
    assert all(word in notes[0].getMessage() for word in ("fp32", "bf16", "fp16", "cuda:0")), notes[0].getMessage()


def test_auto_dtype_on_the_cpu_says_nothing(comfy, caplog):
    host = bridge(comfy, "host")
    with caplog.at_level(logging.INFO):
        assert host.auto_dtype() == torch.float32
    assert not [r for r in caplog.records if "dtype auto" in r.getMessage()]
