"""Layer namespaces ("operations") the model is built from, and the pack's headless manual-cast namespace.

Every weight-bearing part of ``ovis_u1`` takes an ``operations`` namespace: anything with torch.nn-compatible
constructors ``Linear, Conv2d, GroupNorm, LayerNorm, Embedding`` (and ``RMSNorm`` for the LLM). The default is
``torch.nn`` itself. Inside ComfyUI the bridge passes ComfyUI's own operations (``comfy.ops.manual_cast`` or what
``comfy.ops.pick_operations`` returns) so that ComfyUI can keep weights on the offload device and stream them.

Headless, :class:`manual_cast` here plays that role: its layers cast weight and bias to the input's dtype and device
in ``forward``. That is what lets weights be *stored* in fp8 (``weight_dtype``) and *computed* in bf16/fp16/fp32, and
what lets weights live on another device than the activations. This module never imports ComfyUI.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fp8
from .errors import OvisU1InputError

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALED_FP8 = "fp8_e4m3fn_scaled"  # e4m3fn with a scale per matrix (ovis_u1/fp8.py)
# The weight-storage choices (loader ``weight_dtype``, ``load_model``, CLI ``--weight-dtype``) and the dtype each stores
# the matrices in; None keeps the compute dtype. The one list: the ComfyUI loader's options are these names.
WEIGHT_DTYPES = {"default": None, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
                 SCALED_FP8: fp8.SCALED_DTYPE}


def cast_like(t: Tensor | None, x: Tensor) -> Tensor | None:
    """``t`` on x's device in x's dtype (no copy when it already is) — how a stored weight meets an activation."""
    if t is None:
        return None
    return t.to(device=x.device, dtype=x.dtype)


def cast_weight(layer: nn.Module, x: Tensor) -> Tensor:
    """A layer's weight as ``x`` computes with it: cast like ``x``, times the layer's ``weight_scale`` where it is
    stored as scaled fp8 (:mod:`ovis_u1.fp8`)."""
    scale = getattr(layer, fp8.SCALE_KEY, None)
    if scale is None:
        return cast_like(layer.weight, x)
    return fp8.dequantize(layer.weight.to(x.device), scale, x.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Weights read outside a layer's own forward
# ---------------------------------------------------------------------------------------------------------------------
# A memory manager may keep weights where only its own cast reaches them (ComfyUI's Dynamic VRAM streams every weight
# through the layer's cast; its lowvram path keeps them on the offload device). So a weight that the library reads at
# compute time — a tied LM head's table, the visual embedding table, a norm's weight, a free parameter such as a
# positional table — is read through the namespace, never directly. A namespace may provide:
#
#   cast_to(tensor, like)         a free parameter on like's device in like's dtype (ComfyUI: model_management.cast_to)
#   cast_weights(layer, like)     a context manager giving (weight, bias) of one of its layers on like's device in
#                                 like's dtype, for use inside the block (ComfyUI: ops.cast_bias_weight)
#   every_op()                    called first in every forward of the pack's own layers, as a namespace's own layers
#                                 call it first in theirs (ComfyUI: ops.run_every_op, its per-op interrupt check that
#                                 raises when the user cancelled)
#
# Namespaces without them (torch.nn, the manual cast below) get the plain casts and no per-op call.

def plain_cast_to(t: Tensor, like: Tensor) -> Tensor:
    return cast_like(t, like)


@contextlib.contextmanager
def plain_cast_weights(layer: nn.Module, like: Tensor) -> Iterator[tuple[Tensor, Tensor | None]]:
    yield cast_weight(layer, like), cast_like(getattr(layer, "bias", None), like)


def cast_to_of(operations) -> Callable[[Tensor, Tensor], Tensor]:
    """The namespace's cast for free parameters."""
    return getattr(operations, "cast_to", plain_cast_to)


def cast_weights_of(operations) -> Callable:
    """The namespace's cast for a layer's weights read outside the layer's forward."""
    return getattr(operations, "cast_weights", plain_cast_weights)


def no_per_op_call() -> None:
    """What the pack's own layers call first in ``forward`` when their namespace has no ``every_op``."""


