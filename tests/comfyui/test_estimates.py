"""Inside a real ComfyUI (imported in this process, ``--cpu``): the estimates ComfyUI gets while sampling, and the
step-invariant work done once per sampling run.

ComfyUI asks the core MODEL for ``memory_required`` on two paths: ``sampler_helpers.estimate_memory`` before
sampling (with ``extra_conds_shapes`` of every conditioning) and ``samplers._calc_cond_batch`` at every step (with
the ``size()`` of the model conditions it batches). Both must see the text length and the edit context.

Run: COMFYUI_PATH=~/.cache/comfy-0.33.0/ComfyUI ~/.cache/comfy-0.33.0/venv/bin/python -m pytest
tests/comfyui/test_estimates.py (skipped without COMFYUI_PATH).
"""

from __future__ import annotations

import inspect
import sys

import pytest
import torch

from tests.comfyui.test_generation import call, comfy, edit_inputs, sample_custom, scheduler, t2i_inputs  # noqa: F401
from tests.comfyui.test_memory import COMFYUI_PATH
from tests.golden import requires_golden

pytestmark = [
    requires_golden,
    pytest.mark.skipif(not COMFYUI_PATH, reason="in-ComfyUI tests need COMFYUI_PATH=/path/to/ComfyUI and a Python "
                                               "with ComfyUI's requirements"),
]

# a conditioning's branch, by the output of Encode Condition that carries it
BRANCHES = {"cond": 0, "no_txt": 1, "no_both": 2}  # positive, middle, negative


def core_model_module(comfy):
    return sys.modules[f"{comfy['pack'].__name__}.nodes.comfy_bridge.core_model"]


def estimates_module(comfy):
    return sys.modules[f"{comfy['pack'].__name__}.ovis_u1.estimates"]


def latent_size(latent) -> tuple[int, int]:
    return latent["samples"].shape[-1] * 8, latent["samples"].shape[-2] * 8


def dual_cfg_guider(comfy, p, positive, middle, negative):
    (guider,) = call(comfy["custom"].DualCFGGuider, model=comfy["model"], cond1=positive, cond2=middle,
                     negative=negative, cfg_conds=p["txt_cfg"], cfg_cond2_negative=p["img_cfg"], style="regular")
    return guider


@pytest.fixture
def spy(comfy, monkeypatch):
    """Every memory_required call of the core MODEL: (caller, input_shape, cond_shapes, bytes)."""
    cls = core_model_module(comfy).OvisU1Model
    calls = []
    original = cls.memory_required

    def recording(self, input_shape, cond_shapes={}):
        result = original(self, input_shape, cond_shapes)
        caller = inspect.stack()[1].function
        calls.append((caller, list(input_shape), {k: [list(s) for s in v] for k, v in cond_shapes.items()}, result))
        return result

    monkeypatch.setattr(cls, "memory_required", recording)
    return calls


@pytest.mark.parametrize("scale", [1, 2])
def test_both_call_paths_see_the_text_and_the_edit_context(comfy, spy, scale):
    p, positive, middle, negative, latent = edit_inputs(comfy, scale)
    outputs = (positive, middle, negative)
    guider = dual_cfg_guider(comfy, p, positive, middle, negative)
    sample_custom(comfy, guider, latent, scheduler(comfy, p, latent, steps=2), p["seed"])

    est = estimates_module(comfy)
    mmdit = comfy["model"].model.diffusion_model
    width, height = latent_size(latent)
    lengths = {branch: outputs[i][0][0].shape[1] for branch, i in BRANCHES.items()}
    planned = [c for c in spy if c[0] == "estimate_memory"]
    stepped = [c for c in spy if c[0] == "_calc_cond_batch"]
    assert planned and stepped, [c[0] for c in spy]

    def expected(rows, text, with_context):
        m = mmdit.params
        return est.sampling_memory(m.hidden_size, m.mlp_ratio, m.num_heads, rows, text, width, height, with_context,
                                   4, scores=core_model_module(comfy).attention_scores(mmdit.kernel))

    # before sampling: cond + uncond rows, the longest text of the three conditionings, with the context
    full = max(planned, key=lambda c: c[1][0])
    assert full[1][0] == 2 and sorted(s[1] for s in full[2]["c_crossattn"]) == sorted(lengths.values())
    assert full[2]["ref_latents"] and full[3] == expected(2, max(lengths.values()), True)
    # every step: the text length of the batch, and the context exactly for the branches that carry it
    seen = set()
    for _, shape, cond_shapes, result in stepped:
        text = max(s[1] for s in cond_shapes["c_crossattn"])
        with_context = bool(cond_shapes.get("ref_latents"))
        assert result == expected(shape[0], text, with_context)
        seen.add((text, with_context))
    assert seen == {(lengths["cond"], True), (lengths["no_txt"], True), (lengths["no_both"], False)}


def test_the_estimate_grows_with_the_edit_size(comfy, spy):
    results = {}
    for scale in (1, 2):
        p, positive, middle, negative, latent = edit_inputs(comfy, scale)
        guider = dual_cfg_guider(comfy, p, positive, middle, negative)
        spy.clear()
        sample_custom(comfy, guider, latent, scheduler(comfy, p, latent, steps=1), p["seed"])
        results[scale] = max(c[3] for c in spy if c[0] == "estimate_memory")
    assert results[2] > results[1]


def test_rope_and_context_projection_once_per_sampling(comfy, monkeypatch):
    mmdit = comfy["model"].model.diffusion_model
    built, projected = [], []
    positions, project = mmdit.positions, mmdit.project_context
    monkeypatch.setattr(mmdit, "positions", lambda *a, **k: built.append(a[:4]) or positions(*a, **k))
    monkeypatch.setattr(mmdit, "project_context", lambda *a, **k: projected.append(a[0].shape) or project(*a, **k))

    # text-to-image, 3 steps of CFG: one table per text length (positive, negative), not per step
    p, positive, middle, negative, latent = t2i_inputs(comfy)
    (guider,) = call(comfy["custom"].CFGGuider, model=comfy["model"], positive=positive, negative=negative,
                     cfg=p["txt_cfg"])
    sample_custom(comfy, guider, latent, scheduler(comfy, p, latent, steps=3), p["seed"])
    lengths = {positive[0][0].shape[1], negative[0][0].shape[1]}
    assert sorted(b[0] for b in built) == sorted(lengths), built
    assert not projected

    # edit, 3 steps of dual CFG: the context projected once for each of the two conditionings that carry it
    built.clear()
    p, positive, middle, negative, latent = edit_inputs(comfy)
    guider = dual_cfg_guider(comfy, p, positive, middle, negative)
    sample_custom(comfy, guider, latent, scheduler(comfy, p, latent, steps=3), p["seed"])
    assert len(projected) == 2, projected
    assert len(built) == len({(b[0], b[3]) for b in built}) <= 3, built

    # a new sampling run builds its tables again (nothing is kept between runs)
    built.clear()
    sample_custom(comfy, guider, latent, scheduler(comfy, p, latent, steps=1), p["seed"])
    assert built


def test_core_vae_estimates_are_the_fitted_ones(comfy):
    est = estimates_module(comfy)
    vae = comfy["vae"]
    widths = tuple(comfy["encoder"].model.vae.params.block_out_channels)
    assert vae.memory_used_decode([1, 4, 64, 64], torch.float32) == est.vae_decode_memory(64, 64, 4, widths)
    assert vae.memory_used_encode([1, 3, 512, 512], torch.float32) == est.vae_encode_memory(512, 512, 4, widths)
