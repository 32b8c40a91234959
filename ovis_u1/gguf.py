"""GGUF Ovis-U1 folders: weights that stay quantized in memory and are dequantized, in torch, inside each layer's cast.

A GGUF folder is an Ovis-U1 checkpoint folder (config.json, tokenizer files) whose LLM, visual encoder, visual
embedding table and MMDiT weights are one ``.gguf`` file (:data:`GGUF_NAME`, written by ``python -m ovis_u1
quantize``: :mod:`ovis_u1.quantize`) and whose VAE is an fp32 safetensors file beside it (:data:`VAE_NAME`). The GGUF
tensors carry the checkpoint's own tensor names, so the architecture's key checks apply as to safetensors; the file's
metadata names the architecture (:data:`ARCHITECTURE`) and the pack's format version (:data:`FORMAT_KEY`).

A quantized matrix is held as its raw GGML blocks — a uint8 tensor [rows, bytes per row] — in the layer's ``weight``,
with a :class:`Quantization` (GGML type, logical shape) on the layer. Layers of the namespace :func:`gguf_operations`
builds dequantize it to the activation's dtype on the activation's device each time they use it. Block layouts: ggml's
``ggml-common.h`` (block_q4_0 … block_q6_K), as the ``gguf`` package's ``gguf/quants.py`` reads them in numpy; the
torch code here computes in fp32 in the same order, so it equals that reader to the bit (tests/test_gguf.py).
The ``gguf`` package (llama.cpp's gguf-py) is optional: it is imported only where a file is read or written.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import GGUF_VAE_FILE, CheckpointError, TIED_KEYS, _all_finite, _names, non_finite_error, validate_keys
from .operations import cast_like, cast_weights_of, every_op_of

ARCHITECTURE = "ovis_u1"  # general.architecture of the pack's GGUF files
FORMAT_KEY = "ovis_u1.format_version"
FORMAT_VERSION = 1  # the layout this module reads: names, policy and VAE beside
GGUF_NAME = "model.gguf"
VAE_NAME = GGUF_VAE_FILE
VAE_PREFIX = "visual_generator.vae."
INSTALL_HINT = "pip install gguf (llama.cpp's GGUF reader, an optional dependency of the pack)"

# GGML type numbers (ggml.h, enum ggml_type; gguf-py: GGMLQuantizationType) → (values per block, bytes per block)
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30
BLOCKS = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22), Q5_1: (32, 24),
          Q8_0: (32, 34), Q4_K: (256, 144), Q5_K: (256, 176), Q6_K: (256, 210)}
TYPE_NAMES = {F32: "F32", F16: "F16", BF16: "BF16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q5_1: "Q5_1",
              Q8_0: "Q8_0", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K"}
DENSE = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}  # plain arrays: loaded as dense tensors


# ---------------------------------------------------------------------------------------------------------------------
# Dequantization (torch)
# ---------------------------------------------------------------------------------------------------------------------

def _half(blocks: Tensor, start: int) -> Tensor:
    """The fp16 at byte ``start`` of every block, as fp32 [n, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> Tensor:
    """Bytes [n, k] → 4-bit values [n, 2k]: the low nibbles first, then the high ones (the q4/q5 layouts)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(qh: Tensor, count: int) -> Tensor:
    """Little-endian bytes [n, count/8] → their bits [n, count] (bit j of the word = value j's high bit)."""
    shifts = torch.arange(8, device=qh.device, dtype=torch.uint8)
    return ((qh[:, :, None] >> shifts) & 1).reshape(qh.shape[0], count)


def _q8_0(b: Tensor) -> Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _half(b, 0)


def _q4_0(b: Tensor) -> Tensor:
    return _half(b, 0) * (_nibbles(b[:, 2:]).float() - 8)


def _q4_1(b: Tensor) -> Tensor:
    return _half(b, 0) * _nibbles(b[:, 4:]).float() + _half(b, 2)


def _q5_0(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 6:]) | (_bits(b[:, 2:6], 32) << 4)
    return _half(b, 0) * (q.float() - 16)


def _q5_1(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 8:]) | (_bits(b[:, 4:8], 32) << 4)
    return _half(b, 0) * q.float() + _half(b, 2)


