"""Scaled dot-product attention, with the kernel chosen per model and per call, never process-wide.

Every attention in Ovis-U1 (AIMv2 encoder, token refiner, MMDiT, VAE) is unmasked softmax attention with scale
1/sqrt(head_dim); the language model's is causal and grouped-query (:func:`causal_attention`, following
transformers 4.51.3: an explicit scale, the math softmax in fp32; the key/value head a group of query heads shares is
read as it is, never repeated into a copy per call as transformers' ``repeat_kv`` does: SDPA's ``enable_gqa``).
The pack's own kernels:

* ``sdpa``  — ``torch.nn.functional.scaled_dot_product_attention`` (default).
* ``flash_attn`` — the flash-attn package, used only when it imports and the tensors live on CUDA in fp16/bf16.
* ``math`` — explicit softmax(QK^T)V, the reference fallback.

``auto`` picks flash_attn when usable, else sdpa. A :class:`Kernel` may instead carry a ``full`` function for the
bidirectional attentions: that is how a host injects its own selection (the ComfyUI bridge passes ComfyUI's
``optimized_attention``, so its ``--use-*-attention`` flags and attention-override patches apply). The kernel of a
pass is set for the duration of that pass with :func:`using` (a context variable: two models, or two threads, never
see each other's choice). Windowed attention of the visual encoder is expressed as a list of segment lengths
(``attention_segments``): equal-length segments run batched, flash-attn uses its varlen kernel.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import OvisU1InputError

BACKENDS = ("auto", "sdpa", "flash_attn", "math")
_flash = None  # the flash_attn module once imported, False when unavailable


@dataclass(frozen=True)
class Kernel:
    """The attention of a model's passes: one of the pack's kernels by ``name``, or a host's ``full`` function
    ``(q, k, v) -> out`` on [B, H, L, D] for the bidirectional attentions (the causal LLM and the VAE keep the pack's
    own kernels: ``name``)."""

    name: str = "auto"
    full: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None


def kernel(choice: str | Kernel) -> Kernel:
    """A Kernel from a backend name (checked) or a Kernel (as is)."""
    if isinstance(choice, Kernel):
        return choice
    if choice not in BACKENDS:
        raise OvisU1InputError(f"attention {choice!r} is unknown: use one of {', '.join(BACKENDS)}")
    if choice == "flash_attn" and not flash_attn_available():
        raise OvisU1InputError(
            "attention 'flash_attn' was requested but the flash-attn package is not importable (or there is no CUDA "
            "device); install it (pip install flash-attn) or choose 'auto' / 'sdpa'"
        )
    return Kernel(choice)


_current: contextvars.ContextVar[Kernel] = contextvars.ContextVar("ovis_u1_attention", default=Kernel())


@contextlib.contextmanager
def using(choice: str | Kernel) -> Iterator[Kernel]:
    """Within the block, attention in this thread/context runs on ``choice``."""
    token = _current.set(kernel(choice))
    try:
        yield _current.get()
    finally:
        _current.reset(token)


def current() -> Kernel:
    return _current.get()


def flash_attn_available() -> bool:
    global _flash
    if _flash is None:
        try:
            _flash = importlib.import_module("flash_attn")
        except Exception:  # ImportError, or a broken CUDA build raising something else
            _flash = False
    return _flash is not False and torch.cuda.is_available()


def _use_flash(q: torch.Tensor) -> bool:
    if _current.get().name not in ("auto", "flash_attn"):
        return False
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_available()


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    return scores.softmax(dim=-1) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full bidirectional attention on the current kernel (a host's, if one is injected). q, k, v: [B, H, L, D] →
    [B, H, L, D]."""
    full = _current.get().full
    if full is not None:
        return full(q, k, v)
    return pack_attention(q, k, v)


