"""AIMv2 native-resolution encoder and the probabilistic visual tokenizer head (official modeling_aimv2.py,
AIMv2Model; modeling_ovis_u1.py, Aimv2VisualTokenizer).

Module names mirror the checkpoint keys under ``visual_tokenizer.``:
``backbone.preprocessor.{pos_embed, patchifier.{proj, norm}}``, ``backbone.trunk.blocks.{i}.{norm_1, attn.{qkv, proj},
norm_2, mlp.{fc1, fc2, fc3}}``, ``backbone.trunk.post_trunk_norm`` (stored, unused by Ovis) and ``head.{0, 1}``.

No buffers: the RoPE angles, the window permutation and the attention segments depend only on ``grid_thws`` and are
computed in ``forward`` (``VisualGeometry``), so the model can be built on the meta device. They are computed on the
CPU and the last few grids' are kept there (``GeometryCache``, owned by the model); a forward on another device uses
a copy made for that forward, so nothing stays on an accelerator outside the memory manager's accounting.
Parameters may be fp32, bf16 or fp16; RMSNorm statistics, RoPE and the head softmax run in fp32.

Every layer comes from the ``operations`` namespace given to :class:`VisualTokenizer` (default ``torch.nn``; see
:mod:`ovis_u1.operations`); the RMSNorm is the namespace's with the pack's fp32-statistics math, and the positional
table is read through the namespace's ``cast_to``, so weights may stay on an offload device or in another dtype.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention_segments
from .config import VisionParams
from .norms import RMSNorm, norm  # noqa: F401 — RMSNorm re-exported: the class of the encoder's norms
from .operations import cast_to_of, plain_cast_weights

# vte rows V-4..V-1 are reserved for the image indicators (official modeling_ovis_u1.py: IMAGE_INDICATOR_IDS,
# Aimv2VisualTokenizer.forward, OvisU1.merge_multimodal)
NUM_INDICATOR_TOKENS = 4


# ---------------------------------------------------------------------------------------------------------------------
# Pure functions: geometry of a batch of images (official modeling_aimv2.py, AIMv2Transformer)
# ---------------------------------------------------------------------------------------------------------------------

def grid_list(grid_thws: torch.Tensor | list) -> tuple[tuple[int, int, int], ...]:
    """``grid_thws`` [n_img, 3] (tensor or nested list) → a hashable tuple of (t, h, w) ints."""
    rows = grid_thws.tolist() if isinstance(grid_thws, torch.Tensor) else grid_thws
    return tuple((int(t), int(h), int(w)) for t, h, w in rows)


def raster_to_merge_order(x: torch.Tensor, t: int, h: int, w: int, stride: int) -> torch.Tensor:
    """Reorder per-patch rows [t·h·w, ...] from raster order to 2×2 merge-group order (official
    Aimv2VisualTokenizer.preprocess_image)."""
    rest = x.shape[1:]
    x = x.reshape(t, h // stride, stride, w // stride, stride, *rest)
    return x.transpose(2, 3).reshape(t * h * w, *rest)


def interpolate_pos_embed(pos_embed: torch.Tensor, h: int, w: int, method: str) -> torch.Tensor:
    """The original AIMv2 positional table [1, P, D] resampled to an h×w grid → [h·w, D] in raster order (official
    modeling_aimv2.py, AIMv2ViTPreprocessor.forward).

    ``one_dim``: the raster-ordered table treated as a 1-D sequence, linearly interpolated to length h·w.
    ``two_dim``: the table as a √P×√P image, bicubically interpolated to (h, w). Both use align_corners=False and
    are applied even when the sizes already match.
    """
    table = pos_embed.float()
    if method == "one_dim":
        pe = F.interpolate(table.transpose(1, 2), size=h * w, mode="linear", align_corners=False)
        return pe[0].transpose(0, 1)
    if method == "two_dim":
        side = int(table.shape[1] ** 0.5)
        image = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        pe = F.interpolate(image, size=(h, w), mode="bicubic", align_corners=False)
        return pe[0].permute(1, 2, 0).reshape(h * w, -1)
    raise ValueError(f"interpolate_pe_method must be 'one_dim' or 'two_dim', got {method!r}")


def rope_inv_freq(head_dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """Inverse frequencies of the 2-D vision RoPE: 1/θ^(2j/(head_dim/2)), j < head_dim/4, fp32 (official
    modeling_aimv2.py, VisionRotaryEmbedding)."""
    dim = head_dim // 2
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def rope_angles(grids, head_dim: int, stride: int, device=None) -> torch.Tensor:
    """RoPE angles [N, head_dim/2] fp32 for every patch in merge-group order: [row·inv_freq, col·inv_freq] (official
    modeling_aimv2.py, AIMv2Transformer.rot_pos_emb)."""
    inv_freq = rope_inv_freq(head_dim, device=device)
    rows, cols = [], []
    for t, h, w in grids:
        r = torch.arange(h, device=device)[:, None].expand(h, w).reshape(h * w, 1)
        c = torch.arange(w, device=device)[None, :].expand(h, w).reshape(h * w, 1)
        rows.append(raster_to_merge_order(r, 1, h, w, stride).repeat(t, 1))
        cols.append(raster_to_merge_order(c, 1, h, w, stride).repeat(t, 1))
    row = torch.cat(rows).float()
    col = torch.cat(cols).float()
    return torch.cat([row * inv_freq, col * inv_freq], dim=-1)


def window_index(grids, window: int, stride: int) -> tuple[torch.Tensor, list[int]]:
    """Window order of the merge groups and the windows' lengths in patches (official modeling_aimv2.py,
    AIMv2Transformer.get_window_index).

    The merged grid (h/stride, w/stride) of every frame is tiled by ``window``×``window`` windows in raster order,
    groups raster inside each window; windows at the right/bottom edge are smaller. Returns ``index`` (position in
    window order → merge-group id) and the per-window patch counts (empty windows dropped).
    """
    order, lengths, offset = [], [], 0
    for t, h, w in grids:
        mh, mw = h // stride, w // stride
        ids = torch.arange(t * mh * mw).reshape(t, mh, mw)
        for frame in range(t):
            for top in range(0, mh, window):
                for left in range(0, mw, window):
                    block = ids[frame, top:top + window, left:left + window].reshape(-1)
                    order.append(block + offset)
                    lengths.append(block.numel() * stride * stride)
        offset += t * mh * mw
    return torch.cat(order), lengths


@dataclass(frozen=True)
class VisualGeometry:
    """Everything the trunk needs that depends only on the image grids (window order, RoPE, segments)."""

    window_order: torch.Tensor  # [N/s²] merge-group ids in window order
    inverse_order: torch.Tensor  # [N/s²] argsort of window_order
    window_lengths: list[int]  # patch counts of the attention windows (window order)
    image_lengths: list[int]  # patch counts of every frame (full attention)
    cos: torch.Tensor | None  # [N, head_dim] fp32, window order (None when RoPE is disabled)
    sin: torch.Tensor | None

    @staticmethod
    def build(grids, params: VisionParams, device) -> "VisualGeometry":
        s = params.hidden_stride
        window = params.window_size // s // params.patch_size
        order, window_lengths = window_index(grids, window, s)
        order = order.to(device)
        image_lengths = [h * w for t, h, w in grids for _ in range(t)]
        cos = sin = None
        if not params.disable_rope:
            angles = rope_angles(grids, params.head_dim, s, device=device)
            angles = angles.reshape(-1, s * s, angles.shape[-1])[order].reshape(-1, angles.shape[-1])
            angles = torch.cat([angles, angles], dim=-1)
            cos, sin = angles.cos(), angles.sin()
        return VisualGeometry(order, torch.argsort(order), window_lengths, image_lengths, cos, sin)

    def to(self, device) -> "VisualGeometry":
        """The same geometry with its tensors on ``device`` (itself where they already are)."""
        def moved(t):
            return None if t is None else t.to(device)

        return replace(self, window_order=moved(self.window_order), inverse_order=moved(self.inverse_order),
                       cos=moved(self.cos), sin=moved(self.sin))


class GeometryCache:
    """The ``VisualGeometry`` of the last ``size`` image grids, computed and kept on the CPU (least recently used
    dropped first). The largest grid's RoPE tables take 17 MB (fp32 cos and sin of 16 384 patches at the
    processor's 3.2 MP, head_dim 128), so a few grids — the sizes a workflow repeats — are kept and an unbounded
    variety of sizes is not."""

    def __init__(self, size: int = 4):
        self.size = size
        self._entries: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def values(self) -> list[VisualGeometry]:
        return list(self._entries.values())

    def get(self, grids, params: VisionParams) -> VisualGeometry:
        geo = self._entries.pop(grids, None)
        if geo is None:
            geo = VisualGeometry.build(grids, params, torch.device("cpu"))
        self._entries[grids] = geo
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return geo


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (non-interleaved) RoPE over the whole head in fp32: x [N, H, D], cos/sin [N, D] (official
    modeling_aimv2.py, apply_rotary_pos_emb_flashatt)."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


def visual_embeddings(probs: torch.Tensor, vte: nn.Module, cast_weights=plain_cast_weights) -> torch.Tensor:
    """Soft visual embeddings ``probs @ vte.weight`` [N/4, V] × [V, H] → [N/4, H] (official
    modeling_ovis_u1.py, VisualEmbedding.forward).

    Computed in the dtype and on the device of ``probs``: the table is read through ``cast_weights`` (the
    namespace's cast of the embedding layer; it may be stored in fp8 or kept on an offload device).
    """
    with cast_weights(vte, probs) as (table, _):
        return torch.matmul(probs, table)


# ---------------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Conv2d(C→D, k=s=patch) on every 588-vector viewed as (C, ps, ps), then RMSNorm (official modeling_aimv2.py,
    AIMv2PatchEmbed).

    Kept as a convolution: on the goldens it is bit-exact, while the equivalent matmul with the flattened kernel
    differs by ~6e-6 after the trunk (different reduction order).
    """

    def __init__(self, p: VisionParams, operations=nn):
        super().__init__()
        self.proj = operations.Conv2d(p.num_channels, p.hidden_size, kernel_size=p.patch_size, stride=p.patch_size)
        self.norm = norm(p.hidden_size, p.rms_norm_eps, operations)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        c, ps = self.proj.in_channels, self.proj.kernel_size[0]
        if pixel_values.shape[-1] != c * ps * ps:
            raise ValueError(f"pixel_values have {pixel_values.shape[-1]} features per patch, "
                             f"the patch embedding expects {c * ps * ps} (channels x patch x patch)")
        # The norm's weight is never stored in fp8, so its dtype is the compute dtype (the conv's may be fp8).
        x = pixel_values.to(self.norm.weight.dtype).reshape(-1, c, ps, ps)
        return self.norm(self.proj(x).reshape(x.shape[0], -1))


class Preprocessor(nn.Module):
    """Patch embedding + the interpolated original positional embedding in merge-group order (official
    modeling_aimv2.py, AIMv2ViTPreprocessor)."""

    def __init__(self, p: VisionParams, operations=nn):
        super().__init__()
        self.params = p
        self.patchifier = PatchEmbed(p, operations)
        self.cast_to = cast_to_of(operations)
        if p.preserve_original_pe:
            num_patches = (p.image_size // p.patch_size) ** 2
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, p.hidden_size))

    def forward(self, pixel_values: torch.Tensor, grids) -> torch.Tensor:
        tokens = self.patchifier(pixel_values)
        if not self.params.preserve_original_pe:
            return tokens
        s = self.params.hidden_stride
        table = self.cast_to(self.pos_embed, tokens)
        pes = []
        for t, h, w in grids:
            pe = interpolate_pos_embed(table, h, w, self.params.interpolate_pe_method).repeat(t, 1)
            pes.append(raster_to_merge_order(pe, t, h, w, s))
        return tokens + torch.cat(pes).to(tokens.dtype)  # interpolate_pos_embed computes in fp32