def _k_scales(scales: Tensor) -> tuple[Tensor, Tensor]:
    """The eight 6-bit scales and mins [n, 8] packed in 12 bytes (ggml-quants.c, get_scale_min_k4): sub-blocks 0–3
    in the low 6 bits of bytes 0–3 (scales) and 4–7 (mins); 4–7 in the nibbles of bytes 8–11 with their top two bits
    in the top bits of bytes 0–3 / 4–7."""
    low, mid, high = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([low & 0x3F, (high & 0x0F) | ((low >> 6) << 4)], dim=-1)
    mins = torch.cat([mid & 0x3F, (high >> 4) | ((mid >> 6) << 4)], dim=-1)
    return sc.float(), mins.float()


def _k_quads(qs: Tensor) -> Tensor:
    """128 bytes → 8 sub-blocks [n, 8, 32] of 4-bit values: each 32-byte chunk holds two sub-blocks, low nibbles
    first."""
    chunks = qs.reshape(qs.shape[0], 4, 1, 32)
    return torch.cat([chunks & 0x0F, chunks >> 4], dim=2).reshape(qs.shape[0], 8, 32)


def _q4_k(b: Tensor) -> Tensor:
    sc, mins = _k_scales(b[:, 4:16])
    q = _k_quads(b[:, 16:144]).float()
    d, dmin = (_half(b, 0) * sc)[:, :, None], (_half(b, 2) * mins)[:, :, None]
    return (d * q - dmin).reshape(-1, 256)


def _q5_k(b: Tensor) -> Tensor:
    sc, mins = _k_scales(b[:, 4:16])
    high = (b[:, None, 16:48] >> torch.arange(8, device=b.device, dtype=torch.uint8)[None, :, None]) & 1
    q = (_k_quads(b[:, 48:176]) | (high << 4)).float()
    d, dmin = (_half(b, 0) * sc)[:, :, None], (_half(b, 2) * mins)[:, :, None]
    return (d * q - dmin).reshape(-1, 256)


def _q6_k(b: Tensor) -> Tensor:
    """Two halves of 128 values; each takes 64 bytes of low nibbles (ql) and 32 bytes of 2-bit highs (qh): value l of
    quarter k (k = 0…3) is nibble (k // 2) of ql[l + 32·(k % 2)] with bits 2k…2k+1 of qh[l]; one int8 scale per 16."""
    n = b.shape[0]
    ql, qh = b[:, :128].reshape(n, 2, 64), b[:, 128:192].reshape(n, 2, 32)
    low = [ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4]
    q = torch.stack([lo | (((qh >> (2 * k)) & 3) << 4) for k, lo in enumerate(low)], dim=2)
    q = (q.to(torch.int8) - 32).float().reshape(n, 16, 16)
    scale = b[:, 192:208].contiguous().view(torch.int8).float() * _half(b, 208)
    return (scale[:, :, None] * q).reshape(-1, 256)


# Byte offsets of each block's fp16 scale / min: a NaN or inf there makes every value of the block NaN/inf.
_SCALE_OFFSETS = {Q8_0: (0,), Q4_0: (0,), Q4_1: (0, 2), Q5_0: (0,), Q5_1: (0, 2), Q4_K: (0, 2), Q5_K: (0, 2),
                  Q6_K: (208,)}


def scales_finite(raw: Tensor, qtype: int) -> bool:
    """Whether every block's fp16 scales are finite (the int parts of a block are finite by construction)."""
    blocks = raw.reshape(-1, BLOCKS[qtype][1])
    return all(_all_finite(_half(blocks, at)) for at in _SCALE_OFFSETS[qtype])


_DEQUANTIZERS = {Q8_0: _q8_0, Q4_0: _q4_0, Q4_1: _q4_1, Q5_0: _q5_0, Q5_1: _q5_1, Q4_K: _q4_k, Q5_K: _q5_k,
                 Q6_K: _q6_k}
TORCH_TYPES = frozenset(_DEQUANTIZERS) | frozenset(DENSE)  # the types dequantized here


