"""load_weights: converted weights equal a plain conversion (chunk boundaries, both reading paths, fp8), weights
kept in their stored dtype are private views of the file, and loading fp32 as bf16 peaks near the bf16 size."""

from __future__ import annotations

import subprocess
import sys
import textwrap
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


PEAK_SCRIPT = """
import sys, torch
from pathlib import Path
from torch import nn
sys.path.insert(0, {root!r})
from ovis_u1 import checkpoint

def status(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

with torch.device("meta"):
    module = nn.ModuleDict({{f"l{{i}}": nn.Linear(1024, 2048, bias=False) for i in range(16)}})
checkpoint._CHUNK_BYTES = 1 << 20
before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")
checkpoint.load_weights(module, {directory!r}, torch.device("cpu"), lambda key, dtype: torch.bfloat16)
weights = sum(p.numel() * p.element_size() for p in module.parameters())
print((status("VmHWM") - before) / weights)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_loading_fp32_as_bf16_peaks_near_the_bf16_size(tmp_path):
    """128 MiB of fp32 loaded as 64 MiB of bf16: the process grows by at most 1.2× the bf16 weights (the old
    loader: 3.1×, holding the mapped fp32 file and the bf16 copy at once)."""
    generator = torch.Generator().manual_seed(0)
    save_file({f"l{i}.weight": torch.randn(2048, 1024, generator=generator) for i in range(16)},
              str(tmp_path / "model.safetensors"))
    root = str(Path(checkpoint.__file__).resolve().parents[1])
    code = textwrap.dedent(PEAK_SCRIPT.format(root=root, directory=str(tmp_path)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ratio = float(out.stdout.strip())
    assert ratio <= 1.2, f"peak RSS grew by {ratio:.2f}× the bf16 weights"
