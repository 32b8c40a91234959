"""The token refiner ``txt_in`` of the MMDiT (official modeling_yak.py, SingleTokenRefiner / IndividualTokenRefiner).

It turns the LLM condition [B, L, context_in_dim] into MMDiT text tokens [B, L, hidden] plus one pooled vector
[B, hidden] (a learned CLS token prepended before the refiner blocks). Its modulation vector depends only on the
text (no timestep), so it runs once per prompt, not once per denoising step. Linear and LayerNorm layers come from
the ``operations`` namespace (default ``torch.nn``; see :mod:`ovis_u1.operations`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attention
from .config import MMDiTParams
from .operations import cast_to_of

# Fixed by the architecture (not in config.json): the checkpoint stores individual_token_refiner.blocks.{0,1},
# the attention uses twice the MMDiT head count, and the MLP is 4× wide.
REFINER_DEPTH = 2
REFINER_HEAD_FACTOR = 2
REFINER_MLP_RATIO = 4.0


class TextProjection(nn.Module):
    """Mean-pooled condition → modulation vector c (Linear → SiLU → Linear)."""

    def __init__(self, in_dim: int, hidden: int, operations=nn):
        super().__init__()
        self.linear_1 = operations.Linear(in_dim, hidden)
        self.linear_2 = operations.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class RefinerMLP(nn.Module):
    def __init__(self, hidden: int, mlp_hidden: int, operations=nn):
        super().__init__()
        self.fc1 = operations.Linear(hidden, mlp_hidden)
        self.fc2 = operations.Linear(mlp_hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class RefinerBlock(nn.Module):
    """Pre-LN transformer block with gated residuals; gates come from c. No RoPE, no QK-norm, no mask."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float = REFINER_MLP_RATIO, qkv_bias: bool = True,
                 operations=nn):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = operations.LayerNorm(hidden, eps=1e-6)
        self.self_attn_qkv = operations.Linear(hidden, 3 * hidden, bias=qkv_bias)
        self.self_attn_proj = operations.Linear(hidden, hidden, bias=qkv_bias)
        self.norm2 = operations.LayerNorm(hidden, eps=1e-6)
        self.mlp = RefinerMLP(hidden, int(hidden * mlp_ratio), operations)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), operations.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        gate_attn, gate_mlp = self.adaLN_modulation(c)[:, None, :].chunk(2, dim=-1)
        b, n, _ = x.shape
        q, k, v = self.self_attn_qkv(self.norm1(x)).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        x = x + self.self_attn_proj(attn) * gate_attn
        x = x + self.mlp(self.norm2(x)) * gate_mlp
        return x


class IndividualTokenRefiner(nn.Module):
    def __init__(self, hidden: int, num_heads: int, depth: int, qkv_bias: bool = True, operations=nn):
        super().__init__()
        self.blocks = nn.ModuleList(
            RefinerBlock(hidden, num_heads, qkv_bias=qkv_bias, operations=operations) for _ in range(depth)
        )

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x, c)
        return x


class TokenRefiner(nn.Module):
    """``txt_in``: forward(txt [B, L, context_in_dim]) → (tokens [B, L, hidden], pooled [B, hidden])."""

    def __init__(self, params: MMDiTParams, depth: int = REFINER_DEPTH, operations=nn):
        super().__init__()
        hidden = params.hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.cast_to = cast_to_of(operations)
        self.input_embedder = operations.Linear(params.context_in_dim, hidden)
        self.c_embedder = TextProjection(params.context_in_dim, hidden, operations)
        self.individual_token_refiner = IndividualTokenRefiner(
            hidden, REFINER_HEAD_FACTOR * params.num_heads, depth, operations=operations
        )

    def forward(self, txt: Tensor) -> tuple[Tensor, Tensor]:
        c = self.c_embedder(txt.mean(dim=1))
        x = self.input_embedder(txt)
        x = torch.cat([self.cast_to(self.cls_token, x).expand(x.shape[0], -1, -1), x], dim=1)
        x = self.individual_token_refiner(x, c)
        return x[:, 1:], x[:, 0]
