"""The MLA latent KV cache: per sequence and layer, only c_kv (kv_lora_rank) and the shared rotary key k_pe."""

from __future__ import annotations

import torch


class LatentCache:
    """Per-sequence storage [layers, capacity, kv_lora_rank + qk_rope_head_dim], allocated and freed per sequence.

    That is all MLA needs: keys and values are re-derived from c_kv (expanded at prefill, absorbed into
    the query and output projections at decode).
    """

    def __init__(self, n_layers: int, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.n_layers = n_layers
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        self.dtype = dtype
        self.device = torch.device(device)  # the gateway's device: the cache never leaves it
        self._store: dict[int, torch.Tensor] = {}
        self._length: dict[int, int] = {}

    @property
    def values_per_token_per_layer(self) -> int:
        return self.kv_lora_rank + self.rope_dim

    def allocate(self, seq_id: int, capacity: int = 16) -> None:
        if seq_id in self._store:
            raise KeyError(f"seq_id={seq_id}: already has a cache")
        width = self.values_per_token_per_layer
        self._store[seq_id] = torch.empty(self.n_layers, max(capacity, 1), width, dtype=self.dtype,
                                           device=self.device)
        self._length[seq_id] = 0

    def free(self, seq_id: int) -> None:
        self._store.pop(seq_id, None)
        self._length.pop(seq_id, None)

    def length(self, seq_id: int) -> int:
        return self._length[seq_id]

    def reserve(self, seq_id: int, total: int) -> None:
        """Make room for `total` tokens (grows geometrically, copying what is there)."""
        store = self._store[seq_id]
        if store.shape[1] >= total:
            return
        grown = store.new_empty(self.n_layers, max(total, 2 * store.shape[1]), store.shape[2])
        grown[:, : self._length[seq_id]] = store[:, : self._length[seq_id]]
        self._store[seq_id] = grown

    def write(self, layer: int, seq_id: int, start: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Store positions [start, start+n). c_kv: [n, kv_lora_rank]; k_pe: [n, rope_dim]."""
        n = c_kv.shape[0]
        rows = self._store[seq_id][layer, start : start + n]
        rows[:, : self.kv_lora_rank] = c_kv
        rows[:, self.kv_lora_rank :] = k_pe

    def read(self, layer: int, seq_id: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of positions [0, end): c_kv [end, kv_lora_rank], k_pe [end, rope_dim]."""
        rows = self._store[seq_id][layer, :end]
        return rows[:, : self.kv_lora_rank], rows[:, self.kv_lora_rank :]

    def advance(self, seq_id: int, n: int) -> None:
        """Mark n more positions as written in every layer (after a forward step)."""
        self._length[seq_id] += n

    def nbytes(self, seq_id: int) -> int:
        """Bytes of the valid part of one sequence's cache."""
        return self.n_layers * self._length[seq_id] * self.values_per_token_per_layer * self.dtype.itemsize

    def storage(self, seq_id: int) -> torch.Tensor:
        return self._store[seq_id]