def dequantize(raw: Tensor, qtype: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Raw GGML data (uint8, any shape with the bytes of ``shape`` in ``qtype``) → a ``dtype`` tensor of ``shape``
    on raw's device (computed in fp32, as gguf-py's numpy reader computes)."""
    if qtype in DENSE:
        return raw.contiguous().view(DENSE[qtype]).reshape(shape).to(dtype)
    block_values, block_bytes = BLOCKS[qtype]
    values = _DEQUANTIZERS[qtype](raw.reshape(-1, block_bytes))
    return values.reshape(shape).to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Quantized layers
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Quantization:
    """What a layer's raw ``weight`` holds: GGML ``qtype`` blocks of a ``shape`` matrix, computed in ``dtype``."""

    qtype: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def quantization(layer: nn.Module) -> Quantization | None:
    """The layer's :class:`Quantization` while its weight is raw blocks; None once a host has replaced the weight
    with a dense one (ComfyUI's patcher stores a LoRA-patched weight dense: :meth:`QuantizedLayer.set_weight`)."""
    q = getattr(layer, "gguf_quantization", None)
    weight = getattr(layer, "weight", None)
    return q if q is not None and isinstance(weight, Tensor) and weight.dtype == torch.uint8 else None


def set_quantized(layer: nn.Module, raw: Tensor, q: Quantization) -> None:
    layer.weight = nn.Parameter(raw, requires_grad=False)
    layer.gguf_quantization = q


def dequantized(layer: nn.Module, raw: Tensor, dtype: torch.dtype) -> Tensor:
    """``raw`` (the layer's blocks, already on the compute device) as the layer's dense weight in ``dtype``."""
    q = layer.gguf_quantization
    return dequantize(raw, q.qtype, q.shape, dtype)


@contextlib.contextmanager
def cast_quantized_weights(layer: nn.Module, like: Tensor):
    """(weight, bias) of a quantized layer on like's device in like's dtype: the blocks are moved, then dequantized
    there. The headless cast; a host's namespace may bring its own (``cast_quantized_weights``)."""
    yield dequantized(layer, layer.weight.to(like.device), like.dtype), cast_like(getattr(layer, "bias", None), like)


class QuantizedLayer:
    """Mixin of the GGUF namespace's Linear and Embedding: a quantized weight goes through the namespace's cast.

    ``convert_weight`` / ``set_weight`` are the hooks ComfyUI's ModelPatcher looks up per weight (comfy/model_patcher.py
    ``get_key_weight``, used by ``patch_weight_to_device`` when it merges a LoRA into a fully loaded layer): the raw
    blocks, which it has cast to a float dtype, are dequantized before the patch is added, and the patched weight is
    kept dense (in the compute dtype) until the patcher restores its backup of the blocks."""

    def convert_weight(self, weight: Tensor, inplace: bool = False) -> Tensor:
        q = getattr(self, "gguf_quantization", None)
        if q is None or tuple(weight.shape) == tuple(q.shape):
            return weight
        return dequantize(weight.to(torch.uint8), q.qtype, q.shape, weight.dtype)

    def set_weight(self, weight: Tensor, inplace_update: bool = False, seed: int = 0, return_weight: bool = False):
        q = getattr(self, "gguf_quantization", None)
        weight = weight.to(q.dtype if q is not None else self.weight.dtype)
        if return_weight:
            return weight
        self.weight = nn.Parameter(weight, requires_grad=False)
        return None


