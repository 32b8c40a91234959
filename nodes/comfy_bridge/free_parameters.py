"""Weight patches (LoRA, model patches) on the MMDiT's parameters that are no ComfyUI layer's weight or bias: the QK
norms' ``scale`` and the token refiner's ``cls_token``.

ComfyUI applies a MODEL's weight patches while it loads the model (comfy/model_patcher.py), and on some of its paths
not to these two: ``ModelPatcher._load_list`` leaves out the parameters of a module that has submodules
(``txt_in.cls_token``), ``ModelPatcher.load`` patches a leaf module's other parameters only when it loads the module
whole (a streamed layer gets ``LowVramPatch`` for ``weight`` and ``bias`` alone), and ``ModelPatcherDynamic.load``
moves the parameters of modules that are not ``comfy.ops`` layers with a plain ``.to()`` (0.18.1 leaves the extra
parameters of ``comfy.ops`` layers where they are too). Their names are the checkpoint's (``…query_norm.scale``,
``txt_in.cls_token``, what LoRA files and ``add_patches`` use), so no layer can own them as its ``weight``.

So after every load (``CallbacksMP.ON_LOAD``), whatever path ComfyUI took, each such parameter is set again from its
original where a loader kept one (``patcher.backup``) and, when the MODEL has patches for it, patched with ComfyUI's
own ``patch_weight_to_device`` — which keeps the original in the backup that unloading restores. Doing it again gives
the same weight, so it does not matter what the loader did before.
"""

from __future__ import annotations

import comfy.patcher_extension
import comfy.utils

CALLBACK_KEY = "ovis_u1_free_parameters"


def free_parameter_keys(model) -> list[str]:
    """Keys of ``model``'s parameters that are not the weight or bias of a ComfyUI layer (``comfy_cast_weights``)."""
    keys = []
    for name, module in model.named_modules():
        layer = hasattr(module, "comfy_cast_weights")
        for param, _ in module.named_parameters(recurse=False):
            if not (layer and param in ("weight", "bias")):
                keys.append(f"{name}.{param}" if name else param)
    return keys


def patch_free_parameters(patcher, device_to, *load_args) -> None:
    """``CallbacksMP.ON_LOAD``: every free parameter as its original plus the patcher's patches for it."""
    for key in free_parameter_keys(patcher.model):
        original = patcher.backup.get(key)
        if original is not None:  # whatever a loader (or an earlier load with other patches) made of it
            comfy.utils.set_attr_param(patcher.model, key, original.weight.to(device=device_to, copy=True))
        if key in patcher.patches:
            patcher.patch_weight_to_device(key, device_to=device_to)


def patch_on_load(patcher) -> None:
    patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_LOAD, CALLBACK_KEY, patch_free_parameters)
