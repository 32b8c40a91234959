"""The official Ovis-U1 schedule as SIGMAS (``ovis_u1.sampling.flow_sigmas``, what the MMDiT Sampler and the Ovis-U1
Scheduler hand to ComfyUI's samplers): the golden timesteps of the official code, the resolution-dependent shift
(official modeling_yak.py YakModel.get_schedule), the config's shift unless overridden, and denoise < 1 as the tail
of a longer schedule, the way ComfyUI's BasicScheduler takes it (comfy_extras/nodes_custom_sampler.py)."""

from __future__ import annotations

import math

import pytest
import torch

from ovis_u1.config import MMDiTParams, load_params
from ovis_u1.sampling import flow_schedule, flow_sigmas, image_tokens, shift_mu
from tests.golden import CHECKPOINT, case_params, requires_golden, tensors


@requires_golden
@pytest.mark.parametrize("case", ["t2i", "edit"])
def test_the_golden_timesteps(case):
    """The checkpoint's own config (tiny_a: no shift) at the golden's size gives the official times exactly."""
    p, t = case_params(case), tensors(case)
    height, width = t["noise"].shape[-2] * 8, t["noise"].shape[-1] * 8
    sigmas = flow_sigmas(load_params(CHECKPOINT).mmdit, width, height, p["steps"])
    assert sigmas.dtype == torch.float32 and sigmas.shape == (p["steps"] + 1,)
    assert torch.equal(sigmas, t["timesteps"].float().flatten())


@pytest.mark.parametrize("size", [(1024, 1024), (512, 768), (64, 64), (72, 40)])
def test_the_shift_follows_the_image_size(size):
    width, height = size
    mmdit = MMDiTParams(timestep_shift=True)
    tokens = math.ceil(height / 16) * math.ceil(width / 16)
    assert image_tokens(width, height) == tokens
    sigmas = flow_sigmas(mmdit, width, height, 20)
    assert sigmas.tolist() == flow_schedule(20, tokens, True, mmdit.base_shift, mmdit.max_shift)
    mu = shift_mu(tokens, mmdit.base_shift, mmdit.max_shift)
    linear = torch.linspace(1, 0, 21, dtype=torch.float32)[1:-1].double()
    bent = math.exp(mu) / (math.exp(mu) + 1 / linear - 1)  # t ← e^mu / (e^mu + 1/t − 1)
    torch.testing.assert_close(sigmas[1:-1].double(), bent, rtol=0, atol=1e-6)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and bool((sigmas[1:] < sigmas[:-1]).all())
    assert bool((sigmas[1:-1] > torch.linspace(1, 0, 21)[1:-1]).all())  # bent towards noise


def test_mu_is_linear_through_the_two_anchor_points():
    assert shift_mu(256) == pytest.approx(0.5) and shift_mu(4096) == pytest.approx(1.15)
    assert shift_mu(256, 0.2, 0.9) == pytest.approx(0.2) and shift_mu(4096, 0.2, 0.9) == pytest.approx(0.9)
    assert shift_mu(2176) == pytest.approx((0.5 + 1.15) / 2)


def test_the_override_beats_the_config():
    on, off = MMDiTParams(timestep_shift=True), MMDiTParams(timestep_shift=False)
    linear = flow_schedule(10, 4096, False)
    assert flow_sigmas(off, 1024, 1024, 10).tolist() == linear
    assert flow_sigmas(on, 1024, 1024, 10, timestep_shift=False).tolist() == linear
    assert flow_sigmas(off, 1024, 1024, 10, timestep_shift=True).tolist() == flow_schedule(10, 4096, True)
    assert flow_sigmas(on, 1024, 1024, 10, timestep_shift=None).tolist() == flow_schedule(10, 4096, True)


@pytest.mark.parametrize("steps, denoise", [(6, 0.6), (10, 0.5), (3, 0.99), (5, 0.2)])
@pytest.mark.parametrize("shift", [False, True])
def test_denoise_takes_the_tail_of_a_longer_schedule_as_basic_scheduler_does(steps, denoise, shift):
    mmdit = MMDiTParams(timestep_shift=shift)
    sigmas = flow_sigmas(mmdit, 512, 512, steps, denoise=denoise)
    total = int(steps / denoise)  # BasicScheduler: total_steps = int(steps / denoise); sigmas[-(steps + 1):]
    assert sigmas.tolist() == flow_schedule(total, 1024, shift)[-(steps + 1):]
    assert sigmas.shape == (steps + 1,) and sigmas[-1] == 0.0
    assert bool(sigmas[0] < 1.0) == (total > steps)  # 3 / 0.99 rounds down to the whole schedule, as in ComfyUI
