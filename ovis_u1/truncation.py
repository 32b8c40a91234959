"""What the official left-truncation to ``multimodal_max_length`` cuts, said out loud (official
modeling_ovis_u1.py, OvisU1.pad_truncate_sequence as OvisU1.merge_multimodal calls it, with left_padding=True).

The official code keeps the LAST ``multimodal_max_length`` positions of the merged sequence and says nothing: an
ordinary photo in an understanding prompt can lose the chat header and its top rows, a long prompt can lose the image
altogether. The pack keeps that truncation (so results stay the official ones) but reports it: a warning with what
was cut and how to avoid it, and an error when an image would vanish completely — an answer about an image the
model never saw is worse than no answer.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

from .errors import OvisU1InputError

PIXELS_PER_VISUAL_TOKEN = 28 * 28  # patch 14 × hidden_stride 2, squared


class OvisU1TruncationWarning(UserWarning):
    """The input was longer than the model's multimodal_max_length and its beginning was cut."""


@dataclass(frozen=True)
class ImageSpan:
    """Positions [start, end) of one image's placeholder group (indicators included) in the merged sequence."""

    start: int
    end: int


def image_spans(ids: list[int], visual_counts: list[int], atom_id: int) -> tuple[int, list[ImageSpan]]:
    """(merged length, span of every image) for token ids whose atoms expand to ``visual_counts`` positions; an
    image's span runs from its start indicator (the id before the atom) to its end indicator."""
    spans, pos, image_index = [], 0, 0
    for tid in ids:
        if tid == atom_id:
            n = visual_counts[image_index]
            spans.append(ImageSpan(pos - 1, pos + n + 1))
            pos += n
            image_index += 1
        else:
            pos += 1
    return pos, spans


def check_truncation(ids: list[int], visual_counts: list[int], atom_id: int, max_length: int, what: str,
                     decode: Callable[[list[int]], str], images_adjustable: bool = True) -> list[str]:
    """The warnings for cutting ``ids`` (with images of ``visual_counts`` positions) to the last ``max_length``
    positions; raises OvisU1InputError when an image would be cut away completely. ``what`` names the input
    ("the question", "the prompt"); ``images_adjustable`` is False where the user cannot change the image's token
    count (generation conditions: the image is always resized to the processor's pixel budget)."""
    length, spans = image_spans(ids, visual_counts, atom_id)
    cut = length - max_length
    if cut <= 0:
        return []
    text_positions = length - sum(visual_counts)
    room = max_length - text_positions
    if images_adjustable:
        fits = (f"about {max(room, 0) * PIXELS_PER_VISUAL_TOKEN:,} pixels of images fit next to this text"
                if room > 0 else f"{what} alone is longer than that")
        smaller = "use a smaller image"
    else:
        fits = f"it is {cut} tokens too long"
        smaller = f"shorten {what}"
    limit = f"multimodal_max_length {max_length} (config.json)"
    for i, (span, count) in enumerate(zip(spans, visual_counts)):
        if span.end - 1 <= cut:  # every visual token (the end indicator included) is cut
            raise OvisU1InputError(
                f"image {i + 1} would be cut away: {what} with its images takes {length} positions, more than the "
                f"model's {limit}, and the official left-truncation would drop the image ({count} positions) "
                f"entirely; shorten {what}" + (f", or {smaller}" if images_adjustable else "") + f" ({fits})"
            )
    notes = []
    lost_images = [(i, min(cut, span.end) - span.start) for i, span in enumerate(spans) if span.start < cut]
    text_cut = decode([t for t in ids if t >= 0][: max(0, cut - sum(n for _, n in lost_images))])
    for i, lost in lost_images:
        notes.append(
            f"image {i + 1} loses its first {lost} of {visual_counts[i] + 2} positions (its top rows): {what} with "
            f"its images takes {length} positions, more than the model's {limit}, and the beginning is cut as in "
            f"the official code; {smaller} to keep all of it ({fits})"
        )
    if not lost_images or text_cut:
        notes.append(
            f"the beginning of the input was cut: {what} with its template and images takes {length} positions, more "
            f"than the model's {limit}; the first {cut} were dropped as in the official code (text lost: "
            f"{text_cut!r}); shorten {what}" + (" or use smaller images" if images_adjustable else "") + f" ({fits})"
        )
    for note in notes:
        warnings.warn(note, OvisU1TruncationWarning, stacklevel=3)
    return notes
