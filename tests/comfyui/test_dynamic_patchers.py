"""Inside a real ComfyUI (in this process, ``--cpu``): the pack's three patchers under Dynamic VRAM, as on a GPU.

On an NVIDIA card ComfyUI ≥ 0.18 wraps models in ``ModelPatcherDynamic`` (main.py rebinds
``comfy.model_patcher.CoreModelPatcher``), whose ``is_dynamic()`` is true; ``ModelPatcher.clone(disable_dynamic=True)``
then rebuilds the model from the patcher's ``cached_patcher_init`` (a loader function and its arguments), as core's
loaders set it in comfy/sd.py, and raises "Cannot create non-dynamic delegate: cached_patcher_init is not
initialized" without one. Core takes that clone in TorchCompileModel (comfy_extras/nodes_torch_compile.py) and for
conditioning that carries hooks (comfy/samplers.py ``CFGGuider.inner_set_conds`` → ``get_non_dynamic_delegate``).

On a CPU ``ModelPatcherDynamic.__new__`` hands back a plain ``ModelPatcher``, so the GPU branch is forced here: the
parts are loaded while ``CoreModelPatcher`` is a ``ModelPatcher`` that reports ``is_dynamic()`` and has
``ModelPatcherDynamic``'s ``get_non_dynamic_delegate`` — everything ComfyUI's clone and guider read of it. ComfyUI
0.3.64 has no Dynamic VRAM (no ``is_dynamic``, no rebuilds): there the same nodes run on the plain patchers.

Run: COMFYUI_PATH=~/.cache/comfy-0.33.0/ComfyUI ~/.cache/comfy-0.33.0/venv/bin/python -m pytest
tests/comfyui/test_dynamic_patchers.py (and the same for 0.18.1 and 0.3.64; OVIS_U1_LAZY_LAYERS=1 for lazy layers).
"""

from __future__ import annotations

import pytest
import torch

from tests.comfyui.test_generation import (  # noqa: F401  (comfy: the module's loaded ComfyUI + pack fixture)
    call, comfy, mmdit_sampler, t2i_inputs)
from tests.comfyui.test_lora import (  # noqa: F401  (loras and the lazy-layers file reads: fixtures)
    LAYOUTS, STRENGTH, _lora_files_readable_with_lazy_layers, assert_same_latent, loras, with_lora)
from tests.comfyui.test_memory import COMFYUI_PATH, PARTS, load
from tests.golden import requires_golden

pytestmark = [
    requires_golden,
    pytest.mark.skipif(not COMFYUI_PATH, reason="in-ComfyUI tests need COMFYUI_PATH=/path/to/ComfyUI and a Python "
                                               "with ComfyUI's requirements"),
]

STEPS = 2
LORA = "official_peft"


def has_dynamic_vram() -> bool:
    """ComfyUI ≥ 0.18: patchers say whether they are dynamic, and a non-dynamic clone rebuilds the model."""
    import comfy.model_patcher

    return hasattr(comfy.model_patcher.ModelPatcher, "is_dynamic")


@pytest.fixture(scope="module")
def dynamic(comfy):
    """The loader's outputs with every patcher as ComfyUI makes it on an NVIDIA GPU under Dynamic VRAM (0.3.64: as
    it makes it there), and the patcher of each part; ComfyUI's ``CoreModelPatcher`` stays the GPU's for the
    module's tests (the shared ``comfy`` MODEL was loaded before)."""
    import comfy.model_patcher as patchers

    original = getattr(patchers, "CoreModelPatcher", None)
    if has_dynamic_vram():
        class ReportsDynamic(patchers.ModelPatcher):
            non_dynamic_delegate_model = None
            get_non_dynamic_delegate = patchers.ModelPatcherDynamic.get_non_dynamic_delegate

            def is_dynamic(self):
                return True

        patchers.CoreModelPatcher = ReportsDynamic
    try:
        encoder, model, vae = load(comfy["pack"])
        yield dict(encoder=encoder, model=model, vae=vae, patchers={"llm": encoder.patcher, "mmdit": model,
                                                                    "vae": vae.patcher})
    finally:
        if original is not None:
            patchers.CoreModelPatcher = original


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("part", PARTS)
def test_each_patcher_has_a_non_dynamic_clone_with_its_own_model(dynamic, part):
    import comfy.model_patcher as patchers

    patcher = dynamic["patchers"][part]
    if not has_dynamic_vram():  # 0.3.64: a clone shares the model; nothing is rebuilt
        assert patcher.clone().model is patcher.model
        return
    assert patcher.is_dynamic()
    clone = patcher.clone(disable_dynamic=True)
    assert type(clone) is patchers.ModelPatcher and not clone.is_dynamic()
    assert clone.model is not patcher.model, f"{part}: the non-dynamic clone shares the dynamic patcher's model"
    ours, theirs = weights(patcher.model), weights(clone.model)
    assert ours.keys() == theirs.keys()
    for key, tensor in ours.items():  # loaded again from the same folder, in the same dtypes
        assert theirs[key].dtype == tensor.dtype and torch.equal(theirs[key], tensor), key
    # the factory honours disable_dynamic, and without it makes the loader's patcher (multi-GPU deep clones)
    factory, arguments = patcher.cached_patcher_init
    assert not factory(*arguments, disable_dynamic=True).is_dynamic()
    assert factory(*arguments).is_dynamic()