def every_op_of(operations) -> Callable[[], None]:
    """The namespace's per-op call (inside ComfyUI its interrupt check), or nothing."""
    return getattr(operations, "every_op", no_per_op_call)


class OwnLayer:
    """Base of the pack's own layers (a ``torch.nn`` layer with the pack's math, see :func:`namespace_layer`): their
    ``forward`` calls ``self.every_op()`` first and reads weights through ``self.cast_weights``; these defaults are
    the plain ones, a namespace's replace them."""

    cast_weights = staticmethod(plain_cast_weights)
    every_op = staticmethod(no_per_op_call)


_JOINED: dict[tuple, type] = {}


def namespace_layer(own: type, operations, base: str) -> type:
    """``own`` — an :class:`OwnLayer` and ``torch.nn.<base>`` subclass with the pack's own math — joined with the
    namespace's ``<base>`` layer, so that the memory manager sees one of its own layers (streamed, patched, counted)
    while the numbers stay the pack's; it reads its weights through the namespace's cast and makes the namespace's
    per-op call. Namespaces without ``<base>`` get ``own`` with their cast and call."""
    layer = getattr(operations, base, None)
    hooks = {"cast_weights": cast_weights_of(operations), "every_op": every_op_of(operations)}
    bases = (own,) if layer is None or issubclass(own, layer) else (own, layer)
    if bases == (own,) and all(getattr(own, name, None) is hook for name, hook in hooks.items()):
        return own
    key = (bases, *hooks.values())
    if key not in _JOINED:
        methods = {name: staticmethod(hook) for name, hook in hooks.items()}
        _JOINED[key] = type(own.__name__, bases, {**methods, "__module__": own.__module__})
    return _JOINED[key]


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def storage_dtype(module: nn.Module, compute: torch.dtype) -> torch.dtype:
    """The fp8 dtype a part's matrices are stored in, or ``compute`` where none is fp8."""
    fp8 = [p.dtype for p in module.parameters() if is_fp8(p.dtype)]
    return fp8[0] if fp8 else compute