class Attention(nn.Module):
    """Multi-head self-attention with 2-D RoPE over given segments (windows or whole images) (official
    modeling_aimv2.py, AIMv2FlashAttention2)."""

    def __init__(self, p: VisionParams, operations=nn):
        super().__init__()
        self.num_heads = p.num_heads
        self.qkv = operations.Linear(p.hidden_size, 3 * p.hidden_size, bias=p.qkv_bias)
        self.proj = operations.Linear(p.hidden_size, p.hidden_size, bias=p.use_bias)

    def forward(self, x: torch.Tensor, lengths: list[int], cos, sin) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, -1).unbind(1)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention_segments(q, k, v, lengths)
        return self.proj(out.reshape(n, -1))


class SwiGLU(nn.Module):
    """fc2(silu(fc1(x)) ⊙ fc3(x)) (official modeling_aimv2.py, AIMv2SwiGLUFFN)."""

    def __init__(self, p: VisionParams, operations=nn):
        super().__init__()
        self.fc1 = operations.Linear(p.hidden_size, p.intermediate_size, bias=p.use_bias)
        self.fc2 = operations.Linear(p.intermediate_size, p.hidden_size, bias=p.use_bias)
        self.fc3 = operations.Linear(p.hidden_size, p.intermediate_size, bias=p.use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))


