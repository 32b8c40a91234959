"""Inside a real ComfyUI (imported in this process, ``--cpu``): every part of a loaded Ovis-U1 — the encoder's LLM and
visual encoder (``encoder.patcher``), the MMDiT (the core MODEL) and the VAE (the core VAE's patcher) — is built from
ComfyUI's operations, wrapped in the patcher ComfyUI wraps its own models in, and gives the same outputs when ComfyUI
loads it partially (a weight budget under a quarter of the part) as when it loads it whole.

On a CPU ``load_models_gpu`` always loads whole (it disables partial loading for a CPU load device), so the partial
load is made the way ``load_models_gpu`` makes it on a small GPU: ``patcher.patch_model(device,
lowvram_model_memory=budget)`` (→ ``ModelPatcher.load``'s lowvram path). ComfyUI's own record of it is checked:
``model_lowvram`` set, fewer bytes loaded than the part holds, and its "loaded partially" log line.

Run: COMFYUI_PATH=~/.cache/comfy-0.33.0/ComfyUI ~/.cache/comfy-0.33.0/venv/bin/python -m pytest tests/comfyui
(and the same for 0.18.1 and 0.3.64; OVIS_U1_LAZY_LAYERS=1 for lazy layers, see layers.py); skipped without
COMFYUI_PATH.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.comfyui import layers
from tests.golden import CHECKPOINT, case_params, requires_golden, tensors
from tests.pack import COMFYUI_PATH, ROOT, import_pack, node_classes

pytestmark = [
    requires_golden,
    pytest.mark.skipif(not COMFYUI_PATH, reason="in-ComfyUI tests need COMFYUI_PATH=/path/to/ComfyUI and a Python "
                                               "with ComfyUI's requirements"),
]


# ------------------------------------------------------------------------------------- ComfyUI in this process
def comfy_in_process(models_root: Path):
    """ComfyUI in this process (``tests.pack.import_pack``) with ``models_root/ovis_u1`` holding the tiny checkpoint as
    Ovis-U1-3B. Returns the pack module."""
    pack = import_pack()
    import folder_paths

    folder = models_root / "ovis_u1"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "Ovis-U1-3B").exists():
        (folder / "Ovis-U1-3B").symlink_to(CHECKPOINT)
    folder_paths.add_model_folder_path("ovis_u1", str(folder))
    assert sys.modules[f"{pack.__name__}.nodes.comfy_bridge"].IN_COMFYUI
    return pack


def load(pack, **widgets):
    """The loader node as the executor calls it: (OVIS_U1_ENCODER, MODEL, VAE)."""
    widgets = {"dtype": "fp32", "attention": "auto", **widgets}
    return node_classes(pack)["OvisU1ModelLoader"].execute(model="Ovis-U1-3B", **widgets).args


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return comfy_in_process(tmp_path_factory.mktemp("models"))


# ----------------------------------------------------------------------------------------------- the parts
PARTS = ("llm", "mmdit", "vae")


def parts(pack, **widgets):
    """The loader's outputs and the patcher of each part: the encoder's own (LLM + visual encoder), the core MODEL
    (the MMDiT with its refiner) and the core VAE's."""
    encoder, model, vae = load(pack, **widgets)
    return encoder, {"llm": encoder.patcher, "mmdit": model, "vae": vae.patcher}


def ready(encoder, patchers, part: str):
    """What the nodes do before a part runs (Encode Condition: ``encoder.load``; the samplers and VAE nodes:
    ``load_models_gpu`` of the MODEL / the VAE's patcher); returns the OvisU1 module that holds every part."""
    import comfy.model_management as mm

    if part == "llm":
        return encoder.load()
    mm.load_models_gpu([patchers[part]])
    return encoder.model


def library(pack):
    """The pack's own copy of the library (the one its nodes and the loaded model use)."""
    return sys.modules[f"{pack.__name__}.ovis_u1"]


def weight_modules(module: torch.nn.Module):
    return [(n, m) for n, m in module.named_modules() if any(True for _ in m.parameters(recurse=False))]


def run_part(pack, ovis, part: str):
    """One representative computation per part, on the golden inputs."""
    p = case_params("t2i")
    if part == "llm":
        return ovis.encode_condition(p["prompt"], "t2i", width=p["width"], height=p["height"]).branches["cond"]
    if part == "mmdit":
        t = tensors("t2i")
        txt = {b: t[f"{b}.txt"] for b in ("cond", "no_both")}
        refined = ovis.refine(library(pack).Condition("t2i", p["width"], p["height"], txt))
        return ovis.sample(refined, p["width"], p["height"], steps=2, txt_cfg=p["txt_cfg"], seed=p["seed"])
    latent = tensors("t2i")["vae_dec_input"]
    return ovis.vae_decode(latent)


