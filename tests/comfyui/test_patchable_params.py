"""Inside a real ComfyUI (in this process, ``--cpu``): weight patches on the MMDiT's QK-norm scales and the token
refiner's ``cls_token`` — parameters that are no ComfyUI layer's weight or bias — reach the image exactly as when
merged by hand, on every path ComfyUI loads the MODEL by (issue 22, item 6).

``add_patches`` with a difference (``(delta,)``, the form LoRA ``diff`` keys take) on a double block's query-norm scale,
a single block's key-norm scale and ``txt_in.cls_token``, at strength s, against a freshly loaded MODEL whose three
parameters were set to p + s·delta by hand: through the MMDiT Sampler (ComfyUI's own full load), and through the
library's sampling after a full load, a partial (lowvram) load, and the state ComfyUI's Dynamic VRAM loader leaves
these parameters in (a CPU cannot run it; ``as_dynamic_vram_loads`` does what ``ModelPatcherDynamic.load`` does to
them). Unloading gives the MODEL its own parameters back.

Run: COMFYUI_PATH=~/.cache/comfy-0.33.0/ComfyUI ~/.cache/comfy-0.33.0/venv/bin/python -m pytest tests/comfyui/test_patchable_params.py
(and the same for 0.3.64 and 0.18.1; OVIS_U1_LAZY_LAYERS=1 for lazy layers); skipped without COMFYUI_PATH.
"""

from __future__ import annotations

import pytest
import torch

from tests.comfyui.test_generation import comfy, mmdit_sampler, t2i_inputs  # noqa: F401  (comfy: module fixture)
from tests.comfyui.test_memory import COMFYUI_PATH, load, run_part
from tests.golden import requires_golden

pytestmark = [
    requires_golden,
    pytest.mark.skipif(not COMFYUI_PATH, reason="in-ComfyUI tests need COMFYUI_PATH=/path/to/ComfyUI and a Python "
                                               "with ComfyUI's requirements"),
]

FREE = ("double_blocks.0.img_attn.norm.query_norm.scale", "single_blocks.1.norm.key_norm.scale", "txt_in.cls_token")
STRENGTH = 0.8
STEPS = 4


def deltas(mmdit) -> dict[str, torch.Tensor]:
    """A seeded difference per parameter, large enough to move the sample visibly."""
    g = torch.Generator().manual_seed(11)
    return {key: torch.randn(mmdit.get_parameter(key).shape, generator=g) * 2.0 for key in FREE}


def with_patches(model, delta: dict[str, torch.Tensor]):
    patched = model.clone()
    added = patched.add_patches({f"diffusion_model.{key}": (d,) for key, d in delta.items()}, STRENGTH)
    assert sorted(added) == sorted(f"diffusion_model.{key}" for key in FREE)
    return patched


@pytest.fixture(scope="module")
def reference(comfy):
    """The t2i inputs, the deltas, and the outputs of the MODEL as loaded and of a fresh MODEL merged by hand (which
    differ visibly): through the MMDiT Sampler and through the library's sampling (``run_part``)."""
    p, positive, _, negative, latent = t2i_inputs(comfy)
    shared = comfy["model"].model.diffusion_model
    delta = deltas(shared)
    originals = {key: shared.get_parameter(key).detach().clone() for key in FREE}
    base = mmdit_sampler(comfy, p, positive, negative, latent, steps=STEPS)["samples"]
    base_run = run_part(comfy["pack"], comfy["encoder"].model, "mmdit")

    merged_encoder, merged_model, _ = load(comfy["pack"])  # its own weights: the shared MODEL stays as loaded
    merged = merged_model.model.diffusion_model
    assert merged is not shared
    with torch.no_grad():
        for key, d in delta.items():
            parameter = merged.get_parameter(key)
            parameter.data = parameter.data + STRENGTH * d.to(parameter.dtype)  # a new tensor, not the loaded one
    expected = mmdit_sampler(comfy, p, positive, negative, latent, model=merged_model, steps=STEPS)["samples"]
    expected_run = run_part(comfy["pack"], merged_encoder.model, "mmdit")
    assert (expected - base).abs().max() > 1e-2 and (expected_run - base_run).abs().max() > 1e-2
    return dict(p=p, positive=positive, negative=negative, latent=latent, delta=delta, originals=originals,
                base=base, expected=expected, base_run=base_run, expected_run=expected_run)


def assert_merged(actual, base, expected):
    assert not torch.allclose(actual, base, atol=1e-3), "the patches on the free parameters did not reach the output"
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_the_mmdit_sampler_sees_patches_on_the_free_parameters(comfy, reference):
    r = reference
    model = with_patches(comfy["model"], r["delta"])
    out = mmdit_sampler(comfy, r["p"], r["positive"], r["negative"], r["latent"], model=model, steps=STEPS)
    assert_merged(out["samples"], r["base"], r["expected"])


def as_dynamic_vram_loads(patcher, device) -> None:
    """What ``ModelPatcherDynamic.load`` (comfy/model_patcher.py, ComfyUI 0.18.1 and 0.33.0) does to these parameters,
    then its ``CallbacksMP.ON_LOAD`` callbacks: a parameter of a module with submodules is moved as it is
    (``_load_list(default_device=…)``); one of a leaf module that is no ``comfy.ops`` layer is kept as the backup and
    replaced by a plain copy on the device, without patches."""
    import collections

    import comfy.patcher_extension
    import comfy.utils

    backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])
    for key in (f"diffusion_model.{k}" for k in FREE):
        owner = patcher.model.get_submodule(key.rsplit(".", 1)[0])
        parameter = comfy.utils.get_attr(patcher.model, key)
        if any(True for _ in owner.children()):
            parameter.data = parameter.data.to(device=device)
        else:
            patcher.backup.setdefault(key, backup(parameter, False))
            comfy.utils.set_attr_param(patcher.model, key, parameter.to(device=device, copy=True))
    for callback in patcher.get_all_callbacks(comfy.patcher_extension.CallbacksMP.ON_LOAD):
        callback(patcher, device, 0, False, False)


@pytest.mark.parametrize("path", ["full", "full, loaded again", "partial", "dynamic"])
def test_patches_on_the_free_parameters_apply_on_every_load_path(comfy, reference, path):
    import comfy.model_management as mm

    r = reference
    mm.unload_all_models()
    model = with_patches(comfy["model"], r["delta"])
    device = model.load_device
    if path == "dynamic":
        as_dynamic_vram_loads(model, device)
    else:
        budget = model.model_size() // 5 if path == "partial" else 0
        for _ in range(2 if path.endswith("again") else 1):  # the second load finds the first one's patches
            model.patch_model(device_to=device, lowvram_model_memory=budget, load_weights=True)
        assert model.model.model_lowvram == (path == "partial")
    try:
        out = run_part(comfy["pack"], comfy["encoder"].model, "mmdit")
    finally:
        model.unpatch_model(model.offload_device)
    assert_merged(out, r["base_run"], r["expected_run"])
    shared = comfy["model"].model.diffusion_model
    for key, original in r["originals"].items():  # unloading restores the MODEL's own parameters
        assert torch.equal(shared.get_parameter(key), original), key
