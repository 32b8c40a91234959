"""load_weights: converted weights equal a plain conversion (chunk boundaries, both reading paths, fp8), weights
kept in their stored dtype are private views of the file, and loading fp32 as bf16 peaks near the bf16 size."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ovis_u1 import checkpoint
from ovis_u1.checkpoint import load_weights


def small_module() -> nn.Module:
    with torch.device("meta"):
        return nn.ModuleDict({"proj": nn.Linear(37, 53), "table": nn.Embedding(29, 11), "norm": nn.LayerNorm(53)})


@pytest.fixture()
def stored(tmp_path) -> Path:
    """fp32 weights written by safetensors itself (header sorted by name, data laid out in its own order)."""
    generator = torch.Generator().manual_seed(0)
    shapes = {k: t.shape for k, t in small_module().state_dict().items()}
    save_file({k: torch.randn(s, generator=generator) for k, s in shapes.items()}, str(tmp_path / "model.safetensors"))
    return tmp_path


@pytest.mark.parametrize("release", [True, False], ids=["mapped", "read"])
def test_converted_weights_equal_a_plain_conversion(stored, monkeypatch, release):
    monkeypatch.setattr(checkpoint, "_CHUNK_BYTES", 64)  # many chunks per tensor, with a remainder
    if release and not checkpoint._RELEASE:
        pytest.skip("this platform cannot drop mapped pages (no madvise)")
    monkeypatch.setattr(checkpoint, "_RELEASE", release)
    module = small_module()
    fp8 = "table.weight"
    load_weights(module, stored, torch.device("cpu"),
                 lambda key, dtype: torch.float8_e4m3fn if key == fp8 else torch.bfloat16)
    reference = load_file(str(stored / "model.safetensors"))
    for key, value in module.state_dict().items():
        expected = reference[key].to(torch.float8_e4m3fn if key == fp8 else torch.bfloat16)
        assert value.dtype == expected.dtype and torch.equal(value.float(), expected.float()), key


def test_weights_in_their_stored_dtype_are_private_views_of_the_file(stored):
    path = stored / "model.safetensors"
    before = path.read_bytes()
    module = small_module()
    load_weights(module, stored, torch.device("cpu"), lambda key, dtype: dtype)
    reference = load_file(str(path))
    for key, value in module.state_dict().items():
        assert torch.equal(value, reference[key]), key
    module.proj.weight.data.add_(1.0)  # copy-on-write: the process's copy changes, the file does not
    assert path.read_bytes() == before
    again = small_module()
    load_weights(again, stored, torch.device("cpu"), lambda key, dtype: dtype)
    assert torch.equal(again.proj.weight, reference["proj.weight"])


def test_a_file_slice_marker_is_told_of_every_view_of_the_file_and_of_nothing_else(stored, monkeypatch):
    """``mark_file_slice`` gets each tensor kept as stored with the exact bytes of the file its storage views; a
    converted tensor is fresh memory and never reaches it. The values stay the checkpoint's after the loader has
    dropped the pages it checked."""
    monkeypatch.setattr(checkpoint, "_CHUNK_BYTES", 64)  # pages dropped chunk by chunk
    path = stored / "model.safetensors"
    data = path.read_bytes()
    told = []
    module = small_module()
    load_weights(module, stored, torch.device("cpu"),
                 lambda key, dtype: torch.bfloat16 if key == "proj.weight" else dtype,
                 mark_file_slice=lambda tensor, file, offset, size: told.append((tensor, file, offset, size)))
    by_storage = {tensor.untyped_storage().data_ptr(): (tensor, file, offset, size) for tensor, file, offset, size in told}
    weights = module.state_dict()
    assert len(by_storage) == len(told)
    assert {k for k, v in weights.items() if v.untyped_storage().data_ptr() in by_storage} == set(weights) - {"proj.weight"}
    for tensor, file, offset, size in told:
        assert file == path and tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == size
        assert bytes(tensor.untyped_storage()) == data[offset : offset + size]
    reference = load_file(str(path))
    for key, value in weights.items():
        assert torch.equal(value.float(), reference[key].to(value.dtype).float()), key


PEAK_SCRIPT = """
import sys, torch
from pathlib import Path
from torch import nn
sys.path.insert(0, {root!r})
from ovis_u1 import checkpoint, fp8
from ovis_u1.operations import manual_cast

