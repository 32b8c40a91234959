"""Rectified-flow sampling for the MMDiT (official modeling_yak.py: YakModel.generate_image, get_noise,
YakModel.get_schedule / denoise / edit_denoise; the 2×2 packing of YakModel.compute_vae_encodings; unpack).

Latents are 4-channel VAE latents at 1/8 resolution, packed into 2×2 patches: a [B, 4, 2h, 2w] latent becomes
[B, h·w, 16] tokens (token = row·w + col, feature = c·4 + py·2 + px). Time runs from 1 (noise) to 0 (data) and the
model predicts the velocity; one Euler step is x ← x + (t_prev − t_curr)·v.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from einops import rearrange
from torch import Tensor

from .math import image_tokens, token_grid
from .mmdit import MMDiT, Prepared

# ---- schedule and noise -------------------------------------------------------------------------------------


def flow_schedule(
    steps: int, num_tokens: int, shift: bool, base_shift: float = 0.5, max_shift: float = 1.15
) -> list[float]:
    """steps+1 times from 1 to 0 (float32 linspace, returned as Python floats).

    With ``shift`` the times are bent towards 1 by mu, a linear function of the token count through
    (256, base_shift) and (4096, max_shift): t ← e^mu / (e^mu + 1/t − 1).
    """
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float32)
    if shift:
        mu = shift_mu(num_tokens, base_shift, max_shift)
        t = math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
    return t.tolist()


def shift_mu(num_tokens: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's time-shift mu: linear in the token count through (256, base_shift) and (4096, max_shift)."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return slope * num_tokens + (base_shift - slope * 256)


def flow_sigmas(mmdit_params, width: int, height: int, steps: int, timestep_shift: bool | None = None,
                denoise: float = 1.0) -> Tensor:
    """The official schedule of a width×height image as a float32 tensor (1 → 0, steps + 1 values); the shift as
    the checkpoint's config says unless ``timestep_shift`` overrides it. ``denoise`` < 1: the last ``steps`` of a
    ``steps / denoise`` schedule (as ComfyUI's BasicScheduler takes the tail)."""
    shift = mmdit_params.timestep_shift if timestep_shift is None else timestep_shift
    total = steps if denoise >= 1.0 else int(steps / denoise)
    times = flow_schedule(total, image_tokens(width, height), shift, mmdit_params.base_shift, mmdit_params.max_shift)
    return torch.tensor(times[-(steps + 1):], dtype=torch.float32)


NOISE_DTYPE = torch.bfloat16  # the official get_noise draws the starting noise in bf16


def initial_noise(seed: int, height: int, width: int, channels: int = 4) -> Tensor:
    """The official starting noise: bf16 [1, channels, 2·⌈H/16⌉, 2·⌈W/16⌉] from a seeded CPU generator.

    height/width are the output size in pixels, already floored to multiples of 16 by the caller (official
    modeling_yak.py, YakModel.generate_image and get_noise).
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    rows, cols = token_grid(width, height)
    return torch.randn(1, channels, 2 * rows, 2 * cols, dtype=NOISE_DTYPE, generator=generator)


def in_noise_precision(noise: Tensor) -> Tensor:
    """``noise`` rounded to the official noise's bf16, kept in its own dtype. ComfyUI draws fp32 noise from the same
    seeded CPU generator; for a latent's shape (4 channels × an even grid) torch's bf16 ``randn`` on the CPU is the
    bf16 rounding of that fp32 draw, so the same seed gives the official noise."""
    return noise.to(NOISE_DTYPE).to(noise.dtype)


# ---- packing ------------------------------------------------------------------------------------------------


def pack_latents(z: Tensor) -> Tensor:
    """[B, C, 2h, 2w] → [B, h·w, C·4]: 2×2 patches in raster order, feature index c·4 + py·2 + px (the patchify of
    ComfyUI's comfy/ldm/flux/model.py)."""
    return rearrange(z, "b c (h py) (w px) -> b (h w) (c py px)", py=2, px=2)


def unpack_latents(tokens: Tensor, height: int, width: int, channels: int = 4) -> Tensor:
    """[B, ⌈H/16⌉·⌈W/16⌉, channels·4] → [B, channels, 2⌈H/16⌉, 2⌈W/16⌉] (inverse of ``pack_latents``)."""
    rows, cols = token_grid(width, height)
    if tokens.shape[1:] != (rows * cols, channels * 4):
        raise ValueError(f"tokens {tuple(tokens.shape)} do not fit a {height}x{width} image of {channels} channels")
    return rearrange(tokens, "b (h w) (c py px) -> b c (h py) (w px)", h=rows, w=cols, py=2, px=2)


# ---- classifier-free guidance -------------------------------------------------------------------------------


def guide_t2i(cond: Tensor, uncond: Tensor, txt_cfg: float) -> Tensor:
    return uncond + txt_cfg * (cond - uncond)


def guide_edit(cond: Tensor, no_txt: Tensor, no_both: Tensor, img_cfg: float, txt_cfg: float) -> Tensor:
    return no_both + img_cfg * (no_txt - no_both) + txt_cfg * (cond - no_txt)


# ---- the Euler loop -----------------------------------------------------------------------------------------


def group_branches(branches: Sequence[Prepared], batch: bool = True) -> list[tuple[list[int], Prepared]]:
    """Group CFG branches that can share one forward (same text length and context layout), in first-seen order."""
    if not batch:
        return [([i], p) for i, p in enumerate(branches)]
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(branches):
        groups.setdefault(p.batch_key(), []).append(i)
    return [(idx, Prepared.cat([branches[i] for i in idx])) for idx in groups.values()]


def predict(model: MMDiT, x: Tensor, t_vec: Tensor, groups: list[tuple[list[int], Prepared]]) -> list[Tensor]:
    """Velocity of every branch for latent x [B, N, C] at times t_vec [B], one forward per group."""
    preds: list[Tensor | None] = [None] * sum(len(idx) for idx, _ in groups)
    for idx, prepared in groups:
        n = len(idx)
        out = model.velocity(x.repeat(n, 1, 1) if n > 1 else x, t_vec.repeat(n) if n > 1 else t_vec, prepared)
        for i, chunk in zip(idx, out.split(x.shape[0])):
            preds[i] = chunk
    return preds  # type: ignore[return-value]


def denoise(
    model: MMDiT,
    x: Tensor,
    timesteps: Sequence[float],
    branches: Sequence[Prepared],
    guide: Callable[[list[Tensor]], Tensor] | None = None,
    callback: Callable[[int, int, Tensor], None] | None = None,
    trace: list[dict] | None = None,
    batch: bool = True,
) -> Tensor:
    """Integrate x [B, N, C] from timesteps[0] to timesteps[-1].

    Every step evaluates each branch (batching compatible ones) and combines their velocities with ``guide(preds)``
    (a list in branch order; None: the single branch's prediction). ``callback(done, total, x, denoised)`` runs after each
    step with the number of steps done so far (1..total), the new latent and the current estimate of the clean
    latent, x − t·v (for previews); raise in it to interrupt. ``trace``, if given, receives one dict per step with t_curr, t_prev,
    t_vec, latent_in, preds (list, branch order), pred (guided) and latent_out.
    """
    groups = group_branches(branches, batch)
    total = len(timesteps) - 1
    for step, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        t_vec = torch.full((x.shape[0],), t_curr, dtype=x.dtype, device=x.device)
        preds = predict(model, x, t_vec, groups)
        pred = guide(preds) if guide is not None else preds[0]
        x_next = x + (t_prev - t_curr) * pred
        if trace is not None:
            trace.append(
                dict(t_curr=t_curr, t_prev=t_prev, t_vec=t_vec, latent_in=x, preds=preds, pred=pred, latent_out=x_next)
            )
        if callback is not None:
            callback(step + 1, total, x_next, x - t_curr * pred)
        x = x_next
    return x


# ---- the official recipe ------------------------------------------------------------------------------------

# The CFG branches of each mode, in the order ``guide_t2i`` / ``guide_edit`` take them, and whether the branch sees
# the edit context (official modeling_yak.py: denoise for text-to-image, edit_denoise for edits).
GUIDED_BRANCHES = {
    "t2i": (("cond", False), ("no_both", False)),
    "edit": (("cond", True), ("no_txt", True), ("no_both", False)),
}


def sample_condition(
    mmdit: MMDiT,
    mode: str,
    branches: dict[str, tuple[Tensor, Tensor]],
    width: int,
    height: int,
    device: torch.device,
    dtype: torch.dtype,
    context: Tensor | None = None,
    steps: int = 50,
    txt_cfg: float = 5.0,
    img_cfg: float = 1.5,
    seed: int = 42,
    timestep_shift: bool | None = None,
    callback: Callable[[int, int, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """The official generation of one refined condition (official modeling_yak.py, YakModel.generate_image): the
    seeded noise, the schedule of :func:`flow_sigmas`, Euler over the mode's CFG branches (``branches``: refined
    tokens and pooled vector per branch name, those of ``GUIDED_BRANCHES[mode]`` read; ``context``: the edit's packed
    latent tokens) → the latent, fp32 and
    unpacked, in the MMDiT's latent space. Inputs are taken as checked."""
    x = pack_latents(initial_noise(seed, height, width).to(device=device, dtype=dtype))
    timesteps = flow_sigmas(mmdit.params, width, height, steps, timestep_shift).tolist()
    prepared = []
    for name, with_context in GUIDED_BRANCHES[mode]:
        tokens, pooled = branches[name]
        ctx = context.to(device=device, dtype=dtype) if with_context else None
        prepared.append(mmdit.prepare(tokens.to(device, dtype), pooled.to(device, dtype), height, width, context=ctx))
    if mode == "t2i":
        def guide(preds):
            return guide_t2i(preds[0], preds[1], txt_cfg)
    else:
        def guide(preds):
            return guide_edit(preds[0], preds[1], preds[2], img_cfg, txt_cfg)
    x = denoise(mmdit, x, timesteps, prepared, guide, callback=callback)
    return unpack_latents(x.float(), height, width)
