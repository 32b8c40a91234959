"""The RMSNorm layer of the LLM and of the visual encoder: statistics in fp32, the normalised input cast back to its
dtype, then times ``weight`` — transformers 4.51.3's Qwen3RMSNorm and the official modeling_aimv2.py RMSNorm are
this same computation (:func:`ovis_u1.math.rms_norm`).

Built from a namespace by :func:`norm`, it is the namespace's RMSNorm too (see
:func:`ovis_u1.operations.namespace_layer`): it reads its weight through the namespace's cast (ComfyUI may keep it
on the offload device or stream it) and makes the namespace's per-op call first (ComfyUI's interrupt check).
"""

from __future__ import annotations

import torch
from torch import nn

from .math import rms_norm
from .operations import OwnLayer, namespace_layer


class RMSNorm(OwnLayer, nn.RMSNorm):
    """A ``torch.nn.RMSNorm`` with the fp32-statistics math of :func:`ovis_u1.math.rms_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.every_op()
        with self.cast_weights(self, x) as (weight, _):
            return rms_norm(x, weight, self.eps)


def norm(dim: int, eps: float, operations=nn) -> RMSNorm:
    return namespace_layer(RMSNorm, operations, "RMSNorm")(dim, eps=eps)