def status(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

with torch.device("meta"):
    module = nn.ModuleDict({{f"l{{i}}": {layers}.Linear(1024, 2048, bias=False) for i in range(16)}})
checkpoint._CHUNK_BYTES = 1 << 20
before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")
checkpoint.load_weights(module, {directory!r}, torch.device("cpu"), lambda key, dtype: {dtype},
                        mark_file_slice={mark}, transform={transform})
weights = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
print((status("VmHWM") - before) / weights)
"""


def peak_growth(tmp_path, dtype: str = "dtype", mark: str = "None", transform: str = "None",
                layers: str = "nn") -> float:
    """How much the peak RSS of a fresh process grows while it loads 128 MiB of fp32 weights (16 matrices of 8 MiB),
    as a multiple of the loaded weights' bytes; ``dtype``: the loaded dtype's expression (``dtype``: the stored one),
    ``mark``, ``transform``: the ``mark_file_slice`` and ``transform`` expressions, ``layers``: the layer namespace."""
    generator = torch.Generator().manual_seed(0)
    save_file({f"l{i}.weight": torch.randn(2048, 1024, generator=generator) for i in range(16)},
              str(tmp_path / "model.safetensors"))
    root = str(Path(checkpoint.__file__).resolve().parents[1])
    code = textwrap.dedent(PEAK_SCRIPT.format(root=root, directory=str(tmp_path), dtype=dtype, mark=mark,
                                              transform=transform, layers=layers))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip())


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_loading_fp32_as_bf16_peaks_near_the_bf16_size(tmp_path):
    """128 MiB of fp32 loaded as 64 MiB of bf16: the process grows by at most 1.2× the bf16 weights (the old
    loader: 3.1×, holding the mapped fp32 file and the bf16 copy at once)."""
    ratio = peak_growth(tmp_path, dtype="torch.bfloat16")
    assert ratio <= 1.2, f"peak RSS grew by {ratio:.2f}× the bf16 weights"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_scaling_fp8_as_each_matrix_is_read_peaks_near_unscaled_fp8(tmp_path):
    """128 MiB of fp32 stored as 32 MiB of scaled e4m3fn (``ReadTransform`` with ``fp8.scaled_entries``, as
    ``weight_dtype="fp8_e4m3fn_scaled"`` loads): the process grows by at most 1.0× the fp8 weights more than it does
    for unscaled e4m3fn. Only one matrix is held in fp32 while it is scaled (8 MiB: 0.25× here, plus the allocator's
    slack; measured 0.35× to 0.7× more); reading all, then scaling them as the state dict reached the layers, held
    the whole file: 10.8×, against 1.29× unscaled."""
    fp8_e4m3fn = peak_growth(tmp_path, dtype="torch.float8_e4m3fn", layers="manual_cast")
    scaled = peak_growth(tmp_path, dtype="torch.float32", layers="manual_cast",
                         transform="checkpoint.ReadTransform(frozenset(module.state_dict()), fp8.scaled_entries)")
    assert scaled <= fp8_e4m3fn + 1.0, f"peak RSS grew by {scaled:.2f}× the scaled weights, unscaled fp8 {fp8_e4m3fn:.2f}×"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists() or not checkpoint._RELEASE,
                    reason="needs Linux's resettable peak RSS and madvise")
def test_marked_views_leave_their_pages_to_the_file(tmp_path):
    """Weights whose reader reads them from the file (``mark_file_slice``) are not kept resident by the loading:
    after the NaN/inf check their pages go (0.07× here; loaded unmarked, the check leaves all 128 MiB mapped: 1.04×)."""
    ratio = peak_growth(tmp_path, mark="lambda *file_slice: None")
    assert ratio <= 0.2, f"peak RSS grew by {ratio:.2f}× the weights the file holds"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2],
                         ids=["kept as stored", "converted", "fp8 e4m3fn", "fp8 e5m2"])
@pytest.mark.parametrize("where", [0, -1], ids=["first chunk", "last chunk"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_value_anywhere_is_found_while_reading(stored, monkeypatch, dtype, where, value):
    """The NaN/inf check is part of reading: in the first and the last chunk of a tensor, for tensors kept as views
    of the file and for converted ones."""
    monkeypatch.setattr(checkpoint, "_CHUNK_BYTES", 64)
    weights = load_file(str(stored / "model.safetensors"))
    weights["proj.weight"].view(-1)[where] = value
    save_file(weights, str(stored / "model.safetensors"))
    with pytest.raises(checkpoint.CheckpointError, match=r"NaN or infinite values in proj\.weight"):
        load_weights(small_module(), stored, torch.device("cpu"), lambda key, stored_dtype: dtype)


def test_fp16_overflow_is_found_and_explained(stored):
    weights = load_file(str(stored / "model.safetensors"))
    weights["norm.weight"][3] = 1e6  # finite in fp32, beyond fp16's 65504
    save_file(weights, str(stored / "model.safetensors"))
    with pytest.raises(checkpoint.CheckpointError, match="load in bf16 or fp32") as info:
        load_weights(small_module(), stored, torch.device("cpu"), lambda key, stored_dtype: torch.float16)
    assert "norm.weight (torch.float16)" in str(info.value) and "finite in the checkpoint" in str(info.value)
    assert "corrupt" not in str(info.value)
    load_weights(small_module(), stored, torch.device("cpu"), lambda key, stored_dtype: torch.bfloat16)


def test_fp8_overflow_is_told_apart_from_a_corrupt_file(stored):
    """e5m2 turns values beyond its range into inf, e4m3fn saturates them; an inf in the file is corruption in both."""
    weights = load_file(str(stored / "model.safetensors"))
    weights["proj.weight"].view(-1)[5] = 1e6
    save_file(weights, str(stored / "model.safetensors"))
    with pytest.raises(checkpoint.CheckpointError, match=r"fp8_e4m3fn \(it saturates\)") as info:
        load_weights(small_module(), stored, torch.device("cpu"), lambda key, stored_dtype: torch.float8_e5m2)
    assert "proj.weight (torch.float8_e5m2)" in str(info.value) and "corrupt" not in str(info.value)
    module = small_module()
    load_weights(module, stored, torch.device("cpu"), lambda key, stored_dtype: torch.float8_e4m3fn)
    assert module.proj.weight.view(-1)[5].float() == 448.0
    weights["table.weight"].view(-1)[0] = float("inf")
    save_file(weights, str(stored / "model.safetensors"))
    with pytest.raises(checkpoint.CheckpointError, match=r"NaN or infinite values in table\.weight") as info:
        load_weights(small_module(), stored, torch.device("cpu"), lambda key, stored_dtype: torch.float8_e5m2)
    assert "proj.weight (torch.float8_e5m2) hold values beyond the range" in str(info.value)


def test_large_finite_sums_are_not_mistaken_for_overflow(stored):
    """A chunk whose fp16 sum overflows, though every value is finite, takes the element-wise test and loads."""
    weights = load_file(str(stored / "model.safetensors"))
    weights["proj.weight"].fill_(60000.0)
    save_file(weights, str(stored / "model.safetensors"))
    module = small_module()
    load_weights(module, stored, torch.device("cpu"), lambda key, stored_dtype: torch.float16)
    assert torch.equal(module.proj.weight, torch.full((53, 37), 60000.0, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_every_finite_fp8_value_passes_the_check(dtype):
    every_byte = torch.arange(256, dtype=torch.uint8).view(dtype)
    finite = torch.isfinite(every_byte.to(torch.float32))
    assert not finite.all()
    for value, is_finite in zip(every_byte, finite):
        assert checkpoint._all_finite(value.reshape(1)) == bool(is_finite), (value.view(torch.uint8), is_finite)
    assert checkpoint._all_finite(every_byte[finite])


def read_ahead_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "ovis-u1-read-ahead"]


def wait_until(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this platform")
def test_read_ahead_stays_within_its_window_and_ends_at_the_end_of_the_file(tmp_path, monkeypatch):
    size, window, step = 10_000, 1024, 256
    (tmp_path / "weights").write_bytes(bytes(size))
    asked = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: asked.append((offset, length, advice)))
    monkeypatch.setattr(checkpoint._ReadAhead, "STEP", step)
    with open(tmp_path / "weights", "rb") as file:
        read_ahead = checkpoint._ReadAhead(file, window=window)
        for position in (0, 300, 5000):
            if position:
                read_ahead.advance(position)
            wait_until(lambda: asked and asked[-1][0] + step >= position + window)
            time.sleep(0.02)  # it waits there for the reader
            assert asked[-1][0] < position + window, (asked[-1], position)
        read_ahead.advance(size)
        read_ahead.thread.join(timeout=20)  # it stops by itself at the end of the file
        assert not read_ahead.thread.is_alive()
        read_ahead.close()
    offsets = [offset for offset, _, _ in asked]
    assert offsets == sorted(set(offsets)) and offsets[-1] + step >= size
    assert all(advice == os.POSIX_FADV_WILLNEED and length == step for _, length, advice in asked)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this platform")
def test_loading_reads_ahead_in_order_and_leaves_no_thread(stored, monkeypatch):
    monkeypatch.setattr(checkpoint, "_CHUNK_BYTES", 64)
    monkeypatch.setattr(checkpoint._ReadAhead, "STEP", 256)
    asked = []
    real_fadvise = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise",
                        lambda fd, offset, length, advice: (asked.append(offset), real_fadvise(fd, offset, length, advice)))
    load_weights(small_module(), stored, torch.device("cpu"), lambda key, dtype: torch.bfloat16)
    assert asked and asked == sorted(asked), "read-ahead went backwards"
    assert not read_ahead_threads()


def test_no_read_ahead_thread_outlives_a_failed_load(stored):
    weights = load_file(str(stored / "model.safetensors"))
    weights["proj.weight"].view(-1)[0] = float("inf")
    save_file(weights, str(stored / "model.safetensors"))
    with pytest.raises(checkpoint.CheckpointError):
        load_weights(small_module(), stored, torch.device("cpu"), lambda key, dtype: torch.bfloat16)
    assert not read_ahead_threads()