class Block(nn.Module):
    """Pre-norm transformer block: x += attn(norm_1(x)); x += mlp(norm_2(x)) (official modeling_aimv2.py,
    AIMv2Block)."""

    def __init__(self, p: VisionParams, operations=nn):
        super().__init__()
        self.norm_1 = norm(p.hidden_size, p.rms_norm_eps, operations)
        self.attn = Attention(p, operations)
        self.norm_2 = norm(p.hidden_size, p.rms_norm_eps, operations)
        self.mlp = SwiGLU(p, operations)

    def forward(self, x: torch.Tensor, lengths: list[int], cos, sin) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), lengths, cos, sin)
        return x + self.mlp(self.norm_2(x))


class Trunk(nn.Module):
    """The AIMv2 blocks, run in window order; ``post_trunk_norm`` is stored but not applied (official
    modeling_aimv2.py, AIMv2Transformer.forward)."""

    def __init__(self, p: VisionParams, operations=nn):
        super().__init__()
        self.params = p
        self.blocks = nn.ModuleList(Block(p, operations) for _ in range(p.num_layers))
        self.post_trunk_norm = norm(p.hidden_size, p.rms_norm_eps, operations)

    def is_full_attention(self, index: int) -> bool:
        full = self.params.fullatt_block_indexes
        return full is None or index in full

    def forward(self, x: torch.Tensor, geo: VisualGeometry) -> torch.Tensor:
        n, d = x.shape
        group = self.params.hidden_stride ** 2
        x = x.reshape(n // group, group, d)[geo.window_order].reshape(n, d)
        for index, block in enumerate(self.blocks):
            lengths = geo.image_lengths if self.is_full_attention(index) else geo.window_lengths
            x = block(x, lengths, geo.cos, geo.sin)
        return x.reshape(n // group, group, d)[geo.inverse_order].reshape(n, d)


class AIMv2Backbone(nn.Module):
    """``visual_tokenizer.backbone``: preprocessor (patch embed + PE) and trunk (official modeling_aimv2.py,
    AIMv2Model)."""

    def __init__(self, p: VisionParams, operations=nn):
        super().__init__()
        self.preprocessor = Preprocessor(p, operations)
        self.trunk = Trunk(p, operations)


class VisualTokenizer(nn.Module):
    """``visual_tokenizer``: AIMv2 backbone + head Linear(4·D → V−4) → LayerNorm → softmax (official
    modeling_ovis_u1.py, Aimv2VisualTokenizer)."""

    def __init__(self, params: VisionParams, operations=nn):
        super().__init__()
        self.params = params
        self.backbone = AIMv2Backbone(params, operations)
        merged = params.hidden_size * params.hidden_stride ** 2
        head_dim = params.vocab_size - NUM_INDICATOR_TOKENS
        self.head = nn.Sequential(operations.Linear(merged, head_dim, bias=False), operations.LayerNorm(head_dim))
        self._geometry = GeometryCache()  # not buffers: on the CPU, whatever device the weights are on

    def geometry(self, grid_thws, device) -> VisualGeometry:
        """The grids' geometry on ``device``: a copy the caller's forward holds (the cache keeps the CPU one)."""
        return self._geometry.get(grid_list(grid_thws), self.params).to(device)

    def encode(self, pixel_values: torch.Tensor, grid_thws) -> torch.Tensor:
        """pixel_values [N, C·ps·ps], grid_thws [n_img, 3] → last-block features [N, D] in merge-group order
        (un-permuted, without post_trunk_norm; images attend only within themselves) (official
        modeling_aimv2.py, AIMv2Transformer.forward; modeling_ovis_u1.py, Aimv2VisualTokenizer.encode)."""
        grids = grid_list(grid_thws)
        expected = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape[0] != expected:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches, grid_thws describe {expected}")
        x = self.backbone.preprocessor(pixel_values, grids)
        return self.backbone.trunk(x, self.geometry(grids, x.device))

    def merge(self, features: torch.Tensor) -> torch.Tensor:
        """Concatenate the s² patches of every merge group: [N, D] → [N/s², s²·D] (official
        Aimv2VisualTokenizer.encode)."""
        return features.reshape(features.shape[0] // self.params.hidden_stride ** 2, -1)

    def head_logits(self, merged: torch.Tensor) -> torch.Tensor:
        """LayerNorm(Linear(merged)) [N/s², V−4] — the logits the softmax is taken over (official
        Aimv2VisualTokenizer.forward; the head built in BaseVisualTokenizer.__init__)."""
        return self.head(merged)

    def tokenize(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax in fp32, cast back, plus 4 zero indicator columns → [N/s², V] (official
        BaseVisualTokenizer.tokenize, Aimv2VisualTokenizer.forward).

        As in the official ``tokenize_function == 'softmax'`` branch, ``tau`` is not applied (it only scales the
        gumbel variant, which inference never uses).
        """
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(logits.dtype)
        return F.pad(probs, (0, NUM_INDICATOR_TOKENS))

    def forward(self, pixel_values: torch.Tensor, grid_thws) -> torch.Tensor:
        """pixel_values, grid_thws → visual-word probabilities [N/s², V] (official
        Aimv2VisualTokenizer.forward)."""
        return self.tokenize(self.head_logits(self.merge(self.encode(pixel_values, grid_thws))))