def fp32_on_gpu_note(device) -> str:
    """The console line of an ``auto`` dtype that came out fp32 on a GPU: what, why (ComfyUI's bf16 check,
    ``model_management.should_use_bf16``, says no: Pascal/Turing and older, or ComfyUI was told to use fp32) and
    how to pick fp16."""
    return (f"[Ovis-U1] dtype auto: fp32 on {device}, because ComfyUI does not use bf16 on it (a GPU without bf16, "
            "e.g. Pascal or Turing, or --force-fp32): the weights take twice the memory of bf16 (about 14 GB for "
            "Ovis-U1-3B). To halve that, set the Model Loader's dtype to fp16 (if an image comes out black or with "
            "NaN, go back to fp32)")


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a part computes in: that of its first floating parameter not stored in fp8.

    With fp8 storage only the matrices of cast-capable layers are fp8; biases and norm weights keep the compute
    dtype (see :func:`ovis_u1.model.load_model`), so every part has such a parameter.
    """
    first = None
    for p in module.parameters():
        if not p.is_floating_point():
            continue
        if first is None:
            first = p.dtype
        if not is_fp8(p.dtype):
            return p.dtype
    if first is None:
        raise ValueError(f"{type(module).__name__} has no floating parameters")
    return torch.bfloat16 if is_fp8(first) else first


@dataclass(frozen=True)
class WeightStorage:
    """A weight-storage choice: the dtype the matrices are stored in (None: the compute dtype) and whether each
    matrix carries a scale (:mod:`ovis_u1.fp8`)."""

    dtype: torch.dtype | None = None
    scaled: bool = False


def parse_weight_storage(value) -> WeightStorage:
    """None / "default" → the compute dtype; a name of :data:`WEIGHT_DTYPES` or an fp8 torch dtype → that storage.

    Raises ``OvisU1InputError`` naming the choices for anything else.
    """
    if isinstance(value, WeightStorage):
        return value
    if value is None or value in FP8_DTYPES:
        return WeightStorage(value)
    if isinstance(value, str) and value in WEIGHT_DTYPES:
        return WeightStorage(WEIGHT_DTYPES[value], scaled=value == SCALED_FP8)
    raise OvisU1InputError(
        f"weight_dtype {value!r} is unknown: use one of {', '.join(WEIGHT_DTYPES)} "
        "(fp8 stores the LLM, visual encoder and MMDiT weights in 8 bits, the _scaled one with a scale per matrix; "
        "the VAE never)"
    )


def parse_weight_dtype(value) -> torch.dtype | None:
    """The dtype :func:`parse_weight_storage` stores the matrices in."""
    return parse_weight_storage(value).dtype


# ---------------------------------------------------------------------------------------------------------------------
# The headless manual-cast namespace
# ---------------------------------------------------------------------------------------------------------------------

class CastWeights:
    """Marker: the layer casts its stored weights to the input's dtype/device in ``forward`` (fp8 storage is safe).
    Its weight may come with a scale (scaled fp8, :mod:`ovis_u1.fp8`), kept as the ``weight_scale`` buffer."""

    casts_weights = True

    def _load_from_state_dict(self, state_dict, prefix, *args):
        scale = fp8.pop_scale(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)
        if scale is not None:
            self.register_buffer(fp8.SCALE_KEY, scale)


class manual_cast:  # noqa: N801 — a namespace, named like torch.nn and comfy.ops.manual_cast
    """torch.nn layers whose forward casts weight and bias to the input's dtype and device."""

    class Linear(CastWeights, nn.Linear):
        def forward(self, x: Tensor) -> Tensor:
            return F.linear(x, cast_weight(self, x), cast_like(self.bias, x))

    class Conv2d(CastWeights, nn.Conv2d):
        def forward(self, x: Tensor) -> Tensor:
            return self._conv_forward(x, cast_weight(self, x), cast_like(self.bias, x))

    class GroupNorm(CastWeights, nn.GroupNorm):
        def forward(self, x: Tensor) -> Tensor:
            return F.group_norm(x, self.num_groups, cast_like(self.weight, x), cast_like(self.bias, x), self.eps)

    class LayerNorm(CastWeights, nn.LayerNorm):
        def forward(self, x: Tensor) -> Tensor:
            return F.layer_norm(x, self.normalized_shape, cast_like(self.weight, x), cast_like(self.bias, x),
                                self.eps)

    class RMSNorm(CastWeights, nn.RMSNorm):
        def forward(self, x: Tensor) -> Tensor:
            return F.rms_norm(x, self.normalized_shape, cast_like(self.weight, x), self.eps)

    class Embedding(CastWeights, nn.Embedding):
        """Looks rows up in the stored dtype, then casts only the rows to ``out_dtype``.

        An index tensor carries no dtype to follow, so an fp8 table returns ``compute_dtype`` (set by
        :func:`ovis_u1.model.load_model` to the loader's dtype; bf16 if unset) unless ``out_dtype`` is given.
        """

        compute_dtype: torch.dtype | None = None

        def forward(self, ids: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
            weight = self.weight
            if weight.device != ids.device:
                weight = weight.to(ids.device)
            rows = F.embedding(ids, weight, self.padding_idx, self.max_norm, self.norm_type,
                               self.scale_grad_by_freq, self.sparse)
            if out_dtype is None and is_fp8(rows.dtype):
                out_dtype = self.compute_dtype or torch.bfloat16
            scale = getattr(self, fp8.SCALE_KEY, None)
            if scale is not None:  # one scale per tensor, or one per row (per_channel)
                return fp8.dequantize(rows, scale if scale.dim() == 0 else F.embedding(ids, scale.to(ids.device)),
                                      out_dtype)
            return rows if out_dtype is None else rows.to(out_dtype)


def casts_weights(layer: nn.Module) -> bool:
    """Whether ``layer`` casts its weights at use: the pack's manual cast, or ComfyUI's (``comfy_cast_weights``)."""
    return bool(getattr(layer, "casts_weights", False) or getattr(layer, "comfy_cast_weights", False))