def test_layers_are_built_as_the_run_asks(pack):
    """OVIS_U1_LAZY_LAYERS=1 must really give ComfyUI's lazy layers (else the lazy CI part tests nothing new)."""
    assert layers.layers_are_lazy() == layers.LAZY


@pytest.mark.parametrize("part", PARTS)
def test_every_part_is_built_from_comfyui_operations(pack, part):
    import comfy.model_patcher

    encoder, patchers = parts(pack)
    patcher = patchers[part]
    expected = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    assert isinstance(patcher, expected)
    plain = [n for n, m in weight_modules(patcher.model) if not hasattr(m, "comfy_cast_weights")
             and type(m).__module__.startswith("torch.nn")]
    assert not plain, f"{part}: torch.nn layers ComfyUI cannot stream: {plain[:5]}"
    # the three patchers hold the loaded OvisU1's own modules: one copy of the weights
    ovis = encoder.model
    held = {"llm": ovis.llm, "mmdit": ovis.mmdit, "vae": ovis.vae}[part]
    assert any(m is held for m in patcher.model.modules()), f"{part}: the patcher holds a copy, not the model's part"


@pytest.mark.parametrize("part", PARTS)
def test_partial_load_gives_the_full_load_outputs(pack, part, caplog):
    import comfy.model_management as mm

    encoder, patchers = parts(pack)
    patcher = patchers[part]
    device = patcher.load_device

    full = run_part(pack, ready(encoder, patchers, part), part)  # on a CPU ComfyUI loads whole
    assert not getattr(patcher.model, "model_lowvram", False)
    mm.unload_all_models()

    size = patcher.model_size()
    budget = size // 5
    with caplog.at_level(logging.INFO):
        patcher.patch_model(device_to=device, lowvram_model_memory=budget, load_weights=True)
    try:
        assert patcher.model.model_lowvram, f"{part}: ComfyUI did not load it partially"
        assert patcher.model.model_loaded_weight_memory < size / 4
        assert any("loaded partially" in r.getMessage() for r in caplog.records), caplog.text
        partial = run_part(pack, encoder.model, part)
    finally:
        patcher.unpatch_model(patcher.offload_device)
    assert torch.equal(partial, full), f"{part}: max |Δ| {(partial.float() - full.float()).abs().max()}"


@pytest.mark.parametrize("part", PARTS)
def test_fp8_weights_run_in_the_compute_dtype(pack, part):
    """weight_dtype fp8: the LLM/vision/MMDiT matrices are stored in fp8 through ComfyUI's manual-cast layers, every
    pass computes in the loader's dtype and stays finite; the VAE is never fp8."""
    encoder, patchers = parts(pack, weight_dtype="fp8_e4m3fn")
    module = patchers[part].model
    stored = {p.dtype for p in module.parameters()}
    if part == "vae":
        assert torch.float8_e4m3fn not in stored
    else:
        assert torch.float8_e4m3fn in stored
    out = run_part(pack, ready(encoder, patchers, part), part)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def _t2i_image(ovis, size: int = 256, steps: int = 4):
    refined = ovis.refine(ovis.encode_condition("a cute cat", "t2i", width=size, height=size))
    latent = ovis.sample(refined, size, size, steps=steps, seed=42)
    return torch.from_numpy(np.array(ovis.decode_to_pil(latent)[0])).int()


def readme_fp8_bound(row: str = "weight-only", column: str = "tiny t2i") -> tuple[float, float]:
    """uint8 |Δ| mean and max the README's fp8 table states for ``row`` and ``column``: the top of the range where
    it gives one (the spread over the CPU bf16 kernels measured, e.g. ``3.0–3.6 / 30–38 (9 %)``)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines() if line.strip().startswith("|")]
    columns = next(r for r in rows if r[0] == "fp8_e4m3fn")
    cells = next(r for r in rows if r[0] == row)
    mean, peak = cells[columns.index(column)].split("(")[0].split("/")
    return float(mean.split("–")[-1]), float(peak.split("–")[-1])


def test_fp8_images_stay_within_the_readmes_figures(pack):
    """fp8_e4m3fn storage through ComfyUI's manual-cast layers against bf16 weights, the README's measurement
    (``bench/bench_memory.py --quality --size 256 --steps 4``, t2i, bf16 compute) on the tiny test model."""
    images = {}
    for storage in ("default", "fp8_e4m3fn"):
        encoder, patchers = parts(pack, dtype="bf16", weight_dtype=storage)
        for part in PARTS:
            ready(encoder, patchers, part)
        images[storage] = _t2i_image(encoder.model)
    diff = (images["fp8_e4m3fn"] - images["default"]).abs()
    mean_bound, max_bound = readme_fp8_bound()
    assert 0 < diff.float().mean() <= mean_bound and diff.max() <= max_bound, (
        f"fp8 moved the image by {diff.float().mean():.2f} levels on average, {diff.max()} at most")
