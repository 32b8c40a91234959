"""``python -m ovis_u1 quantize MODEL_DIR OUT_DIR --type Q8_0``: an Ovis-U1 download → a GGUF folder (:mod:`ovis_u1.gguf`).

What is quantized (:func:`plan`): the matrices of the linear and embedding layers of the LLM, the visual encoder,
the visual embedding table and the MMDiT — the weights fp8 storage stores in 8 bits (``ovis_u1.model.fp8_keys``),
by the same rules. Everything else keeps the checkpoint's own precision (F32 stays F32, BF16 stays BF16):

- norm weights, biases, free parameters (positional tables, the cls token) and convolutions: a negligible share of
  the bytes, and the values most sensitive to rounding;
- the matrices :data:`ovis_u1.model.FP8_KEPT_OUT` keeps (the MMDiT's pooled-vector path, text input and final
  layer: measured the most sensitive, and 0.7 % of the bytes);
- the LLM's token table (:data:`ovis_u1.model.FP8_TOKEN_TABLE`): every generated token reads all of it as the tied
  LM head, which a block type would dequantize in full at each token (README, "Smaller weights", measures it);
- a matrix whose row length is not a multiple of the type's block (32 values).

``--type BF16`` stores every one of those matrices in BF16 — the token table and the kept ones too: it is the input
llama.cpp's ``llama-quantize`` would start from (README). The VAE is written beside the GGUF as fp32 safetensors.
Nothing is overwritten: OUT_DIR must not exist or be empty.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import gguf as g
from .checkpoint import CheckpointError, TIED_KEYS, check_directory, stored_shapes, validate_keys, weight_files
from .config import load_params
from .model import FP8_KEPT_OUT, FP8_PARTS, FP8_TOKEN_TABLE, OvisU1, OvisU1InputError, architecture_shapes
from .vae import legacy_vae_key

TYPES = {"Q8_0": g.Q8_0, "Q5_1": g.Q5_1, "Q5_0": g.Q5_0, "Q4_1": g.Q4_1, "Q4_0": g.Q4_0, "BF16": g.BF16}
_KEEP = {torch.float32: g.F32, torch.float16: g.F16, torch.bfloat16: g.BF16}  # a kept tensor's type: its own
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


@dataclass(frozen=True)
class Entry:
    key: str  # the stored name
    shape: tuple[int, ...]
    qtype: int


def layer_matrices(params) -> set[str]:
    """The weight keys of the linear and embedding layers (the model built with torch.nn on the meta device)."""
    with torch.device("meta"):
        model = OvisU1(params)
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}


def target_type(key: str, shape: tuple[int, ...], stored: torch.dtype, qtype: int, matrices: set[str]) -> int:
    """The GGML type ``key`` is written in under ``--type qtype`` (the policy of the module docstring)."""
    keep = _KEEP[stored]
    if key not in matrices or not key.startswith(FP8_PARTS) or len(shape) != 2:
        return keep
    if qtype == g.BF16:
        return g.BF16
    if key in FP8_KEPT_OUT or key == FP8_TOKEN_TABLE or shape[-1] % g.BLOCKS[qtype][0]:
        return keep
    return qtype


def plan(model_dir: Path, qtype: int) -> tuple[list[Entry], list[str], dict[str, Path]]:
    """(GGUF entries, VAE keys, key → file) of a checkpoint folder, its keys checked against its architecture."""
    params = load_params(model_dir)
    on_disk = stored_shapes(weight_files(model_dir))
    expected = {k: s for k, s in architecture_shapes(params).items()
                if not k.startswith(g.VAE_PREFIX) and k not in TIED_KEYS}  # the VAE is checked when it is loaded
    validate_keys(expected, {k: v for k, v in on_disk.items() if not legacy_vae_key(k).startswith(g.VAE_PREFIX)})
    matrices = layer_matrices(params)
    entries, vae = [], []
    for key, (shape, path) in on_disk.items():
        if legacy_vae_key(key).startswith(g.VAE_PREFIX):
            vae.append(key)
            continue
        with safe_open(str(path), "pt") as f:
            stored = f.get_slice(key).get_dtype()
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(stored)
        if dtype is None:
            raise CheckpointError(f"{key!r} in {path} is {stored}; the converter reads F32/F16/BF16 checkpoints")
        entries.append(Entry(key, shape, target_type(key, shape, dtype, qtype, matrices)))
    return entries, vae, {k: p for k, (_, p) in on_disk.items()}


def encode(tensor: torch.Tensor, qtype: int, gguf) -> np.ndarray:
    """A tensor as the array gguf-py writes for ``qtype`` (bytes for block types and BF16)."""
    if qtype == g.BF16 and tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.uint8).numpy()
    if qtype in (g.F32, g.F16):
        return tensor.to(g.DENSE[qtype]).numpy()
    return gguf.quants.quantize(tensor.float().numpy(), gguf.GGMLQuantizationType(qtype))


class Progress:
    """tqdm where installed, else a line per 10 %."""

    def __init__(self, total: int, what: str):
        try:
            from tqdm import tqdm  # optional: only a nicer bar
            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=what)
        except ImportError:
            self.bar, self.total, self.done, self.shown, self.what = None, total, 0, -1, what

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)
            return
        self.done += n
        tenth = 10 * self.done // max(1, self.total)
        if tenth != self.shown:
            self.shown = tenth
            print(f"{self.what}: {10 * tenth} %", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def check_output(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OvisU1InputError(f"output folder {str(out_dir)!r} exists and is not empty: the converter overwrites "
                               "nothing — choose a new folder or empty this one")


def quantize(model_dir: str | Path, out_dir: str | Path, type_name: str = "Q8_0", progress: bool = True) -> Path:
    """Write the GGUF folder of ``model_dir`` to ``out_dir`` (see the module docstring); returns the GGUF path."""
    if type_name not in TYPES:
        raise OvisU1InputError(f"--type {type_name!r} is unknown: use one of {', '.join(TYPES)}")
    gguf = g.import_gguf()
    model_dir, out_dir = check_directory(model_dir), Path(out_dir)
    check_output(out_dir)
    entries, vae_keys, files = plan(model_dir, TYPES[type_name])
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():  # config, tokenizer and preprocessor files
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and not item.name.startswith("."):
            shutil.copy2(item, out_dir / item.name)
    vae = {}
    for key in vae_keys:
        with safe_open(str(files[key]), "pt") as f:
            vae[key] = f.get_tensor(key).float().contiguous()
    save_file(vae, str(out_dir / g.VAE_NAME))
    shutil.copymode(model_dir / "config.json", out_dir / g.VAE_NAME)  # readable as the downloaded files are
    path = out_dir / g.GGUF_NAME
    write_gguf(path, entries, files, type_name, gguf, progress)
    return path


def write_gguf(path: Path, entries: list[Entry], files: dict[str, Path], type_name: str, gguf, progress: bool) -> None:
    """The tensors in the order of ``entries``, quantized one at a time (memory: one tensor and its encoding)."""
    writer = gguf.GGUFWriter(str(path), g.ARCHITECTURE)
    writer.add_uint32(g.FORMAT_KEY, g.FORMAT_VERSION)
    writer.add_string("general.name", "Ovis-U1")
    writer.add_string("ovis_u1.weight_type", type_name)
    sizes = []
    for e in entries:
        values, nbytes = g.BLOCKS[e.qtype]
        size = int(np.prod(e.shape)) // values * nbytes
        sizes.append(size)
        if e.qtype in (g.F32, g.F16):
            writer.add_tensor_info(e.key, e.shape, np.dtype(np.float32 if e.qtype == g.F32 else np.float16), size)
        else:
            byte_shape = (*e.shape[:-1], e.shape[-1] // values * nbytes)
            writer.add_tensor_info(e.key, byte_shape, np.dtype(np.uint8), size,
                                   raw_dtype=gguf.GGMLQuantizationType(e.qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    bar = Progress(sum(sizes), f"{path.name} ({type_name})") if progress else None
    for e, size in zip(entries, sizes):
        with safe_open(str(files[e.key]), "pt") as f:
            array = encode(f.get_tensor(e.key), e.qtype, gguf)
        writer.write_tensor_data(array)
        if bar is not None:
            bar.update(size)
    if bar is not None:
        bar.close()
    writer.close()
