"""Scaled fp8 storage (``weight_dtype="fp8_e4m3fn_scaled"``, ovis_u1/fp8.py): the scale math, what is stored, and the
golden renders of the tiny model within a stated bound.

The bound (uint8 levels against the golden image, fp32 compute so that only the weight rounding moves the
picture): mean |Δ| ≤ 4.5 and max |Δ| ≤ 48, for t2i and edit. Why: e4m3 keeps 3 mantissa bits, so every stored
weight moves by up to 2⁻⁴ of itself (the tiny checkpoint's fp8 matrices move by 2.7 % rms), and with a power-of-two
scale a weight that unscaled e4m3 rounds in its normal range rounds to the same relative value (only the exponent
shifts) while those it would flush towards zero become normal numbers; so scaled fp8 moves each weight at most as far
as today's fp8 (checked below, element by element) and its renders sit in the same band: measured 2.9 / 29 (t2i) and
3.7 / 40 (edit), unscaled 2.7 / 26 and 3.6 / 37 (which of two renders through a 3-step sampler is closer is noise).
The bound leaves about a fifth of room over the larger of the two; a scale off by one binade moves the image by far
more (checked below), a lost one gives NaN.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import ovis_u1
from ovis_u1 import fp8
from ovis_u1.__main__ import main
from ovis_u1.model import fp8_keys
from ovis_u1.operations import SCALED_FP8, WEIGHT_DTYPES, WeightStorage, manual_cast, parse_weight_storage
from tests.golden import CHECKPOINT, case_params, requires_golden, tensors
from tests.test_operations import _t2i_latent, edit_input

MEAN_BOUND = 4.5
MAX_BOUND = 48


# ------------------------------------------------------------------------------------------------ the scale math

@pytest.mark.parametrize("per_channel", [False, True])
def test_the_scale_is_the_smallest_power_of_two_that_fits_e4m3(per_channel):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 48, generator=g) * torch.logspace(-4, 1, 64).unsqueeze(1)
    scale = fp8.fp8_scale(weight, per_channel)
    assert scale.dtype == torch.float32 and scale.shape == ((64, 1) if per_channel else ())
    mantissa, _ = torch.frexp(scale)
    assert (mantissa == 0.5).all(), "not a power of two"
    amax = weight.abs().amax(dim=1, keepdim=True) if per_channel else weight.abs().amax()
    assert (amax / scale <= fp8.FP8_MAX).all() and (amax / scale > fp8.FP8_MAX / 2).all()
    assert fp8.fp8_scale(torch.zeros(3, 3)) == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_e4m3_values_times_a_power_of_two_survive_the_round_trip_exactly(dtype):
    every_e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    values = every_e4m3[torch.isfinite(every_e4m3)].reshape(-1, 1)  # 254 finite values, ±448 included
    for exponent in (-12, -3, 0):
        weight = (values * 2.0 ** exponent).to(dtype)
        scale = fp8.fp8_scale(weight)
        assert scale == 2.0 ** exponent
        assert torch.equal(fp8.dequantize(fp8.quantize(weight, scale), scale, dtype), weight)


def test_scaled_rounding_moves_no_weight_further_than_unscaled_e4m3():
    """Per element, on every matrix the storage scales: the power-of-two scale changes only exponents, so a weight in
    e4m3's normal range rounds to the same relative value and a smaller one gets a finer grid."""
    with safe_open(str(CHECKPOINT / "model.safetensors"), "pt") as f:
        model = ovis_u1.load_model(CHECKPOINT, device="cpu", dtype=torch.float32, weight_dtype=SCALED_FP8)
        finer = 0
        for key in sorted(fp8_keys(model)):
            weight = f.get_tensor(key).float()
            scale = fp8.fp8_scale(weight)
            assert scale <= 1
            scaled = (fp8.dequantize(fp8.quantize(weight, scale), scale, torch.float32) - weight).abs()
            unscaled = (weight.to(torch.float8_e4m3fn).float() - weight).abs()
            assert (scaled <= unscaled).all(), key
            finer += int((scaled < unscaled).sum())
    assert finer > 0


# ------------------------------------------------------------------------------------------- what is stored

def test_the_storage_names_are_one_list_and_the_scaled_one_parses():
    assert list(WEIGHT_DTYPES) == ["default", "fp8_e4m3fn", "fp8_e5m2", SCALED_FP8]
    assert parse_weight_storage(SCALED_FP8) == WeightStorage(torch.float8_e4m3fn, scaled=True)
    assert parse_weight_storage("fp8_e4m3fn") == WeightStorage(torch.float8_e4m3fn, scaled=False)
    assert parse_weight_storage(None) == parse_weight_storage("default") == WeightStorage()
    with pytest.raises(ovis_u1.OvisU1InputError, match=SCALED_FP8):
        parse_weight_storage("fp8_scaled")


def test_scaled_storage_stores_the_same_matrices_as_fp8_each_with_its_scale():
    scaled = ovis_u1.load_model(CHECKPOINT, device="cpu", dtype=torch.bfloat16, weight_dtype=SCALED_FP8)
    plain = ovis_u1.load_model(CHECKPOINT, device="cpu", dtype=torch.bfloat16, weight_dtype="fp8_e4m3fn")
    state, plain_state = scaled.state_dict(), plain.state_dict()
    stored = {k for k, v in state.items() if v.dtype == torch.float8_e4m3fn}
    assert stored == {k for k, v in plain_state.items() if v.dtype == torch.float8_e4m3fn} == fp8_keys(scaled)
    scales = {k[: -len(fp8.SCALE_KEY)] + "weight" for k in state if k.endswith("." + fp8.SCALE_KEY)}
    assert scales == stored
    assert not any(k.endswith(fp8.MARKER_KEY) for k in state)
    assert {k: v.dtype for k, v in state.items() if k not in stored and not k.endswith(fp8.SCALE_KEY)} == {
        k: v.dtype for k, v in plain_state.items() if k not in stored}
    assert scaled.weight_storage == WeightStorage(torch.float8_e4m3fn, scaled=True)
    assert isinstance(scaled.vte, manual_cast.Embedding) and scaled.vte.weight_scale is not None


