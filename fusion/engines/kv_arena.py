"""A KV cache that grows in place and can drop or move spans without copying the context.

transformers' ``DynamicCache`` concatenates on every update (a copy of the whole context
per token) and cannot move a span inside the cache. Fusion needs both: each step appends a
few tokens, scores several candidates side by side after the shared context, then keeps
only the winner. ``ArenaLayer`` keeps a preallocated buffer with doubling capacity,
appends in place, and returns views; dropping is a length change and committing a
candidate moves just that candidate's slots to the end of the context.

Sliding-window layers are stored in full; the masks the engine passes apply the window,
so attention is what the model computes, and spans stay movable.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicLayer,
    LinearAttentionCacheLayerMixin,
)


class ArenaLayer(DynamicLayer):
    """One layer's keys/values in a growable buffer of shape [batch, heads, capacity, dim]."""

    keys: torch.Tensor
    values: torch.Tensor

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        capacity = max(256, 2 * key_states.shape[-2])
        self.keys = key_states.new_empty(*key_states.shape[:2], capacity, key_states.shape[-1])
        self.values = value_states.new_empty(
            *value_states.shape[:2], capacity, value_states.shape[-1]
        )
        self.is_initialized = True

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.keys.shape[-2])
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:2], capacity, old.shape[-1])
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.keys.shape[-2]:
            self._grow(end)
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int, *args: Any, **kwargs: Any) -> tuple[int, int]:
        return self.length + query_length, 0

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def move(self, src: int, dst: int, count: int) -> None:
        if src == dst or count <= 0:
            return
        for buf in (self.keys, self.values):
            buf[:, :, dst : dst + count] = buf[:, :, src : src + count].clone()

    def reset(self) -> None:
        self.length = 0

    def free(self) -> None:
        """Drop the buffers (the layer starts empty again if it is ever updated)."""
        self.length = 0
        if self.is_initialized:
            self.keys = self.keys.new_empty(0)
            self.values = self.values.new_empty(0)
            self.is_initialized = False


class ArenaCache(Cache):
    """A cache of ``ArenaLayer``s with span operations across all layers."""

    def __init__(self, num_layers: int) -> None:
        self.arena = [ArenaLayer() for _ in range(num_layers)]
        layers: list[CacheLayerMixin | LinearAttentionCacheLayerMixin] = list(self.arena)
        super().__init__(layers=layers)

    @property
    def length(self) -> int:
        return self.arena[0].length if self.arena else 0

    def truncate(self, length: int) -> None:
        for layer in self.arena:
            layer.truncate(length)

    def move(self, src: int, dst: int, count: int) -> None:
        for layer in self.arena:
            layer.move(src, dst, count)

    def free(self) -> None:
        for layer in self.arena:
            layer.free()

    @property
    def nbytes(self) -> int:
        """Bytes of the key/value buffers (capacity, not just the used length)."""
        return sum(
            layer.keys.nbytes + layer.values.nbytes for layer in self.arena if layer.is_initialized
        )
