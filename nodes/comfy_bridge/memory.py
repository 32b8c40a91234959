"""A loaded Ovis-U1 under ComfyUI's model management, the way ComfyUI manages its own models.

The library builds every weight-bearing layer from an ``operations`` namespace; inside ComfyUI that is the namespace
ComfyUI would build a model of these dtypes with (``comfy.ops.pick_operations``: plain layers that can cast their
weights on the fly, ``manual_cast`` when the weights are stored in another dtype than the one computed in, e.g. fp8).
Layers of that kind are what ComfyUI's lowvram path (and 0.18.1's dynamic VRAM) can stream: a part that does not fit
is loaded partially, the rest of its weights are cast to the device layer by layer as the forward reaches them.

Each part gets its own patcher (``CoreModelPatcher``, which ComfyUI swaps for its dynamic patcher on NVIDIA): the
encoder's is here (``OvisU1Encoder``), the MMDiT's is the core MODEL (``core_model``), the VAE's the core VAE's
(``core_vae``). Each is loaded by ``load_models_gpu`` with an activation estimate and *without* ``force_full_load``,
so ComfyUI decides between a full and a partial load.
"""

from __future__ import annotations

import contextlib

import torch
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.quant_ops
from torch import nn

from ...ovis_u1 import estimates, fp8, operations
from .gguf_ops import cast_quantized_weights
from .host import load_device, offload_device

# The loader's weight-storage choices (the library's names) → what the loader passes on; None keeps the compute dtype.
WEIGHT_DTYPES = {name: None if dtype is None else name for name, dtype in operations.WEIGHT_DTYPES.items()}


def patcher_class(disable_dynamic: bool = False):
    """The patcher ComfyUI wraps its own models in: ``CoreModelPatcher`` (``main.py`` rebinds it to the dynamic-VRAM
    patcher on NVIDIA, so it is looked up at call time), or ``ModelPatcher`` where ``disable_dynamic`` asks for one
    that is never dynamic, as comfy/sd.py's loaders choose theirs."""
    return comfy.model_patcher.ModelPatcher if disable_dynamic else comfy.model_patcher.CoreModelPatcher


def comfy_operations(compute_dtype: torch.dtype, weight_dtype: str | None = None, fp8_matmul: bool = True):
    """ComfyUI's operations for weights stored in ``weight_dtype`` (None: the compute dtype) and computed in
    ``compute_dtype`` — the call ``comfy.model_base.BaseModel`` makes for its own diffusion models — with the two
    casts the library reads weights through outside a layer's own forward (see ``ovis_u1.operations``).

    ``fp8_matmul=False`` refuses ComfyUI's fp8 matmul (``comfy.ops.fp8_ops``, which ``pick_operations`` gives for
    ``--fast`` on a GPU that computes in fp8; ``disable_fast_fp8``): the namespace of the encoder parts, which core
    builds for its own text encoders with the plain manual cast (comfy/sd1_clip.py); fp8 storage stays as asked.
    Scaled fp8 takes the quantized layers core loads its scaled-fp8 checkpoints with, their fp8 matmul where that is."""
    storage = operations.parse_weight_storage(weight_dtype)
    stored = storage.dtype or compute_dtype
    manual_cast = None if stored == compute_dtype else compute_dtype
    ops = comfy.ops.pick_operations(stored, manual_cast, load_device=load_device(), disable_fast_fp8=not fp8_matmul)
    if storage.scaled:
        ops = quantized_operations(compute_dtype, fp8_matmul=ops is comfy.ops.fp8_ops)

    class Operations(ops):
        class Embedding(ops.Embedding):
            """ComfyUI's cast Embedding returns its *stored* dtype (fp8) unless the caller passes ``out_dtype``, as
            ComfyUI's own text encoders do; the library expects the compute dtype, as from every other layer."""

            def forward(self, *args, **kwargs):
                kwargs.setdefault("out_dtype", compute_dtype)
                return super().forward(*args, **kwargs)

        cast_to = staticmethod(cast_free_parameter)
        cast_weights = staticmethod(cast_layer_weights)
        cast_quantized_weights = staticmethod(cast_quantized_weights)  # a GGUF folder's layers (ovis_u1.gguf)
        every_op = staticmethod(comfy.ops.run_every_op)  # ComfyUI's per-op interrupt check

    return Operations


