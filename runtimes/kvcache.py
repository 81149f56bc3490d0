"""A preallocated KV cache built for speculation.

Per layer, keys and values live in buffers of shape [1, kv_heads, capacity, head_dim]. The whole buffer is the
graph's `past_key_i` input (no copy: positions at or past `length` are masked out by the attention bias), and
the graph returns K/V for the new tokens only, which `stage` writes after the committed prefix. `commit(keep)`
keeps an arbitrary subset of the staged tokens (the accepted tree path), `rewind(n)` truncates. None of these
copies the committed cache; growth doubles the capacity (amortised O(1) per token).
"""

from __future__ import annotations

import numpy as np


class KVCache:
    """Keys and values for every layer of one model, plus the committed length."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_length: int, initial: int = 256):
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_length = max_length
        self.length = 0  # committed tokens
        self.staged = 0  # tokens written after `length` by the last forward, not yet committed
        self.capacity = 0
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self._allocate(min(initial, max_length))

    def _allocate(self, capacity: int) -> None:
        shape = (1, self.num_kv_heads, capacity, self.head_dim)
        new_keys = [np.zeros(shape, dtype=np.float32) for _ in range(self.num_layers)]
        new_values = [np.zeros(shape, dtype=np.float32) for _ in range(self.num_layers)]
        keep = self.length
        for old, new in zip(self.keys + self.values, new_keys + new_values):
            new[:, :, :keep] = old[:, :, :keep]
        self.keys, self.values, self.capacity = new_keys, new_values, capacity

    def reserve(self, extra: int) -> None:
        """Make room for `extra` tokens after the committed prefix (grows by doubling, up to max_length)."""
        need = self.length + extra
        if need > self.max_length:
            raise ValueError(
                f"context overflow: {self.length} cached + {extra} new tokens exceeds the context length {self.max_length}"
            )
        if need > self.capacity:
            capacity = self.capacity
            while capacity < need:
                capacity *= 2
            self._allocate(min(capacity, self.max_length))

    def stage(self, new_keys: list[np.ndarray], new_values: list[np.ndarray]) -> None:
        """Write the K/V of T new tokens ([1, kv_heads, T, head_dim] per layer) right after the committed prefix."""
        t = new_keys[0].shape[2]
        if self.length + t > self.capacity:
            raise ValueError("stage() without reserve(): not enough capacity")
        end = self.length + t
        for buf, new in zip(self.keys, new_keys):
            buf[:, :, self.length:end] = new
        for buf, new in zip(self.values, new_values):
            buf[:, :, self.length:end] = new
        self.staged = t

    def commit(self, keep=None) -> None:
        """Keep the staged tokens at indices `keep` (ascending; None keeps all) and append them to the prefix."""
        if keep is None:
            self.length += self.staged
            self.staged = 0
            return
        keep = np.asarray(keep, dtype=np.int64)
        n = len(keep)
        if n and (keep.min() < 0 or keep.max() >= self.staged or np.any(np.diff(keep) <= 0)):
            raise ValueError(f"commit indices {keep.tolist()} must be ascending and within the {self.staged} staged")
        if n and not np.array_equal(keep, np.arange(n)):
            src = self.length + keep
            dst = slice(self.length, self.length + n)
            for buf in self.keys + self.values:
                buf[:, :, dst] = buf[:, :, src]
        self.length += n
        self.staged = 0

    def select(self, start: int, keep) -> None:
        """Keep only the cached tokens at `start + keep` after the first `start` (ascending indices), moving them
        down to follow the prefix: how a drafter keeps the accepted path out of the draft nodes it cached."""
        if not 0 <= start <= self.length:
            raise ValueError(f"cannot select after {start}: cache holds {self.length}")
        self.staged, self.length = self.length - start + self.staged, start
        self.commit(keep)

    def rewind(self, length: int) -> None:
        """Forget everything after the first `length` tokens."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind to {length}: cache holds {self.length}")
        self.length = length
        self.staged = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(b.nbytes for b in self.keys + self.values)


def tree_ancestors(parents: np.ndarray) -> np.ndarray:
    """Boolean [T, T] matrix: row i marks node i and its ancestors. Parents must precede children (-1 = root)."""
    parents = np.asarray(parents, dtype=np.int64)
    t = len(parents)
    visible = np.zeros((t, t), dtype=bool)
    for i, parent in enumerate(parents):
        if parent >= i or parent < -1:
            raise ValueError(f"node {i} has parent {parent}: parents must come before their children")
        if parent >= 0:
            visible[i] = visible[parent]
        visible[i, i] = True
    return visible


def tree_depths(parents: np.ndarray) -> np.ndarray:
    """Depth of each node (roots are 0)."""
    parents = np.asarray(parents, dtype=np.int64)
    depth = np.zeros(len(parents), dtype=np.int64)
    for i, parent in enumerate(parents):
        if parent >= 0:
            depth[i] = depth[parent] + 1
    return depth


def attention_bias(
    past_length: int,
    capacity: int,
    visible: np.ndarray,
    positions: np.ndarray,
    window: int | None = None,
    mask_value: float = -1e30,
    past_visible: np.ndarray | None = None,
    past_positions: np.ndarray | None = None,
) -> np.ndarray:
    """Additive bias [1, 1, T, capacity + T]: past slots < past_length visible, the rest hidden; the new block follows
    `visible` (tree mask); with `window`, a key is visible only if query_position - key_position < window.

    `past_visible` ([T, k] bool) replaces full visibility for the last k past slots (draft nodes cached by earlier
    forwards: each new token sees only its own ancestors among them); `past_positions` gives the positions of those
    k slots (default: their slot index)."""
    t = len(positions)
    bias = np.full((1, 1, t, capacity + t), mask_value, dtype=np.float32)
    past_mask = np.ones((t, past_length), dtype=bool)
    past_pos = np.arange(past_length)
    if past_visible is not None:
        k = past_visible.shape[1]
        if k > past_length or past_visible.shape[0] != t:
            raise ValueError(f"past_visible has shape {past_visible.shape} for {t} tokens and {past_length} cached")
        past_mask[:, past_length - k:] = past_visible
        if past_positions is not None:
            past_pos = past_pos.copy()
            past_pos[past_length - k:] = past_positions
    new_mask = visible
    if window is not None:
        past_mask = past_mask & ((positions[:, None] - past_pos[None, :]) < window)
        new_mask = visible & ((positions[:, None] - positions[None, :]) < window)
    bias[0, 0, :, :past_length][past_mask] = 0.0
    bias[0, 0, :, capacity:][new_mask] = 0.0
    return bias
