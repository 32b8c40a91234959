"""The native path's ComfyUI-independent parts: the Ovis-U1 Scheduler's SIGMAS are the official schedule, ComfyUI's
DualCFGGuider formula (style regular, as both ComfyUI versions write it) is the official edit guidance with
cfg_conds = txt_cfg and cfg_cond2_negative = img_cfg, and the CONDITIONING layout puts every official branch, and the
edit context, where the official code has them."""

from __future__ import annotations

import sys

import pytest
import torch

from ovis_u1 import Condition, OvisU1InputError
from ovis_u1.config import MMDiTParams
from ovis_u1.sampling import flow_schedule, guide_edit, guide_t2i
from tests.golden import case_params, requires_golden, tensors
from tests.pack import PACK_NAME, import_pack

PACK = import_pack()
native = sys.modules[f"{PACK_NAME}.nodes.native"]


class _Model:
    """What the scheduler reads of an OVIS_U1_MODEL: ``.model.params.mmdit``."""

    def __init__(self, mmdit):
        self.model = type("OvisU1", (), {"params": type("Params", (), {"mmdit": mmdit})()})()


@requires_golden
@pytest.mark.parametrize("case", ["t2i", "edit"])
def test_scheduler_gives_the_golden_timesteps(case):
    p, t = case_params(case), tensors(case)
    height, width = t["noise"].shape[-2] * 8, t["noise"].shape[-1] * 8
    mmdit = MMDiTParams(timestep_shift=False)
    (sigmas,) = PACK.NODE_CLASS_MAPPINGS["OvisU1Scheduler"]().schedule(_Model(mmdit), width, height, p["steps"])
    assert sigmas.dtype == torch.float32 and sigmas.shape == (p["steps"] + 1,)
    assert torch.equal(sigmas, t["timesteps"].float().flatten()[: p["steps"] + 1])


@pytest.mark.parametrize("size", [(1024, 1024), (512, 768), (64, 64)])
def test_shifted_schedule_is_the_official_one_for_the_size(size):
    width, height = size
    mmdit = MMDiTParams(timestep_shift=True)
    sigmas = native.official_sigmas(mmdit, width, height, 20)
    tokens = (height // 16) * (width // 16)
    assert sigmas.tolist() == flow_schedule(20, tokens, True, mmdit.base_shift, mmdit.max_shift)
    off = native.official_sigmas(mmdit, width, height, 20, timestep_shift=False)
    assert off.tolist() == flow_schedule(20, tokens, False)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and bool((sigmas[1:] < sigmas[:-1]).all())


def test_denoise_takes_the_tail_of_a_longer_schedule_as_basic_scheduler_does():
    mmdit = MMDiTParams(timestep_shift=False)
    sigmas = native.official_sigmas(mmdit, 64, 64, 6, denoise=0.6)
    assert sigmas.tolist() == flow_schedule(10, 16, False)[-7:]
    scheduler = PACK.NODE_CLASS_MAPPINGS["OvisU1Scheduler"]()
    assert scheduler.schedule(_Model(mmdit), 64, 64, 6, denoise=0.0)[0].numel() == 0
    with pytest.raises(OvisU1InputError, match="timestep_shift"):
        scheduler.schedule(_Model(mmdit), 64, 64, 6, timestep_shift="maybe")


def test_dual_cfg_guider_is_the_official_edit_guidance():
    g = torch.Generator().manual_seed(0)
    cond, no_txt, no_both = (torch.randn(2, 16, 16, generator=g, dtype=torch.float64) for _ in range(3))
    x, sigma = torch.randn(2, 16, 16, generator=g, dtype=torch.float64), 0.7
    for img_cfg, txt_cfg in [(1.5, 6.0), (1.0, 1.0), (2.0, 4.0)]:
        official = guide_edit(cond, no_txt, no_both, img_cfg, txt_cfg)
        # ComfyUI guides the denoised estimates x − σ·v; the formula is affine with weights summing to 1
        denoised = [x - sigma * v for v in (cond, no_txt, no_both)]
        comfy = native.dual_cfg_regular(*denoised, cfg_conds=txt_cfg, cfg_cond2_negative=img_cfg)
        torch.testing.assert_close(comfy, x - sigma * official, rtol=0, atol=1e-12)
    # text-to-image: middle is no_both, so the guider is plain CFG with cfg = txt_cfg
    t2i = native.dual_cfg_regular(cond, no_both, no_both, cfg_conds=5.0, cfg_cond2_negative=1.5)
    torch.testing.assert_close(t2i, guide_t2i(cond, no_both, 5.0), rtol=0, atol=1e-12)


def test_conditioning_layout_of_text_to_image():
    states = {b: torch.full((1, 3, 8), float(i)) for i, b in enumerate(["cond", "no_both"])}
    out = native.conditioning_layout(Condition("t2i", 64, 64, states))
    assert set(out) == {"positive", "middle", "negative"}
    assert out["positive"][0][0] is states["cond"] and out["negative"][0][0] is states["no_both"]
    assert out["middle"][0][0] is states["no_both"]
    assert all(entry[0][1] == {} for entry in out.values())
    latent = torch.zeros(1, 4, 8, 8)  # a context given for text-to-image is not attached
    assert all(e[0][1] == {} for e in native.conditioning_layout(Condition("t2i", 64, 64, states), latent).values())


def test_conditioning_layout_of_an_edit_attaches_the_context_to_cond_and_no_txt():
    states = {b: torch.full((1, 3, 8), float(i)) for i, b in enumerate(["cond", "no_txt", "no_both"])}
    latent = torch.randn(1, 4, 8, 12)
    out = native.conditioning_layout(Condition("edit", 96, 64, states), latent)
    for output, branch in (("positive", "cond"), ("middle", "no_txt"), ("negative", "no_both")):
        (entry,) = out[output]
        assert entry[0] is states[branch]
    assert out["positive"][0][1]["reference_latents"][0] is latent
    assert out["middle"][0][1]["reference_latents"][0] is latent
    assert "reference_latents" not in out["negative"][0][1]
    without = native.conditioning_layout(Condition("edit", 96, 64, states))
    assert all("reference_latents" not in e[0][1] for e in without.values())


def test_scheduler_takes_the_size_from_a_latent():
    mmdit = MMDiTParams(timestep_shift=True)
    scheduler = PACK.NODE_CLASS_MAPPINGS["OvisU1Scheduler"]()
    latent = {"samples": torch.zeros(1, 4, 64, 96)}
    (sigmas,) = scheduler.schedule(_Model(mmdit), 1024, 1024, 10, latent=latent)
    assert torch.equal(sigmas, native.official_sigmas(mmdit, 768, 512, 10))
    with pytest.raises(OvisU1InputError, match="latent"):
        scheduler.schedule(_Model(mmdit), 1024, 1024, 10, latent={"samples": None})