def test_scaled_weights_are_the_scaled_entries_of_the_stored_weights():
    """Each matrix is scaled as it is read (read in fp32, which holds every value of a float file): the stored values
    and scales are bit for bit those of :func:`fp8.scaled_entries` applied to the checkpoint's own weights."""
    model = ovis_u1.load_model(CHECKPOINT, device="cpu", dtype=torch.bfloat16, weight_dtype=SCALED_FP8)
    state = model.state_dict()
    with safe_open(str(CHECKPOINT / "model.safetensors"), "pt") as f:
        for key in sorted(fp8_keys(model)):
            expected = fp8.scaled_entries(key, f.get_tensor(key))
            layer = key[: -len("weight")]
            assert torch.equal(state[key].view(torch.uint8), expected[key].view(torch.uint8)), key
            assert torch.equal(state[layer + fp8.SCALE_KEY], expected[layer + fp8.SCALE_KEY]), key


def test_onto_another_device_each_matrix_is_scaled_on_the_cpu_and_moved(monkeypatch):
    """A GPU is another device; "meta" stands in for it here: each matrix is read in fp32 and scaled on the CPU as it
    is read (the CPU's scale math, whatever the device), and only its scaled entries go to the device; the model is
    read straight onto the device (never held whole on the CPU). Values on "meta" cannot be checked for NaN/inf
    (on a GPU they are): the check passes them."""
    all_finite = ovis_u1.checkpoint._all_finite
    monkeypatch.setattr(ovis_u1.checkpoint, "_all_finite", lambda t: t.is_meta or all_finite(t))
    scaled_on, read_on = [], []
    real_entries, real_load = fp8.scaled_entries, ovis_u1.model.load_weights
    monkeypatch.setattr(fp8, "scaled_entries", lambda key, weight: scaled_on.append((weight.device.type,
                                                                                      weight.dtype)) or
                        real_entries(key, weight))
    monkeypatch.setattr(ovis_u1.model, "load_weights", lambda m, d, device, *a, **k: read_on.append(device) or
                        real_load(m, d, device, *a, **k))
    model = ovis_u1.load_model(CHECKPOINT, device="meta", dtype=torch.bfloat16, weight_dtype=SCALED_FP8)
    assert read_on == [torch.device("meta")]
    assert len(scaled_on) == len(fp8_keys(model)) and set(scaled_on) == {("cpu", torch.float32)}
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    assert model.mmdit.img_in.weight.dtype == torch.float8_e4m3fn and model.mmdit.img_in.weight_scale.shape == ()


# ---------------------------------------------------------------------------------------------- golden renders

def deviation(image, case: str) -> tuple[float, int]:
    diff = np.abs(np.asarray(image).astype(np.int32) - tensors(case)["output_image_uint8"].numpy().astype(np.int32))
    return float(diff.mean()), int(diff.max())


def renders(model) -> dict[str, tuple[float, int]]:
    p = case_params("edit")
    edit = model.edit(edit_input(), p["prompt"], steps=p["steps"], img_cfg=p["img_cfg"], txt_cfg=p["txt_cfg"],
                      seed=p["seed"], context_seed=p["vae_sample_seed"])
    return {"t2i": deviation(model.decode_to_pil(_t2i_latent(model))[0], "t2i"), "edit": deviation(edit, "edit")}


@pytest.fixture(scope="module")
def scaled_model():
    return ovis_u1.load_model(CHECKPOINT, device="cpu", dtype=torch.float32, weight_dtype=SCALED_FP8)


@requires_golden
def test_scaled_fp8_renders_the_goldens_within_the_bound(scaled_model):
    for case, (mean, most) in renders(scaled_model).items():
        assert mean <= MEAN_BOUND and most <= MAX_BOUND, f"{case}: |Δ| mean {mean:.2f}, max {most}"


@requires_golden
def test_the_bound_catches_a_scale_off_by_one_binade(scaled_model):
    layers = [m for m in scaled_model.modules() if getattr(m, fp8.SCALE_KEY, None) is not None]
    kept = [m.weight_scale for m in layers]
    try:
        for m in layers:
            m.weight_scale = m.weight_scale / 2
        mean, _ = renders(scaled_model)["t2i"]
    finally:
        for m, scale in zip(layers, kept):
            m.weight_scale = scale
    assert mean > 3 * MEAN_BOUND


# ----------------------------------------------------------------------------------------------------- the CLI

def test_the_cli_renders_the_golden_t2i_with_scaled_fp8_within_the_bound(tmp_path):
    p = case_params("t2i")
    out = tmp_path / "scaled.png"
    assert main(["t2i", p["prompt"], "--model", str(CHECKPOINT), "--device", "cpu", "--dtype", "fp32",
                 "--weight-dtype", SCALED_FP8, "--width", str(p["width"]), "--height", str(p["height"]),
                 "--steps", str(p["steps"]), "--txt-cfg", str(p["txt_cfg"]), "--seed", str(p["seed"]),
                 "--out", str(out)]) == 0
    mean, most = deviation(Image.open(out), "t2i")
    assert mean <= MEAN_BOUND and most <= MAX_BOUND, f"|Δ| mean {mean:.2f}, max {most}"