def gguf_operations(operations):
    """``operations`` (a layer namespace class) with Linear and Embedding that hold GGUF-quantized weights. A
    quantized weight is read through ``operations.cast_quantized_weights`` where the namespace has one (the ComfyUI
    bridge's: streamed, LoRA-patched after dequantization) or :func:`cast_quantized_weights`; every other weight and
    layer is the namespace's own."""
    quantized_cast = getattr(operations, "cast_quantized_weights", cast_quantized_weights)
    dense_cast = cast_weights_of(operations)
    every_op = every_op_of(operations)

    @contextlib.contextmanager
    def cast_weights(layer: nn.Module, like: Tensor):
        with (quantized_cast if quantization(layer) is not None else dense_cast)(layer, like) as weights:
            yield weights

    class Linear(QuantizedLayer, operations.Linear):
        def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
            if quantization(self) is None:
                return super().forward(x, *args, **kwargs)
            every_op()
            with quantized_cast(self, x) as (weight, bias):
                return F.linear(x, weight, bias)

    class Embedding(QuantizedLayer, operations.Embedding):
        def forward(self, ids: Tensor, out_dtype: torch.dtype | None = None, **kwargs) -> Tensor:
            q = quantization(self)
            if q is None:
                return super().forward(ids, **({} if out_dtype is None else {"out_dtype": out_dtype}), **kwargs)
            every_op()
            dtype = out_dtype or q.dtype
            if quantized_cast is cast_quantized_weights:  # headless: only the rows looked up are dequantized
                rows = self.weight[ids.reshape(-1).to(self.weight.device)].to(ids.device)
                return dequantize(rows, q.qtype, (*ids.shape, q.shape[-1]), dtype)
            with quantized_cast(self, torch.empty(0, device=ids.device, dtype=dtype)) as (weight, _):
                return F.embedding(ids, weight, self.padding_idx)

    names = {"Linear": Linear, "Embedding": Embedding, "cast_weights": staticmethod(cast_weights)}
    return type(f"GGUF{operations.__name__}", (operations,), names)


# ---------------------------------------------------------------------------------------------------------------------
# Reading a GGUF folder
# ---------------------------------------------------------------------------------------------------------------------

def import_gguf(path: Path | None = None):
    """The ``gguf`` package, or a CheckpointError that says how to install it."""
    try:
        import gguf  # optional dependency: only GGUF folders need it
    except ImportError as e:
        where = f" ({path})" if path is not None else ""
        raise CheckpointError(f"this model folder holds GGUF weights{where}, which need the gguf package: "
                              f"{INSTALL_HINT}; then load it again") from e
    return gguf


def gguf_file(directory: str | Path) -> Path | None:
    """The GGUF weight file of a checkpoint folder, or None for a safetensors folder."""
    found = sorted(Path(directory).glob("*.gguf"))
    if len(found) > 1:
        raise CheckpointError(f"model folder {str(directory)!r} holds {len(found)} GGUF files "
                              f"({_names([f.name for f in found])}); keep one ({GGUF_NAME}) per folder")
    return found[0] if found else None


def _field(reader, key: str):
    """A scalar or string metadata value of the open file, or None (read from the raw parts, which every gguf-py
    version has)."""
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    value = field.parts[field.data[0]]
    if value.dtype.kind == "u" and value.dtype.itemsize == 1 and len(field.types) == 1 and int(field.types[0]) == 8:
        return bytes(value).decode("utf-8", "replace")  # GGUFValueType.STRING
    return value[0].item() if len(value) else None


@dataclass
class StoredTensor:
    name: str
    qtype: int
    shape: tuple[int, ...]  # logical, in torch order
    data: object  # numpy array over the mapped file: raw bytes (block types, BF16) or values (F32, F16)


def read_gguf(path: Path) -> list[StoredTensor]:
    """The tensors of an Ovis-U1 GGUF file (a map of the file; nothing is read yet), its metadata checked.

    A file that gguf-py cannot parse (cut short, corrupt) or that another model's converter wrote is a
    CheckpointError naming the file and what is wrong."""
    gguf = import_gguf(path)
    try:
        reader = gguf.GGUFReader(path, "c")  # private copy-on-write map: torch views it without a copy
        tensors = list(reader.tensors)
    except PermissionError as e:
        raise CheckpointError(f"cannot read {path}: permission denied; make the file readable (e.g. chmod a+r)") from e
    except (ValueError, OSError, IndexError, KeyError, TypeError, OverflowError) as e:
        raise CheckpointError(f"cannot read {path} as GGUF ({e}); the file is truncated or corrupt — convert or "
                              "download it again") from e
    architecture = _field(reader, "general.architecture")
    if architecture != ARCHITECTURE:
        raise CheckpointError(
            f"{path} is a GGUF file of another model (general.architecture {architecture!r}, not {ARCHITECTURE!r}); "
            "an Ovis-U1 GGUF folder is made from an Ovis-U1 download with 'python -m ovis_u1 quantize'")
    version = _field(reader, FORMAT_KEY)
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{path} has {FORMAT_KEY} {version!r}; this pack reads format {FORMAT_VERSION}: "
                              "update the pack, or convert the model again with this one")
    return [StoredTensor(t.name, int(t.tensor_type), tuple(int(n) for n in reversed(t.shape.tolist())), t.data)
            for t in tensors]


