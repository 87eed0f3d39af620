"""Word boundaries and alignment across heterogeneous tokenizers (no torch here)."""

from tokenizers_align.adapter import TokenizerAdapter, complete_text
from tokenizers_align.incremental import IncrementalCodec
from tokenizers_align.segments import first_common_boundary, stable_cut

__all__ = [
    "IncrementalCodec",
    "TokenizerAdapter",
    "complete_text",
    "first_common_boundary",
    "stable_cut",
]
