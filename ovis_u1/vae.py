"""SDXL-structured AutoencoderKL (``visual_generator.vae``), written without diffusers.

Parameter names follow the current diffusers layout exactly, so the checkpoint's ``visual_generator.vae.*`` tensors
load with strict key matching (legacy ``query/key/value/proj_attn`` attention names are accepted, as diffusers'
``ModelMixin._convert_deprecated_attention_blocks`` renames them on load).

Structure (diffusers 0.31 ``AutoencoderKL`` with ``DownEncoderBlock2D`` / ``UpDecoderBlock2D``):

* encoder: conv_in → down_blocks (``layers_per_block`` resnets each, stride-2 conv with (0,1,0,1) zero padding after
  every block but the last) → mid block (resnet, single-head self-attention, resnet) → GroupNorm → SiLU → conv_out
  (2·latent_channels: mean and log-variance);
* quant_conv / post_quant_conv: 1×1 convs on the moments / the latent;
* decoder: conv_in → mid block → up_blocks (``layers_per_block + 1`` resnets, nearest ×2 + conv after every block
  but the last) → GroupNorm → SiLU → conv_out.

All GroupNorms use eps 1e-6. In half precision GroupNorm and the attention run in fp32 and cast back, so a bf16 VAE
gives sane output on any device; in fp32 the computation is operation-for-operation the one of diffusers.

The scaling/shift factors are applied outside: :func:`vae_to_latent` / :func:`latent_to_vae` (official
modeling_yak.py, YakModel.compute_vae_encodings and generate_image).

Every layer comes from the ``operations`` namespace given to :class:`AutoencoderKL` (default ``torch.nn``; see
:mod:`ovis_u1.operations`); the GroupNorms are the namespace's GroupNorm with the pack's math (it differs in half
precision), reading their weights through the namespace's cast.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from .attention import pack_attention
from .config import VAEParams
from .operations import OwnLayer, namespace_layer

__all__ = [
    "AutoencoderKL",
    "legacy_vae_key",
    "latent_to_vae",
    "scale_latent",
    "unscale_latent",
    "vae_to_latent",
    "to_uint8_image",
]

_EPS = 1e-6
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class GroupNorm32(OwnLayer, nn.GroupNorm):
    """Affine GroupNorm that normalises in fp32 when its input is fp16/bf16 and casts the result back.

    Its half-precision math differs from a plain GroupNorm; built from a namespace (:func:`group_norm`) it is the
    namespace's GroupNorm with this math, reading ``weight``/``bias`` through the namespace's cast at the
    (fp32-promoted) input's device and dtype, and making the namespace's per-op call first.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.every_op()
        xc = x.float() if x.dtype in _LOW_PRECISION else x
        with self.cast_weights(self, xc) as (weight, bias):
            out = F.group_norm(xc, self.num_groups, weight, bias, self.eps)
        return out.to(x.dtype)


def group_norm(num_groups: int, num_channels: int, operations=nn) -> GroupNorm32:
    return namespace_layer(GroupNorm32, operations, "GroupNorm")(num_groups, num_channels, eps=_EPS)