def _dense(stored: StoredTensor, gguf) -> tuple[Tensor, bool]:
    """A stored tensor as a dense torch tensor in its stored dtype (a view of the map where it can be), and whether
    the numpy fallback made it."""
    if stored.qtype in DENSE:
        return torch.from_numpy(stored.data).view(DENSE[stored.qtype]).reshape(stored.shape), False
    values = gguf.quants.dequantize(stored.data, gguf.GGMLQuantizationType(stored.qtype))
    return torch.from_numpy(values).reshape(stored.shape), True


def _quantizable_layer(module: nn.Module, key: str) -> nn.Module | None:
    owner, _, name = key.rpartition(".")
    try:
        layer = module.get_submodule(owner)
    except AttributeError:
        return None
    return layer if name == "weight" and isinstance(layer, QuantizedLayer) else None


def load_gguf_weights(module: nn.Module, path: Path, device: torch.device, dtype_for, expected: dict) -> None:
    """The GGUF file's tensors into ``module`` (its non-VAE keys, checked against ``expected``, key → shape):
    block-quantized matrices of the types :data:`TORCH_TYPES` names stay raw blocks on ``device`` (dequantized at
    use); F32/F16/BF16 tensors are converted to ``dtype_for(key, stored dtype)``; any other type gguf-py reads is
    dequantized once here with its numpy reader (a console line says so). NaN/inf in a dense tensor or in a block's
    scales is a CheckpointError naming it."""
    gguf = import_gguf(path)
    tensors = read_gguf(path)
    expected = {k: tuple(s) for k, s in expected.items() if not k.startswith(VAE_PREFIX) and k not in TIED_KEYS}
    validate_keys(expected, {t.name: (t.shape, path) for t in tensors})
    dense, corrupt, fallback = {}, [], {}
    for t in tensors:
        layer = _quantizable_layer(module, t.name)
        if t.qtype in _DEQUANTIZERS:
            if layer is None:
                raise CheckpointError(f"{path} stores {t.name!r} quantized ({TYPE_NAMES[t.qtype]}), but only the "
                                      "weights of linear and embedding layers may be; convert the model again")
            raw = torch.from_numpy(t.data).to(device)
            dtype = dtype_for(t.name, torch.bfloat16)
            if not scales_finite(raw, t.qtype):
                corrupt.append(t.name)
            set_quantized(layer, raw, Quantization(t.qtype, t.shape, dtype))
            continue
        try:
            tensor, numpy_made = _dense(t, gguf)
        except (NotImplementedError, ValueError) as e:
            raise CheckpointError(f"{path} stores {t.name!r} as GGML type {t.qtype}, which the installed gguf package "
                                  f"cannot read ({e}); update it (pip install -U gguf)") from e
        if numpy_made:
            fallback.setdefault(gguf.GGMLQuantizationType(t.qtype).name, []).append(t.name)
        if not _all_finite(tensor):
            corrupt.append(t.name)
        dense[t.name] = tensor.to(device=device, dtype=dtype_for(t.name, tensor.dtype))
    if corrupt:
        raise non_finite_error(corrupt, [], path.parent)
    for name, keys in fallback.items():
        print(f"[Ovis-U1] {path.name}: {len(keys)} tensor(s) of type {name} have no torch dequantizer in this pack; "
              f"dequantized once at load with gguf-py's numpy reader (they take the compute dtype's memory)")
    result = module.load_state_dict(dense, strict=False, assign=True)
    if result.unexpected_keys:  # validate_keys makes this unreachable; keep it explicit
        raise CheckpointError(f"weights not assigned: {_names(list(result.unexpected_keys))}")