def quantized_operations(compute_dtype: torch.dtype, fp8_matmul: bool):
    """``mixed_precision_ops``: its Linear (and 0.33.0's Embedding) read scaled fp8 themselves; the other layers hold
    it as ComfyUI's quantized tensor too, which their cast dequantizes."""
    ops = comfy.ops.mixed_precision_ops({}, compute_dtype, full_precision_mm=not fp8_matmul)
    layout = comfy.quant_ops.TensorCoreFP8E4M3Layout

    def quantized(values, scale):
        params = layout.Params(scale=scale, orig_dtype=compute_dtype, orig_shape=tuple(values.shape))
        return comfy.quant_ops.QuantizedTensor(values, layout.__name__, params)

    def holding_quantized(layer):
        class Layer(layer):
            def _load_from_state_dict(self, state_dict, prefix, *args):
                fp8.hold_scaled(state_dict, prefix, quantized)
                super()._load_from_state_dict(state_dict, prefix, *args)

        return layer if layer is not getattr(comfy.ops.manual_cast, layer.__name__) else Layer

    class Quantized(ops):
        class Linear(ops.Linear):
            casts_weights = True  # its forward always casts (ovis_u1.operations.casts_weights)

        Conv2d = holding_quantized(ops.Conv2d)
        Embedding = holding_quantized(ops.Embedding)

    return Quantized


def cast_free_parameter(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A parameter outside every cast layer, as core casts its own (``comfy.ldm.common_dit.rms_norm``)."""
    return mm.cast_to(tensor, dtype=like.dtype, device=like.device)


@contextlib.contextmanager
def cast_layer_weights(layer: nn.Module, like: torch.Tensor):
    """(weight, bias) of a ComfyUI layer on like's device in like's dtype, through ComfyUI's own cast (streamed,
    patched — LoRA — and pinned as for a forward of the layer), for the duration of the block."""
    weight, bias, stream = comfy.ops.cast_bias_weight(layer, like, offloadable=True)
    try:
        yield weight, bias
    finally:
        comfy.ops.uncast_bias_weight(layer, weight, bias, stream)


class OvisU1LLM(nn.Module):
    """The language model, visual encoder and visual embedding table (shared with the OvisU1 module)."""


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the distinct tensors (tied weights count once), as stored: ``nbytes``, as ComfyUI's ``module_size``
    counts (a quantized tensor's ``element_size`` is that of the dtype it dequantizes to)."""
    seen = {t.data_ptr(): t.nbytes for t in [*module.parameters(), *module.buffers()]}
    return sum(seen.values())


class OvisU1Encoder:
    """What flows through an ``OVIS_U1_ENCODER`` socket: the loaded OvisU1 (its LLM, visual encoder and tokenizer are
    what Understand and Encode Condition run), its compute dtype and attention choice, and in ComfyUI one patcher over
    those parts. The MMDiT and the VAE of the same OvisU1 travel as the core MODEL and VAE. ``disable_dynamic``: the
    patcher is a plain ``ModelPatcher`` (what ``ModelPatcher.clone(disable_dynamic=True)`` asks of a rebuild)."""

    def __init__(self, model, attention: str = "auto", name: str = "", dtype: torch.dtype | None = None,
                 disable_dynamic: bool = False):
        self.model = model
        self.attention = attention
        self.name = name
        self.dtype = dtype or torch.float32
        llm = OvisU1LLM()
        for part, module in (("llm", model.llm), ("visual_tokenizer", model.visual_tokenizer), ("vte", model.vte)):
            llm.add_module(part, module)  # the same modules: moving the patcher's model moves the OvisU1's
        self.patcher = patcher_class(disable_dynamic)(llm, load_device=load_device(), offload_device=offload_device(),
                                                      size=weight_bytes(llm))

    @property
    def params(self):
        return self.model.params

    def load(self, memory_required: int = 0):
        """Make the LLM and visual encoder ready to run and return the OvisU1 module.

        ``memory_required`` (bytes of activations) lets ComfyUI offload other models first (the MMDiT and the VAE
        included) and load these parts only partially when weights + activations do not fit.
        """
        mm.load_models_gpu([self.patcher], memory_required=memory_required)
        # A partial load leaves some weights on the offload device: tell the library where the parts compute, so its
        # inputs go to the GPU and the remaining weights are cast there layer by layer.
        for module in (self.model.llm, self.model.visual_tokenizer, self.model.vte):
            module.execution_device = self.patcher.load_device
        return self.model

    def load_for_understanding(self, images, text: str, max_new_tokens: int):
        """``load`` with the activations of one Understand request (``estimates.understand_request_memory``)."""
        return self.load(estimates.understand_request_memory(self.params, images, text, max_new_tokens,
                                                             self.dtype.itemsize, self.attention))

    def load_for_condition(self, mode: str, width: int, height: int):
        """``load`` with the activations of one Encode Condition request (``estimates.condition_request_memory``)."""
        return self.load(estimates.condition_request_memory(self.params, mode, width, height, self.dtype.itemsize,
                                                            self.attention))

    def __repr__(self):
        return f"Ovis-U1 encoder {self.name!r}"
