"""The LLM's input sequence of a multimodal prompt (official modeling_ovis_u1.py, OvisU1.merge_multimodal).

Token ids below zero are placeholders: ``prompts.IMAGE_ATOM_ID`` stands for one image's visual embeddings, the
``prompts.IMAGE_INDICATOR_IDS`` for the indicator rows of the visual embedding table that frame an image. What the
left-truncation to ``multimodal_max_length`` cuts is checked beforehand (``truncation.check_truncation``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .prompts import IMAGE_ATOM_ID


def merge_multimodal(
    ids: Sequence[int],
    text: Tensor,
    visual: Sequence[Tensor],
    indicator: Callable[[int], Tensor],
    max_length: int,
) -> Tensor:
    """Input embeddings [L, hidden]: ``text`` [len(ids), hidden] (the text embeddings of ``ids``, placeholders
    embedded as anything) with each image atom replaced by the next of ``visual`` and each indicator id by
    ``indicator(id)`` [1, hidden], keeping the last ``max_length`` positions as the official code does."""
    pieces, start, image_index = [], 0, 0
    for pos, tid in enumerate(ids):
        if tid >= 0:
            continue
        pieces.append(text[start:pos])
        if tid == IMAGE_ATOM_ID:
            pieces.append(visual[image_index].to(device=text.device, dtype=text.dtype))
            image_index += 1
        else:
            pieces.append(indicator(tid).to(device=text.device, dtype=text.dtype))
        start = pos + 1
    pieces.append(text[start:])
    return torch.cat(pieces)[-max_length:]
