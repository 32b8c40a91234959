"""GGUF folders (ovis_u1.gguf, ovis_u1.quantize): the torch dequantizers equal gguf-py's numpy reader, a converted tiny
model renders the goldens within a stated bound, bad files and folders are named, the converter overwrites nothing.

The GGUF fixtures are made here by the converter from the tiny golden checkpoint (nothing binary is committed)."""

from __future__ import annotations

import shutil
import sys

import gguf  # an optional dependency of the pack, installed by its "test" extra
import numpy as np
import pytest
import torch

import ovis_u1
from ovis_u1 import gguf as g
from ovis_u1.checkpoint import CheckpointError, find_model_dirs
from ovis_u1.model import FP8_KEPT_OUT, FP8_TOKEN_TABLE
from ovis_u1.quantize import quantize
from tests.golden import CHECKPOINT, case_params, requires_golden, tensors
from tests.test_model import edit_input

BLOCK_TYPES = [g.Q8_0, g.Q5_1, g.Q5_0, g.Q4_1, g.Q4_0]  # the converter's block types: gguf-py quantizes them
K_TYPES = [g.Q4_K, g.Q5_K, g.Q6_K]  # made by llama.cpp only: checked on random blocks
# Q8_0 stores each weight as an int8 step of its 32-value block's max/127 (≤ 0.4 % of that max). On the tiny golden
# model the 64² images move by 0.53 (t2i) and 0.6 (edit) uint8 levels on average, at most 4; the bound leaves room for
# other CPUs' rounding, and stays far below what a broken dequantizer gives (Q4_0: 11.7 levels mean, 84 max).
Q8_MEAN_LEVELS, Q8_MAX_LEVELS = 1.5, 12


@pytest.fixture(scope="module")
def q8_folder(tmp_path_factory):
    return quantize(CHECKPOINT, tmp_path_factory.mktemp("gguf") / "tiny_q8", "Q8_0", progress=False).parent


def _numpy_dequant(data: np.ndarray, qtype: int) -> np.ndarray:
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType(qtype))


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: g.TYPE_NAMES[t])
def test_torch_dequantizer_equals_gguf_numpy(qtype):
    values = np.random.default_rng(qtype).standard_normal((6, 256)).astype(np.float32) * 0.05
    raw = gguf.quants.quantize(values, gguf.GGMLQuantizationType(qtype))
    ours = g.dequantize(torch.from_numpy(raw), qtype, (6, 256), torch.float32)
    assert torch.equal(ours, torch.from_numpy(_numpy_dequant(raw, qtype)))


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: g.TYPE_NAMES[t])
def test_torch_k_quant_dequantizer_equals_gguf_numpy(qtype):
    """Random bytes are valid K-quant blocks wherever the fp16 scales are finite numbers."""
    block_bytes = g.BLOCKS[qtype][1]
    raw = np.random.default_rng(qtype).integers(0, 256, (4, 3 * block_bytes), dtype=np.uint8)
    blocks = raw.reshape(-1, block_bytes)
    scales = np.random.default_rng(1).uniform(-0.01, 0.01, (blocks.shape[0], 2)).astype(np.float16).view(np.uint8)
    for i, at in enumerate(g._SCALE_OFFSETS[qtype]):
        blocks[:, at : at + 2] = scales[:, 2 * i : 2 * i + 2]
    ours = g.dequantize(torch.from_numpy(raw), qtype, (4, 768), torch.float32)
    assert torch.equal(ours, torch.from_numpy(_numpy_dequant(raw, qtype)))


@pytest.mark.parametrize("qtype", [g.BF16, g.F16], ids=["BF16", "F16"])
def test_dense_types_equal_gguf_numpy(qtype):
    values = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    raw = gguf.quants.quantize(values, gguf.GGMLQuantizationType(qtype))
    raw = raw.view(np.uint8) if raw.dtype != np.uint8 else raw
    ours = g.dequantize(torch.from_numpy(raw.copy()), qtype, (3, 64), torch.float32)
    assert torch.equal(ours, torch.from_numpy(_numpy_dequant(raw, qtype).reshape(3, 64)))


