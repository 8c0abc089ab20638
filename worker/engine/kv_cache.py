"""Block manager for the paged KV cache, with prefix caching across requests and turns.

The cache is `num_blocks` fixed-size blocks. A sequence's `block_table` lists the blocks that hold its
tokens in order. A *full* block is keyed by a chained hash of (previous block's hash, its token ids), so
a block's key names the whole prefix up to it: a new turn of a conversation finds its history's blocks
by hash and prefills only the new tokens.

A block with ref_count 0 stays in the cache (with its hash) on an LRU free list until it is reused for
other tokens: only then is its hash forgotten. Invariant: every block is either referenced (ref > 0) or in
`free` exactly once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from worker.engine.request import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


def chain_hash(prev: int | None, tokens: tuple[int, ...]) -> int:
    return hash((prev, tokens))


@dataclass
class BlockManager:
    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = True
    blocks: list[Block] = field(init=False)
    free: OrderedDict[int, None] = field(init=False)  # LRU order: first = least recently freed
    by_hash: dict[int, int] = field(init=False)
    # statistics (prefix-cache queries and hits, in tokens)
    query_tokens: int = 0
    hit_tokens: int = 0

    def __post_init__(self) -> None:
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self.free = OrderedDict((i, None) for i in range(self.num_blocks))
        self.by_hash = {}

    # --- queries ------------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - len(self.free) / max(1, self.num_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- allocation ---------------------------------------------------------------------------------

    def _take_free(self) -> Block:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.by_hash.get(block.hash) == block_id:
            del self.by_hash[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Ids of cached blocks that hold a prefix of seq's tokens (leaving >= 1 token to compute)."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        prev: int | None = None
        bs = self.block_size
        for start in range(0, seq.num_tokens - 1 - bs + 1, bs):
            tokens = tuple(seq.token_ids[start : start + bs])
            h = chain_hash(prev, tokens)
            block_id = self.by_hash.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
            prev = h
        return hits

    def can_allocate(self, seq: Sequence, reserve: int = 0) -> bool:
        hits = self._cached_prefix(seq)
        free_hits = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        need = self.blocks_needed(seq.num_tokens) - len(hits)
        return need + free_hits + reserve <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        """Give seq blocks for all its current tokens, reusing cached prefix blocks."""
        assert not seq.block_table, "sequence already holds blocks"
        hits = self._cached_prefix(seq)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.num_hashed_blocks = len(hits)
        seq.last_hash = self.blocks[hits[-1]].hash if hits else None
        for _ in range(self.blocks_needed(seq.num_tokens) - len(hits)):
            seq.block_table.append(self._take_free().block_id)
        seq.num_computed_tokens = len(hits) * self.block_size
        if not seq.cached_counted:  # count each request's prompt once, not again after preemption
            seq.cached_counted = True
            seq.num_cached_tokens = seq.num_computed_tokens
            self.query_tokens += seq.num_tokens
            self.hit_tokens += seq.num_computed_tokens

    def can_append(self, seq: Sequence, num_new: int = 1) -> bool:
        return self.blocks_needed(seq.num_tokens + num_new) - len(seq.block_table) <= self.num_free

    def append_slots(self, seq: Sequence, num_new: int = 1) -> None:
        """Make room for num_new more tokens at the end of seq."""
        for _ in range(self.blocks_needed(seq.num_tokens + num_new) - len(seq.block_table)):
            seq.block_table.append(self._take_free().block_id)

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Register hashes of seq's blocks that are full and computed, so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        prev = seq.last_hash
        for i in range(seq.num_hashed_blocks, seq.num_computed_tokens // bs):  # only newly filled blocks
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                h = chain_hash(prev, tokens)
                block.hash, block.token_ids = h, tokens
                self.by_hash.setdefault(h, block.block_id)
            prev = block.hash
            seq.num_hashed_blocks, seq.last_hash = i + 1, prev

    def free_seq(self, seq: Sequence) -> None:
        """Release seq's blocks; cached ones stay findable until reused (LRU: freed last, reused last)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0
            if block.ref_count == 0:
                if block.hash is None:
                    self.free[block_id] = None
                    self.free.move_to_end(block_id, last=False)  # uncached: reuse these first
                else:
                    self.free[block_id] = None
        seq.block_table.clear()
        seq.num_computed_tokens = 0