class ResnetBlock(nn.Module):
    """diffusers ``ResnetBlock2D`` without time embedding: x + conv2(silu(norm2(conv1(silu(norm1(x))))))."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, operations=nn):
        super().__init__()
        self.norm1 = group_norm(groups, in_channels, operations)
        self.conv1 = operations.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(groups, out_channels, operations)
        self.conv2 = operations.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = operations.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x.contiguous())
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels with GroupNorm in front and a residual connection."""

    _LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

    def __init__(self, channels: int, groups: int, operations=nn):
        super().__init__()
        self.group_norm = group_norm(groups, channels, operations)
        self.to_q = operations.Linear(channels, channels)
        self.to_k = operations.Linear(channels, channels)
        self.to_v = operations.Linear(channels, channels)
        self.to_out = nn.ModuleList([operations.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # [B, C, HW]: the norm sees the channel-first view, the projections the token-first one.
        tokens = self.group_norm(x.view(b, c, h * w)).transpose(1, 2)
        q = self.to_q(tokens)[:, None]  # [B, 1, L, C] — one head of width C
        k = self.to_k(tokens)[:, None]
        v = self.to_v(tokens)[:, None]
        if q.dtype in _LOW_PRECISION:
            out = pack_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            out = pack_attention(q, k, v)
        out = self.to_out[0](out[:, 0])
        return out.transpose(1, 2).reshape(b, c, h, w) + x


class MidBlock(nn.Module):
    """resnet → attention → resnet (``UNetMidBlock2D`` with one layer; attention optional)."""

    def __init__(self, channels: int, groups: int, add_attention: bool, operations=nn):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(channels, channels, groups, operations), ResnetBlock(channels, channels, groups, operations)]
        )
        self.attentions = nn.ModuleList([AttentionBlock(channels, groups, operations)] if add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Zero-pad right/bottom by one pixel, then a 3×3 conv with stride 2."""

    def __init__(self, channels: int, operations=nn):
        super().__init__()
        self.conv = operations.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels: int, operations=nn):
        super().__init__()
        self.conv = operations.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= 64:
            x = x.contiguous()
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, downsample: bool,
                 operations=nn):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, operations)
             for i in range(num_layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels, operations)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers:
            x = down(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool,
                 operations=nn):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, operations)
             for i in range(num_layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels, operations)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers:
            x = up(x)
        return x


class Encoder(nn.Module):
    def __init__(self, p: VAEParams, operations=nn):
        super().__init__()
        ch = p.block_out_channels
        g = p.norm_num_groups
        self.conv_in = operations.Conv2d(p.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                DownBlock(ch[max(i - 1, 0)], ch[i], p.layers_per_block, g, downsample=i < len(ch) - 1,
                          operations=operations)
                for i in range(len(ch))
            ]
        )
        self.mid_block = MidBlock(ch[-1], g, p.mid_block_add_attention, operations)
        self.conv_norm_out = group_norm(g, ch[-1], operations)
        self.conv_out = operations.Conv2d(ch[-1], 2 * p.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, p: VAEParams, operations=nn):
        super().__init__()
        ch = tuple(reversed(p.block_out_channels))
        g = p.norm_num_groups
        self.conv_in = operations.Conv2d(p.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, p.mid_block_add_attention, operations)
        self.up_blocks = nn.ModuleList(
            [
                UpBlock(ch[max(i - 1, 0)], ch[i], p.layers_per_block + 1, g, upsample=i < len(ch) - 1,
                        operations=operations)
                for i in range(len(ch))
            ]
        )
        self.conv_norm_out = group_norm(g, ch[-1], operations)
        self.conv_out = operations.Conv2d(ch[-1], p.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """The Ovis-U1 VAE. ``encode`` → (mean, logvar); ``sample_latent``; ``decode`` (no scaling inside)."""

    def __init__(self, params: VAEParams, operations=nn):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params, operations)
        self.decoder = Decoder(params, operations)
        self.quant_conv = operations.Conv2d(2 * params.latent_channels, 2 * params.latent_channels, 1)
        self.post_quant_conv = operations.Conv2d(params.latent_channels, params.latent_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    def encode(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, 3, H, W] in [-1, 1] → (mean, logvar), each [B, latent, H/8, W/8]; logvar clamped to [-30, 20].
        Computed on x's device in ``dtype`` (None: the weights' dtype); a host that keeps some weights elsewhere
        (a partial load) passes its own device and dtype and its layers cast the weights there."""
        moments = self.quant_conv(self.encoder(x.to(dtype or self.dtype)))
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return mean, torch.clamp(logvar, -30.0, 20.0)

    @staticmethod
    def sample_latent(
        mean: torch.Tensor,
        logvar: torch.Tensor,
        generator: torch.Generator | torch.Tensor | None = None,
        *,
        eps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Posterior sample mean + exp(0.5·logvar)·ε.

        ε is ``eps`` if given (also accepted as a tensor in place of ``generator``), otherwise
        ``torch.randn(mean.shape, generator=generator, dtype=mean.dtype)`` drawn on the CPU and moved to mean's device
        (generator None: the global CPU RNG, like diffusers' ``latent_dist.sample()`` on CPU).
        """
        if isinstance(generator, torch.Tensor):
            if eps is not None:
                raise ValueError("give ε either as `generator` tensor or as `eps`, not both")
            eps, generator = generator, None
        if eps is None:
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        std = torch.exp(0.5 * logvar)
        return mean + std * eps.to(device=mean.device, dtype=mean.dtype)

    def decode(self, z: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """z: [B, latent, h, w] (unscaled VAE space) → image [B, 3, 8h, 8w], not clamped; on z's device in ``dtype``
        (None: the weights' dtype), as :meth:`encode`."""
        return self.decoder(self.post_quant_conv(z.to(dtype or self.dtype)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z)


# --- state-dict compatibility --------------------------------------------------------------------------------------

_LEGACY_RE = re.compile(r"^(?P<pre>(?:.*\.)?mid_block\.attentions\.\d+\.)(?P<name>query|key|value|proj_attn)\.(?P<p>weight|bias)$")


def legacy_vae_key(key: str) -> str:
    """The current diffusers name of a VAE key written by an old diffusers (query/key/value/proj_attn).

    The checkpoint loader applies it to every stored key; such old checkpoints may also hold these weights as 1×1
    convolutions [C, C, 1, 1], which the loader reshapes to the Linear's [C, C].
    """
    m = _LEGACY_RE.match(key)
    if m is None:
        return key
    return f"{m['pre']}{AttentionBlock._LEGACY[m['name']]}.{m['p']}"


# --- latent scaling and image conversion ---------------------------------------------------------------------------


def _vae_params(params) -> VAEParams:
    return params.vae if hasattr(params, "vae") else params


def vae_to_latent(z: torch.Tensor, params) -> torch.Tensor:
    """VAE space → diffusion latent with the checkpoint's factors (:func:`scale_latent`)."""
    p = _vae_params(params)
    return scale_latent(z, p.scaling_factor, p.shift_factor)


def latent_to_vae(latent: torch.Tensor, params) -> torch.Tensor:
    """Diffusion latent → VAE space with the checkpoint's factors (:func:`unscale_latent`)."""
    p = _vae_params(params)
    return unscale_latent(latent, p.scaling_factor, p.shift_factor)


def scale_latent(z: torch.Tensor, scaling_factor: float, shift_factor: float | None) -> torch.Tensor:
    """VAE space → diffusion latent: (z − shift) · scale (shift only when shift_factor is set)."""
    return (z if shift_factor is None else z - shift_factor) * scaling_factor


def unscale_latent(latent: torch.Tensor, scaling_factor: float, shift_factor: float | None) -> torch.Tensor:
    """Diffusion latent → VAE space: latent / scale + shift (the inverse of :func:`scale_latent`)."""
    z = latent / scaling_factor
    return z if shift_factor is None else z + shift_factor


def to_uint8_image(x: torch.Tensor) -> torch.Tensor:
    """Decoded image [B, 3, H, W] → uint8 [B, H, W, 3]: clamp(−1, 1), 127.5·(x + 1), truncating cast (official
    modeling_yak.py, YakModel.generate_image)."""
    x = x.detach().float().clamp(-1.0, 1.0)
    return (127.5 * (x + 1.0)).byte().permute(0, 2, 3, 1).contiguous()