def test_converter_policy_and_folder(q8_folder):
    """Matrices of the quantized parts become Q8_0; the kept-out layers, the token table, norms, biases and matrices
    whose rows are not whole blocks keep the checkpoint's F32; the VAE is safetensors beside; the loader lists it."""
    reader = gguf.GGUFReader(q8_folder / g.GGUF_NAME)
    types = {t.name: int(t.tensor_type) for t in reader.tensors}
    assert not any(k.startswith(g.VAE_PREFIX) for k in types)
    assert types[FP8_TOKEN_TABLE] == g.F32
    assert all(types[k] == g.F32 for k in FP8_KEPT_OUT)
    assert types["llm.model.layers.0.mlp.down_proj.weight"] == g.Q8_0
    assert types["llm.model.norm.weight"] == g.F32
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    assert all(types[k] == g.F32 for k, s in shapes.items() if len(s) == 2 and s[0] % 32)  # ggml order: row first
    assert (q8_folder / g.VAE_NAME).is_file() and (q8_folder / "tokenizer.json").is_file()
    assert q8_folder in find_model_dirs([q8_folder.parent])


@requires_golden
def test_q8_0_renders_the_goldens_within_the_bound(q8_folder):
    model = ovis_u1.load_model(q8_folder, device="cpu", dtype=torch.float32)
    quantized = [m for m in model.modules() if g.quantization(m) is not None]
    assert len(quantized) > 50 and all(m.weight.dtype == torch.uint8 for m in quantized)  # blocks stay in memory
    p = case_params("t2i")
    t2i = model.text_to_image(p["prompt"], p["width"], p["height"], steps=p["steps"], txt_cfg=p["txt_cfg"],
                              seed=p["seed"])
    _assert_near(t2i, tensors("t2i")["output_image_uint8"], "t2i")
    p = case_params("edit")
    edited = model.edit(edit_input(), p["prompt"], steps=p["steps"], img_cfg=p["img_cfg"], txt_cfg=p["txt_cfg"],
                        seed=p["seed"], context_seed=p["vae_sample_seed"])
    _assert_near(edited, tensors("edit")["output_image_uint8"], "edit")


def _assert_near(image, golden: torch.Tensor, name: str) -> None:
    diff = (torch.as_tensor(np.array(image)).int() - golden.int()).abs().float()
    assert diff.mean() <= Q8_MEAN_LEVELS and diff.max() <= Q8_MAX_LEVELS, \
        f"{name}: Q8_0 image {diff.mean():.2f} levels mean / {diff.max():.0f} max from the golden"


def _copy(folder, tmp_path):
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


def test_truncated_gguf_is_named(q8_folder, tmp_path):
    target = _copy(q8_folder, tmp_path)
    path = target / g.GGUF_NAME
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.gguf.*truncated or corrupt"):
        ovis_u1.load_model(target, device="cpu", dtype=torch.float32)


def test_corrupt_gguf_is_named(q8_folder, tmp_path):
    target = _copy(q8_folder, tmp_path)
    (target / g.GGUF_NAME).write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.gguf as GGUF .*truncated or corrupt"):
        ovis_u1.load_model(target, device="cpu", dtype=torch.float32)


def test_gguf_of_another_model_is_named(q8_folder, tmp_path):
    target = _copy(q8_folder, tmp_path)
    writer = gguf.GGUFWriter(str(target / g.GGUF_NAME), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"model\.gguf is a GGUF file of another model \(general.architecture "
                                              r"'llama'"):
        ovis_u1.load_model(target, device="cpu", dtype=torch.float32)


def test_gguf_folder_without_the_package_says_how_to_install(q8_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    with pytest.raises(CheckpointError, match="pip install gguf"):
        ovis_u1.load_model(q8_folder, device="cpu", dtype=torch.float32)


def test_gguf_folder_refuses_fp8_storage(q8_folder):
    with pytest.raises(ovis_u1.OvisU1InputError, match="leave weight_dtype at default"):
        ovis_u1.load_model(q8_folder, device="cpu", dtype=torch.float32, weight_dtype="fp8_e4m3fn")


def test_converter_overwrites_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ovis_u1.OvisU1InputError, match="exists and is not empty"):
        quantize(CHECKPOINT, out, "Q8_0", progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_cli_quantize_refuses_an_unknown_type(tmp_path, capsys):
    from ovis_u1.__main__ import main

    assert main(["quantize", str(CHECKPOINT), str(tmp_path / "out"), "--type", "Q3_K"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
