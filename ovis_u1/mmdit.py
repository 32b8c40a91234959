"""The Yak MMDiT of Ovis-U1 (``visual_generator.backbone``; official modeling_yak.py, YakTransformer).

A FLUX-style rectified-flow transformer: double-stream blocks (separate image/text weights, joint attention) with an
extra image-only self-attention, then single-stream blocks over [text, image]. The forward is split in two:

* ``refine(txt)`` and ``prepare(tokens, pooled, height, width, context)`` do the work that does not depend on the
  denoising step (token refiner, ``vector_in`` of the pooled text, RoPE tables, ``img_in`` of the context latent);
  its shape-only part (``positions``) and the context projection (``project_context``) can be made once and passed
  in, as the core MODEL does once per sampling run inside ComfyUI;
* ``velocity(x, t, prepared)`` (also ``forward``) is one velocity prediction. A host with its own call convention
  (ComfyUI's diffusion-model call) subclasses the MMDiT, overrides ``forward`` and calls ``velocity``.

Sequence order everywhere: [text (L), noise (N), context (N)]; RoPE ids text [0,0,0], noise [0,row,col],
context [1,row,col]. Parameter names equal the checkpoint keys under ``visual_generator.backbone.``.

Every Linear comes from the ``operations`` namespace given to :class:`MMDiT` (default ``torch.nn``; see
:mod:`ovis_u1.operations`); the QK-norm's ``scale`` is the pack's own and is read through the namespace's ``cast_to``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attention
from .config import MMDiTParams
from .math import apply_rope, embed_positions, grid_ids, image_tokens, rms_norm, timestep_embedding, token_grid
from .operations import cast_to_of
from .refiner import TokenRefiner

LN_EPS = 1e-6
TIME_EMBED_DIM = 256


def layer_norm(x: Tensor) -> Tensor:
    """LayerNorm without affine parameters (eps 1e-6)."""
    return F.layer_norm(x, x.shape[-1:], eps=LN_EPS)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return (1 + scale) * x + shift


def rope_attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """RoPE-rotated attention: q, k, v [B, H, L, D] → [B, L, H·D]."""
    q, k = apply_rope(q, k, pe)
    out = attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """[B, L, 3·H·D] laid out (K H D) → q, k, v [B, H, L, D]."""
    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


class RMSNorm(nn.Module):
    """RMS norm over the last dim, computed in fp32, cast back, times a learnable ``scale`` — a free parameter (its
    checkpoint key is ``scale``, not a norm layer's ``weight``), read through the namespace's ``cast_to`` as core's
    FLUX reads it (``comfy/ldm/flux/layers.py``: RMSNorm → ``comfy.ldm.common_dit.rms_norm``)."""

    def __init__(self, dim: int, eps: float = 1e-6, operations=nn):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.cast_to = cast_to_of(operations)

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.cast_to(self.scale, x), self.eps)


class QKNorm(nn.Module):
    def __init__(self, head_dim: int, operations=nn):
        super().__init__()
        self.query_norm = RMSNorm(head_dim, operations=operations)
        self.key_norm = RMSNorm(head_dim, operations=operations)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """qkv projection + QK-norm (``qkv``, ``norm``) and the output projection (``proj``)."""

    def __init__(self, hidden: int, num_heads: int, qkv_bias: bool, operations=nn):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = operations.Linear(hidden, 3 * hidden, bias=qkv_bias)
        self.norm = QKNorm(hidden // num_heads, operations)
        self.proj = operations.Linear(hidden, hidden)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


class Modulation(nn.Module):
    """Linear(silu(vec)) split into ``chunks`` vectors [B, 1, H] (groups of shift, scale, gate)."""

    def __init__(self, hidden: int, chunks: int, operations=nn):
        super().__init__()
        self.chunks = chunks
        self.lin = operations.Linear(hidden, chunks * hidden)

    def forward(self, vec: Tensor) -> tuple[Tensor, ...]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.chunks, dim=-1)


def gelu_mlp(hidden: int, mlp_hidden: int, operations=nn) -> nn.Sequential:
    return nn.Sequential(
        operations.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), operations.Linear(mlp_hidden, hidden)
    )


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int, operations=nn):
        super().__init__()
        self.in_layer = operations.Linear(in_dim, hidden)
        self.out_layer = operations.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights; joint attention over [text, image] plus an extra
    image-only self-attention (9-way image modulation: joint attention, MLP, self-attention)."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, operations=nn):
        super().__init__()
        mlp_hidden = int(hidden * mlp_ratio)
        self.img_mod = Modulation(hidden, 9, operations)
        self.img_attn = SelfAttention(hidden, num_heads, qkv_bias, operations)
        self.img_self_attn = SelfAttention(hidden, num_heads, qkv_bias, operations)
        self.img_mlp = gelu_mlp(hidden, mlp_hidden, operations)
        self.txt_mod = Modulation(hidden, 6, operations)
        self.txt_attn = SelfAttention(hidden, num_heads, qkv_bias, operations)
        self.txt_mlp = gelu_mlp(hidden, mlp_hidden, operations)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, pe_img: Tensor) -> tuple[Tensor, Tensor]:
        shift1, scale1, gate1, shift2, scale2, gate2, shift3, scale3, gate3 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)

        img_normed = layer_norm(img)
        img_q, img_k, img_v = self.img_attn.heads(modulate(img_normed, shift1, scale1))
        self_q, self_k, self_v = self.img_self_attn.heads(modulate(img_normed, shift3, scale3))
        txt_q, txt_k, txt_v = self.txt_attn.heads(modulate(layer_norm(txt), t_shift1, t_scale1))

        self_out = rope_attention(self_q, self_k, self_v, pe_img)
        joint = rope_attention(
            torch.cat((txt_q, img_q), dim=2), torch.cat((txt_k, img_k), dim=2), torch.cat((txt_v, img_v), dim=2), pe
        )
        txt_out, img_out = joint[:, : txt.shape[1]], joint[:, txt.shape[1] :]

        img = img + gate1 * self.img_attn.proj(img_out)
        img = img + gate3 * self.img_self_attn.proj(self_out)
        img = img + gate2 * self.img_mlp(modulate(layer_norm(img), shift2, scale2))

        txt = txt + t_gate1 * self.txt_attn.proj(txt_out)
        txt = txt + t_gate2 * self.txt_mlp(modulate(layer_norm(txt), t_shift2, t_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over the joint sequence: linear1 → [qkv | mlp], linear2 ← [attn | gelu(mlp)]."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, operations=nn):
        super().__init__()
        self.num_heads = num_heads
        self.hidden = hidden
        self.mlp_hidden = int(hidden * mlp_ratio)
        self.linear1 = operations.Linear(hidden, 3 * hidden + self.mlp_hidden)
        self.linear2 = operations.Linear(hidden + self.mlp_hidden, hidden)
        self.norm = QKNorm(hidden // num_heads, operations)
        self.modulation = Modulation(hidden, 3, operations)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1(modulate(layer_norm(x), shift, scale)).split([3 * self.hidden, self.mlp_hidden], -1)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((rope_attention(q, k, v, pe), F.gelu(mlp, approximate="tanh")), dim=2))
        return x + gate * out


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int, operations=nn):
        super().__init__()
        self.linear = operations.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), operations.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(layer_norm(x), shift, scale))


@dataclass
class Prepared:
    """Step-invariant inputs of one conditioning branch (or several, concatenated along the batch)."""

    txt: Tensor  # refined text tokens [B, L, hidden]
    vec: Tensor  # vector_in(pooled) [B, hidden]
    pe: Tensor  # RoPE table of [text, noise, context] [1, 1, L+N(+N), head_dim/2, 2, 2], fp32
    pe_img: Tensor  # RoPE table of the image tokens only [1, 1, N(+N), head_dim/2, 2, 2], fp32
    context: Tensor | None  # img_in(context tokens) [B, N_ctx, hidden], or None
    height: int
    width: int

    @property
    def batch_size(self) -> int:
        return self.txt.shape[0]

    @property
    def txt_len(self) -> int:
        return self.txt.shape[1]

    @property
    def context_len(self) -> int:
        return 0 if self.context is None else self.context.shape[1]

    def batch_key(self) -> tuple:
        """Branches with equal keys share their RoPE tables and can run as one batched forward."""
        return (self.txt_len, self.context_len, self.height, self.width)

    @staticmethod
    def cat(items: list[Prepared]) -> Prepared:
        """Concatenate branches along the batch (all must have the same ``batch_key``)."""
        first = items[0]
        if len(items) == 1:
            return first
        if any(p.batch_key() != first.batch_key() for p in items):
            raise ValueError("only branches with equal text length and context layout can be batched")
        return Prepared(
            txt=torch.cat([p.txt for p in items]),
            vec=torch.cat([p.vec for p in items]),
            pe=first.pe,
            pe_img=first.pe_img,
            context=None if first.context is None else torch.cat([p.context for p in items]),
            height=first.height,
            width=first.width,
        )


class MMDiT(nn.Module):
    def __init__(self, params: MMDiTParams, operations=nn):
        super().__init__()
        if params.hidden_size % params.num_heads:
            raise ValueError(f"hidden_size {params.hidden_size} is not divisible by num_heads {params.num_heads}")
        if sum(params.axes_dim) != params.head_dim:
            raise ValueError(f"axes_dim {params.axes_dim} must sum to head_dim {params.head_dim}")
        if params.guidance_embed:
            raise ValueError("guidance-distilled MMDiT (guidance_embed=True) is not supported")
        self.params = params
        hidden = params.hidden_size
        self.img_in = operations.Linear(params.in_channels, hidden)
        self.time_in = MLPEmbedder(TIME_EMBED_DIM, hidden, operations)
        self.vector_in = MLPEmbedder(params.vec_in_dim, hidden, operations)
        self.txt_in = TokenRefiner(params, operations=operations)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden, params.num_heads, params.mlp_ratio, params.qkv_bias, operations)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden, params.num_heads, params.mlp_ratio, operations)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(hidden, params.out_channels, operations)

    # ---- step-invariant preparation -------------------------------------------------------------------------

    def refine(self, txt: Tensor) -> tuple[Tensor, Tensor]:
        """LLM condition [B, L, context_in_dim] → (text tokens [B, L, hidden], pooled [B, hidden])."""
        return self.txt_in(txt)

    def positions(self, txt_len: int, height: int, width: int, with_context: bool,
                  device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """RoPE tables (pe of [text, noise (, context)], pe of the image tokens only) on ``device``: they depend on
        the shapes alone, so a caller sampling many steps (or branches of equal text length) builds them once."""
        rows, cols = token_grid(width, height)
        ids = [torch.zeros(1, txt_len, 3), grid_ids(rows, cols, 0.0)]
        if with_context:
            ids.append(grid_ids(rows, cols, 1.0))
        pe = embed_positions(torch.cat(ids, dim=1).to(device), self.params.axes_dim, self.params.theta)
        return pe, pe[:, :, txt_len:]

    def project_context(self, context: Tensor, dtype: torch.dtype) -> Tensor:
        """``img_in`` of the packed context latent [B, N, in_channels], in the compute ``dtype`` (img_in's weight
        may be fp8)."""
        return self.img_in(context.to(dtype))

    def prepare(
        self, tokens: Tensor, pooled: Tensor, height: int, width: int, context: Tensor | None = None,
        positions: tuple[Tensor, Tensor] | None = None, context_tokens: Tensor | None = None,
    ) -> Prepared:
        """Cache everything a denoising step needs besides the latent and the time.

        height/width: output size in pixels (16 px per token); context: packed context latent [B, N, in_channels],
        or ``context_tokens``, its ``project_context`` made earlier; positions: the ``positions`` tables made
        earlier for these shapes (built here when None).
        """
        num_tokens = image_tokens(width, height)
        if context is not None and context_tokens is None:
            if context.shape[1] != num_tokens:
                raise ValueError(f"context has {context.shape[1]} tokens, the {height}x{width} grid has {num_tokens}")
            context_tokens = self.project_context(context, tokens.dtype)
        if context_tokens is not None and context_tokens.shape[1] != num_tokens:
            raise ValueError(f"context has {context_tokens.shape[1]} tokens, the {height}x{width} grid has "
                             f"{num_tokens}")
        if positions is None:
            positions = self.positions(tokens.shape[1], height, width, context_tokens is not None, tokens.device)
        pe, pe_img = positions
        return Prepared(
            txt=tokens,
            vec=self.vector_in(pooled),
            pe=pe,
            pe_img=pe_img,
            context=context_tokens,
            height=height,
            width=width,
        )

    # ---- one velocity prediction ----------------------------------------------------------------------------

    def forward(self, x: Tensor, t: Tensor, prepared: Prepared) -> Tensor:
        return self.velocity(x, t, prepared)

    def velocity(self, x: Tensor, t: Tensor, prepared: Prepared) -> Tensor:
        """x: noise tokens [B, N, in_channels]; t: flow time [B] → predicted velocity [B, N, out_channels]."""
        img = self.img_in(x)
        if prepared.context is not None:
            img = torch.cat((img, prepared.context), dim=1)
        vec = self.time_in(timestep_embedding(t, TIME_EMBED_DIM)) + prepared.vec
        txt = prepared.txt

        for block in self.double_blocks:
            img, txt = block(img, txt, vec, prepared.pe, prepared.pe_img)

        seq = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            seq = block(seq, vec, prepared.pe)

        # The final layer is per-token: run it on the noise tokens only (text and context outputs are dropped).
        start = txt.shape[1]
        return self.final_layer(seq[:, start : start + x.shape[1]], vec)


class PositionCache:
    """The RoPE tables of one sampling run (``MMDiT.positions``: position ids, float64 angles), made once per shape
    instead of at every step. Keyed by text length, size, context and device: conditionings of different text
    lengths (positive / negative) get a table each, alternating freely."""

    def __init__(self):
        self.tables: dict[tuple, tuple[Tensor, Tensor]] = {}

    def positions(self, mmdit: MMDiT, txt_len: int, height: int, width: int, with_context: bool, device):
        key = (id(mmdit), txt_len, height, width, with_context, str(device))
        if key not in self.tables:
            self.tables[key] = mmdit.positions(txt_len, height, width, with_context, device)
        return self.tables[key]
