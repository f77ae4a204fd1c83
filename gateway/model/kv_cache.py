"""The paged MLA latent cache: one pool of fixed-size blocks shared by every sequence, with prefix caching."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from gateway.model.step import StepBatch

# Shape legend: L = layers, B = blocks in the pool, b = block_size, w = kv_lora_rank + qk_rope_head_dim,
# N = a step's new tokens, S = one sequence's cached length.


class CacheFull(RuntimeError):
    """The pool has too few free blocks for what was asked; nothing was changed."""


@dataclass(frozen=True)
class AttentionPlan:
    """Where one step's tokens go in the pool and what each sequence attends to (the same for every layer)."""

    slots: torch.Tensor  # [N] long: pool row (block * b + offset) of each new token
    decode_rows: torch.Tensor | None  # [D] long: the step rows of one-token sequences (batched decode)
    decode_tables: torch.Tensor | None  # [D, W] int32 block tables, padded with each sequence's first block
    decode_lens: torch.Tensor | None  # [D] int32 context lengths
    decode_valid: torch.Tensor | None  # [D, W * b] bool: which positions of the gathered blocks are the context
    context: list[torch.Tensor | None]  # per sequence not in the decode batch: [start + n] long pool rows


class PagedLatentCache:
    """A pool [L, B, b, w] of blocks; each sequence owns a block table, and blocks are reference-counted.

    Prefix caching (after nano-vllm): a full block is registered under a hash chained over every token of the
    prefix it ends, so a later request whose prompt starts with the same tokens attaches those blocks instead of
    recomputing them. A freed block keeps its content and registration until it is handed out again (oldest
    freed first). The pool starts zeroed, so a padded read of a block's unwritten tail is finite.
    """

    def __init__(self, n_layers: int, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", n_blocks: int = 256, block_size: int = 16,
                 prefix_caching: bool = True) -> None:
        if n_blocks < 1 or block_size < 1:
            raise ValueError(f"n_blocks={n_blocks}, block_size={block_size}: expected both >= 1")
        self.n_layers, self.kv_lora_rank, self.rope_dim = n_layers, kv_lora_rank, rope_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.block_size, self.n_blocks, self.prefix_caching = block_size, n_blocks, prefix_caching
        self.pool = torch.zeros(n_layers, n_blocks, block_size, kv_lora_rank + rope_dim, dtype=dtype,
                                device=self.device)
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(n_blocks))  # oldest freed first
        self._refs = [0] * n_blocks
        self._block_hash: dict[int, int] = {}  # registered full block -> its chained hash
        self._by_hash: dict[int, tuple[int, tuple[int, ...]]] = {}  # hash -> (block, its tokens) to verify hits
        self._tables: dict[int, list[int]] = {}
        self._length: dict[int, int] = {}  # positions written
        self._tokens: dict[int, list[int]] = {}  # token ids written (prefix caching only)
        self._hashes: dict[int, list[int]] = {}  # the chain over each sequence's registered full blocks
        self.prefix_queried = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which were found (not recomputed)

    @property
    def values_per_token_per_layer(self) -> int:
        return self.kv_lora_rank + self.rope_dim

    @property
    def bytes_per_token(self) -> int:
        return self.n_layers * self.values_per_token_per_layer * self.dtype.itemsize

    @property
    def capacity_tokens(self) -> int:
        return self.n_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def is_empty(self) -> bool:
        """No sequence holds a block (every block is free; prefix-cached ones stay registered)."""
        return not self._tables and self.free_blocks == self.n_blocks

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def allocate(self, seq_id: int, capacity: int = 1, tokens: list[int] | None = None,
                 chunk: int | None = None) -> int:
        """Start a sequence with room for `capacity` tokens, or with `chunk`: for the cached prefix plus up to
        `chunk` more of `tokens`. With `tokens` (its prompt) and prefix caching, the registered full blocks of its
        longest cached prefix are attached (never the block holding the last token: its logits are needed).
        Returns the positions already cached. Raises CacheFull, changing nothing."""
        if seq_id in self._tables:
            raise KeyError(f"seq_id={seq_id}: already has a cache")
        hits, chain = self._lookup(tokens) if tokens is not None and self.prefix_caching else ([], [])
        cached = len(hits) * self.block_size
        if chunk is not None:
            capacity = cached + min(len(tokens) - cached, chunk)
        need = self.blocks_for(max(capacity, cached)) - len(hits)
        reusable = sum(1 for b in hits if self._refs[b] == 0)  # attaching these takes them off the free list
        if need > self.free_blocks - reusable:
            raise CacheFull(f"seq_id={seq_id}: needs {need} free blocks, {self.free_blocks - reusable} are free")
        for b in hits:
            self._free.pop(b, None)
            self._refs[b] += 1
        self._tables[seq_id] = hits
        self._length[seq_id] = cached
        self._hashes[seq_id] = chain
        if tokens is not None and self.prefix_caching:
            self._tokens[seq_id] = list(tokens[:cached])
            self.prefix_queried += len(tokens)
            self.prefix_hits += cached
        self.reserve(seq_id, capacity)
        return cached

    def _lookup(self, tokens: list[int]) -> tuple[list[int], list[int]]:
        """The registered blocks (and their hashes) of the longest cached prefix of tokens[:-1], in order."""
        hits, chain, prev, b = [], [], 0, self.block_size
        for i in range((len(tokens) - 1) // b):
            block_tokens = tuple(tokens[i * b:(i + 1) * b])
            h = hash((prev, block_tokens))
            found = self._by_hash.get(h)
            if found is None or found[1] != block_tokens:
                break
            hits.append(found[0])
            chain.append(h)
            prev = h
        return hits, chain

    def cached_prefix(self, tokens: list[int]) -> int:
        """Positions of `tokens` that allocate() would take from the prefix cache (nothing changes)."""
        return len(self._lookup(tokens)[0]) * self.block_size if self.prefix_caching else 0

    def can_reserve(self, seq_id: int, total: int) -> bool:
        return self.blocks_for(total) - len(self._tables[seq_id]) <= self.free_blocks

    def reserve(self, seq_id: int, total: int) -> None:
        """Make room for `total` tokens (blocks from the free list). Raises CacheFull, changing nothing."""
        table = self._tables[seq_id]
        need = self.blocks_for(total) - len(table)
        if need <= 0:
            return
        if need > self.free_blocks:
            raise CacheFull(f"seq_id={seq_id}: needs {need} more blocks for {total} tokens, {self.free_blocks} "
                            f"of {self.n_blocks} are free")
        for _ in range(need):
            block, _ = self._free.popitem(last=False)
            self._forget(block)
            self._refs[block] = 1
            table.append(block)

    def _forget(self, block: int) -> None:
        """A block is handed out again: its old content no longer answers prefix lookups."""
        h = self._block_hash.pop(block, None)
        if h is not None and self._by_hash.get(h, (None,))[0] == block:
            del self._by_hash[h]

    def free(self, seq_id: int) -> None:
        """Release a sequence's blocks (a no-op for an unknown one). Its tail blocks are handed out first, so the
        prefix blocks other requests may share stay cached longest."""
        table = self._tables.pop(seq_id, None)
        self._length.pop(seq_id, None)
        self._tokens.pop(seq_id, None)
        self._hashes.pop(seq_id, None)
        for block in reversed(table or []):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None

    def length(self, seq_id: int) -> int:
        return self._length[seq_id]

    def table(self, seq_id: int) -> list[int]:
        return list(self._tables[seq_id])

    def advance(self, seq_id: int, n: int, tokens: list[int] | None = None) -> None:
        """Mark n more positions written in every layer; with their token ids (prefix caching), register the
        blocks this completes."""
        self._length[seq_id] += n
        if tokens is None or not self.prefix_caching:
            return
        if len(tokens) != n:
            raise ValueError(f"seq_id={seq_id}: advance by {n} positions with {len(tokens)} token ids")
        written = self._tokens.setdefault(seq_id, [])
        written.extend(tokens)
        chain, table, b = self._hashes[seq_id], self._tables[seq_id], self.block_size
        while len(chain) < len(written) // b:
            i = len(chain)
            block_tokens = tuple(written[i * b:(i + 1) * b])
            h = hash((chain[-1] if chain else 0, block_tokens))
            chain.append(h)
            block = table[i]
            if h not in self._by_hash and block not in self._block_hash:
                self._by_hash[h] = (block, block_tokens)
                self._block_hash[block] = h

    def nbytes(self, seq_id: int) -> int:
        """Bytes of the valid part of one sequence's cache."""
        return self._length[seq_id] * self.bytes_per_token

    def plan(self, step: StepBatch, batched_decode: list[bool]) -> AttentionPlan:
        """The step's pool rows: where each new token is written and what each sequence reads. Sequences
        flagged in `batched_decode` (one new token each) are read together, padded to the longest."""
        b, dev = self.block_size, self.device
        within = torch.arange(b)
        slots = torch.empty(step.n_tokens, dtype=torch.long)
        context: list[torch.Tensor | None] = []
        decode = [i for i, flag in enumerate(batched_decode) if flag]
        for i, (seq, start, n, off) in enumerate(zip(step.seq_ids, step.starts, step.lengths, step.offsets,
                                                      strict=True)):
            if batched_decode[i]:
                context.append(None)
                continue
            rows = (torch.tensor(self._tables[seq])[:, None] * b + within).flatten()[: start + n]
            slots[off : off + n] = rows[start:]
            context.append(rows.to(dev))
        if not decode:
            return AttentionPlan(slots.to(dev), None, None, None, None, context)
        tables = [self._tables[step.seq_ids[i]] for i in decode]
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [t[0]] * (width - len(t)) for t in tables])  # padded with a valid block
        lens = torch.tensor([step.starts[i] + 1 for i in decode])
        last = lens - 1  # the new token's position
        decode_rows = torch.tensor([step.offsets[i] for i in decode])
        slots[decode_rows] = table.gather(1, (last // b)[:, None])[:, 0] * b + last % b
        return AttentionPlan(
            slots=slots.to(dev),
            decode_rows=decode_rows.to(dev),
            decode_tables=table.to(device=dev, dtype=torch.int32),
            decode_lens=lens.to(device=dev, dtype=torch.int32),
            decode_valid=(torch.arange(width * b)[None, :] < lens[:, None]).to(dev),
            context=context,
        )

    def layer_rows(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s pool as rows [B * b, w] (a view: writes land in the pool)."""
        return self.pool[layer].view(-1, self.values_per_token_per_layer)

    def stats(self) -> dict[str, int]:
        return {"blocks": self.n_blocks, "free_blocks": self.free_blocks, "block_size": self.block_size,
                "sequences": len(self._tables), "prefix_queried_tokens": self.prefix_queried,
                "prefix_hit_tokens": self.prefix_hits}