def test_the_rebuilt_model_attends_as_the_loaded_one(dynamic):
    model = dynamic["model"]
    clone = model.clone(disable_dynamic=True) if has_dynamic_vram() else model.clone()
    assert clone.model.diffusion_model.kernel.name == model.model.diffusion_model.kernel.name


def test_torch_compile_model_runs_on_the_packs_model(comfy, dynamic, monkeypatch):
    """Core's TorchCompileModel on the MODEL gives a MODEL (not dynamic) that samples the image of the loaded one.
    torch.compile is made eager here: inductor on a CPU takes minutes; what is checked is what the node compiles."""
    import comfy_extras.nodes_torch_compile as torch_compile

    compiled = []

    def compile_eagerly(model, **kwargs):
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    (model,) = call(torch_compile.TorchCompileModel, model=dynamic["model"], backend="inductor")
    if has_dynamic_vram():
        assert not model.is_dynamic()
    assert compiled == [model.model.diffusion_model]
    p, positive, _, negative, latent = t2i_inputs(comfy)
    out = mmdit_sampler(comfy, p, positive, negative, latent, model=model, steps=STEPS)["samples"]
    expected = mmdit_sampler(comfy, p, positive, negative, latent, steps=STEPS)["samples"]
    assert torch.equal(out, expected)


@pytest.fixture(scope="module")
def hook_lora(loras):
    """The test LoRA (tests/comfyui/test_lora.py) on the layers a sampling step runs, saved beside it: a hook LoRA
    patches the weights for the steps of the conditionings that carry it (comfy/samplers.py ``_calc_cond_batch``),
    while the token refiner runs once per conditioning before them (``OvisU1Model.extra_conds``)."""
    from safetensors.torch import save_file

    write = LAYOUTS[LORA]
    tensors = {}
    for layer, (a, b) in loras["factors"].items():
        if not layer.startswith("txt_in."):
            tensors.update({k: v.contiguous() for k, v in write(layer, a, b).items()})
    name = "ovis_u1_test_hook_lora.safetensors"
    save_file(tensors, str(loras["folder"] / name))
    return name


def test_a_hook_lora_on_encode_conditions_output_samples_as_the_lora(comfy, dynamic, hook_lora):
    """Core's CreateHookLoraModelOnly + SetModelHooksOnCond on Encode Condition's CONDITIONING: the guider samples on
    the MODEL's non-dynamic delegate (0.18.1, 0.33.0), and the image is the one of the same LoRA on the MODEL."""
    import comfy_extras.nodes_hooks as hooks

    (hook,) = call(hooks.CreateHookLoraModelOnly, lora_name=hook_lora, strength_model=STRENGTH)
    p, positive, _, negative, latent = t2i_inputs(comfy)
    (hooked_positive,) = call(hooks.SetModelHooksOnCond, conditioning=positive, hooks=hook)
    (hooked_negative,) = call(hooks.SetModelHooksOnCond, conditioning=negative, hooks=hook)
    out = mmdit_sampler(comfy, p, hooked_positive, hooked_negative, latent, model=dynamic["model"], steps=STEPS)
    plain = mmdit_sampler(comfy, p, positive, negative, latent, steps=STEPS)
    merged = mmdit_sampler(comfy, p, positive, negative, latent, model=with_lora(comfy["model"], hook_lora),
                           steps=STEPS)
    assert (out["samples"] - plain["samples"]).abs().max() > 1e-2, "the hook LoRA did not change the image"
    assert_same_latent(out["samples"], merged["samples"])
