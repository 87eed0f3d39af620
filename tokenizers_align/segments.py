"""Where a generated text may be cut into a segment that every source model can score.

Cool-Fusion §2.2: a model keeps generating until its decoded text contains a prefix that
ends at a word boundary of *every* source tokenizer (an aligned segment, the default), or
of its own tokenizer only (the paper's "shortest segment" variant). Boundaries are looked
up in a window that starts at an already committed common boundary, so the cost of a
search does not grow with the context.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers_align.adapter import TokenizerAdapter, complete_text


def first_common_boundary(
    window: str, start: int, adapters: Sequence[TokenizerAdapter]
) -> int | None:
    """Smallest offset ``p > start`` in ``window`` that ends a word for every adapter.

    ``window[:start]`` is committed text that itself starts at a common boundary. Each
    returned boundary is also checked to split the window stably for every tokenizer
    (encoding the prefix gives exactly the tokens the window starts with), so the
    segment can be committed and the next one encoded on its own.
    """
    window = complete_text(window)
    if not adapters or len(window) <= start:
        return None
    common: set[int] | None = None
    for adapter in adapters:
        ends = {p for p in adapter.word_ends(window) if p > start}
        common = ends if common is None else common & ends
        if not common:
            return None
    for p in sorted(common or ()):
        if all(a.is_stable_split(window, p) for a in adapters):
            return p
    return None


def stable_cut(window: str, start: int, adapters: Sequence[TokenizerAdapter]) -> int:
    """Best place to cut a text that reached its length cap without a common boundary.

    The largest offset after ``start`` that splits the window stably for every
    tokenizer (checked from the end, on word ends of any tokenizer); the whole window
    when there is none.
    """
    window = complete_text(window)
    ends: set[int] = set()
    for adapter in adapters:
        ends.update(p for p in adapter.word_ends(window) if p > start)
    for p in sorted(ends, reverse=True):
        if all(a.is_stable_split(window, p) for a in adapters):
            return p
    return len(window)
