"""Pure tensor functions: RMS normalisation (AIMv2 and the MMDiT's QK-norm), the timestep embedding, the
image-token grid and the 3-axis rotary position embedding of the MMDiT (official modeling_aimv2.py, RMSNorm;
modeling_yak.py, QKNorm, timestep_embedding, EmbedND / rope / apply_rope).

Nothing here holds state; the model computes the tables once per prompt/size (``MMDiT.prepare``) and reuses them
at every denoising step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / rms(x) over the last dim with the statistics in fp32, cast back to x's dtype, then times ``weight``."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype) * weight


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of the flow time t ∈ [0, 1] (one value per batch row) → [B, dim].

    t is scaled by ``time_factor`` in its own dtype (a bf16 t stays bf16-rounded), the angles are formed in fp32,
    the cosines come first, and the result takes t's dtype.
    """
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half).to(t.device)
    angles = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    if t.is_floating_point():
        emb = emb.to(t)
    return emb


# Device types whose kernels lack float64 (ComfyUI's ``supports_fp64`` names the same: Apple MPS, Intel XPU,
# DirectML's privateuseone).
NO_FLOAT64_DEVICES = ("mps", "xpu", "privateuseone")


def float64_device(device: torch.device) -> torch.device:
    """Where float64 RoPE angles are computed for tensors on ``device``: the device itself, or the CPU for a device
    without float64 (as ComfyUI's ``comfy/ldm/flux/math.py`` ``rope`` does)."""
    device = torch.device(device)
    return torch.device("cpu") if device.type in NO_FLOAT64_DEVICES else device


def rope(pos: Tensor, dim: int, theta: float) -> Tensor:
    """Rotation matrices for one position axis: pos [..., L] → [..., L, dim/2, 2, 2] (fp32, on pos's device).

    ω_k = theta^(-2k/dim) and the angles pos·ω_k are computed in float64 (on the CPU when pos's device has no
    float64); each pair k gets [[cos, -sin], [sin, cos]].
    """
    if dim % 2:
        raise ValueError(f"rotary axis dimension must be even, got {dim}")
    device = float64_device(pos.device)
    exponent = torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim
    omega = 1.0 / (theta**exponent)
    angles = pos.to(device).to(torch.float64)[..., None] * omega  # moved first: MPS cannot cast to float64
    cos, sin = torch.cos(angles), torch.sin(angles)
    rot = torch.stack([cos, -sin, sin, cos], dim=-1)
    return rot.reshape(*rot.shape[:-1], 2, 2).float().to(pos.device)


def embed_positions(ids: Tensor, axes_dim: tuple[int, ...] | list[int], theta: float) -> Tensor:
    """RoPE table for ids [B, L, n_axes] → pe [B, 1, L, sum(axes_dim)/2, 2, 2] (fp32, broadcast over heads)."""
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"ids have {ids.shape[-1]} axes, axes_dim has {len(axes_dim)}")
    pe = torch.cat([rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], dim=-3)
    return pe.unsqueeze(1)


def apply_rope(xq: Tensor, xk: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate interleaved pairs (x[2k], x[2k+1]) of q and k [B, H, L, D] by pe [B|1, 1, L, D/2, 2, 2].

    Computed in fp32, returned in the inputs' dtypes.
    """

    def rotate(x: Tensor) -> Tensor:
        pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
        out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
        return out.reshape(*x.shape).type_as(x)

    return rotate(xq), rotate(xk)


def token_grid(width: int, height: int) -> tuple[int, int]:
    """(rows, cols) of the MMDiT's image tokens for a width×height image: 2×2 patches of the 8× downscaled latent,
    16 pixels a side, a partial patch counting whole (official modeling_yak.py, YakModel.generate_image)."""
    return math.ceil(height / 16), math.ceil(width / 16)


def image_tokens(width: int, height: int) -> int:
    """How many MMDiT tokens a width×height image is (:func:`token_grid`'s rows × cols)."""
    rows, cols = token_grid(width, height)
    return rows * cols


def grid_ids(rows: int, cols: int, axis0: float = 0.0) -> Tensor:
    """Position ids [1, rows·cols, 3] (fp32) of a row-major token grid: [axis0, row, col]."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 0] = axis0
    ids[..., 1] = torch.arange(rows, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(cols, dtype=torch.float32)[None, :]
    return ids.reshape(1, rows * cols, 3)