def pack_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full bidirectional attention on the pack's own kernel of the current choice (the VAE's: one head as wide as
    the channels, which hosts' fast kernels may not take — ComfyUI's VAEs keep pytorch attention too)."""
    if _use_flash(q):
        out = _flash.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if _current.get().name == "math":
        return _math_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, H_kv, L, D] → [B, H_kv·groups, L, D], each key/value head repeated for its group of query heads (a copy
    of the keys and values: only where no kernel takes the groups as they are)."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


# torch ≥ 2.5: SDPA takes key/value heads shared by groups of query heads as they are (``enable_gqa``), with the
# numbers of the repeated heads (each output row is computed as with its key/value head repeated).
SDPA_TAKES_GROUPS = torch.__version__ >= (2, 5)


def _fold_groups(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """q [B, H, Lq, D] → [B, H_kv, groups·Lq, D] (a view): the queries of each key/value head's group side by side,
    so that one head of keys and values serves them all without being repeated."""
    b, h, lq, d = q.shape
    return q.reshape(b, kv_heads, (h // kv_heads) * lq, d)


def _grouped_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  allowed: torch.Tensor | None) -> torch.Tensor:
    """Explicit causal softmax(QKᵀ)V with the softmax in fp32 (transformers' eager attention), the query groups
    folded onto their key/value head; ``allowed`` [Lq, Lk]: the causal mask (None: every key)."""
    b, h, lq, d = q.shape
    groups = h // k.shape[1]
    scores = (_fold_groups(q, k.shape[1]) @ k.transpose(-2, -1)) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed.repeat(groups, 1), torch.finfo(scores.dtype).min)
    out = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype) @ v
    return out.reshape(b, h, lq, d)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal grouped-query attention. q: [B, H, Lq, D]; k, v: [B, H_kv, Lk, D] with H a multiple of H_kv and
    Lk ≥ Lq; query i sits at key position Lk − Lq + i (the last Lq positions, as after a KV cache) → [B, H, Lq, D].

    Keys and values are read where they are (e.g. the filled prefix of a KV cache): no kernel copies them per call,
    unless SDPA is older than torch 2.5 and Lq > 1 (a prompt pass: once per prompt, not per generated token).
    """
    if _use_flash(q):  # flash-attn aligns the causal mask bottom-right and takes grouped heads as they are
        out = _flash.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                                     causal=True)
        return out.transpose(1, 2)
    groups = q.shape[1] // k.shape[1]
    q = q.contiguous()  # the new positions' queries only
    lq, lk = q.shape[2], k.shape[2]
    mask = None
    if lq > 1 and lq != lk:
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    if _current.get().name == "math":
        allowed = mask if mask is not None or lq == 1 else torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        return _grouped_math(q, k, v, scale, allowed)
    is_causal = mask is None and lq > 1
    if groups == 1 or SDPA_TAKES_GROUPS:
        grouped = {"enable_gqa": True} if groups > 1 else {}
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=is_causal, **grouped)
    if lq == 1:  # one new position attends to every key: its group's queries are rows of one head
        out = F.scaled_dot_product_attention(_fold_groups(q, k.shape[1]), k, v, scale=scale)
        return out.reshape(q.shape)
    return F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=mask, scale=scale,
                                          is_causal=is_causal)


def attention_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Block-diagonal attention: tokens attend only inside their own consecutive segment.

    q, k, v: [L, H, D] with L = sum(lengths) → [L, H, D].
    """
    if len(lengths) == 1:
        return attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None])[0].transpose(0, 1)
    if _use_flash(q):
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=q.device)
        cu[1:] = torch.tensor(lengths, device=q.device).cumsum(0)
        longest = max(lengths)
        return _flash.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest)
    out = torch.empty_like(q)
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    # Windows of equal length (all interior windows) run as one batch.
    by_length: dict[int, list[int]] = {}
    for start, n in zip(starts, lengths):
        by_length.setdefault(n, []).append(start)
    for n, group in by_length.items():
        index = (torch.tensor(group, device=q.device)[:, None] + torch.arange(n, device=q.device)[None]).reshape(-1)
        qs, ks, vs = (t.index_select(0, index).reshape(len(group), n, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        o = attention(qs, ks, vs).transpose(1, 2).reshape(len(group) * n, *q.shape[1:])
        out.index_copy_(0, index, o)
    return out
