"""Block manager for the paged KV cache, with prefix caching across requests and turns.

The cache is `num_blocks` fixed-size blocks. A sequence's `block_table` lists the blocks that hold its
tokens in order. A *full* block is keyed by a chained hash of (previous block's hash, its token ids), so
a block's key names the whole prefix up to it: a new turn of a conversation finds its history's blocks
by hash and prefills only the new tokens. The hash is SHA-256 (Python's `hash` of a tuple can be made to
collide on purpose, and a collision hands one prompt another's KV: vLLM's CVE-2025-25183), and every
chain starts from its sequence's root: the hash of its `cache_salt` (per request, or per API key with the
gateway's --isolate-prefix-cache-per-key), so prompts of different salts never share a block and one
tenant cannot probe another's cached prompts through `cached_tokens` or timing.

A block with ref_count 0 stays in the cache (with its hash) on an LRU free list until it is reused for
other tokens: only then is its hash forgotten. Invariant: every block is either referenced (ref > 0) or in
`free` exactly once.

Partial tails: when a sequence ends, its last, partly filled block is kept too, filed under the hash of the
full block before it. The next turn of that conversation resends the history, whose tokens continue
those of the tail: it takes the block over (it is never shared, so no copy) and computes only what comes
after the tokens it has in common, not the whole partial block again. With 16-token blocks that is up to
15 tokens less prefill per turn, which on a CPU is most of a short message's time to first token.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

from worker.engine.request import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    token_ids: tuple[int, ...] = ()
    tail_parent: bytes | None = None  # set while the block is a kept partial tail (with is_tail)
    is_tail: bool = False


def chain_hash(prev: bytes, tokens: tuple[int, ...]) -> bytes:
    return hashlib.sha256(prev + array("q", tokens).tobytes()).digest()



@dataclass
class BlockManager:
    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = True
    blocks: list[Block] = field(init=False)
    free: OrderedDict[int, None] = field(init=False)  # LRU order: first = least recently freed
    by_hash: dict[bytes, int] = field(init=False)
    tails: dict[bytes, dict[int, None]] = field(init=False)  # hash of the block before (or root) -> tail blocks
    # statistics (prefix-cache queries and hits, in tokens)
    query_tokens: int = 0
    hit_tokens: int = 0

    def __post_init__(self) -> None:
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self.free = OrderedDict((i, None) for i in range(self.num_blocks))
        self.by_hash = {}
        self.tails = {}

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
        self._forget_tail(block)
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block

    def _forget_tail(self, block: Block) -> None:
        if block.is_tail:
            group = self.tails[block.tail_parent]
            del group[block.block_id]
            if not group:
                del self.tails[block.tail_parent]
            block.is_tail, block.tail_parent, block.token_ids = False, None, ()

    def _matching_tail(self, seq: Sequence, parent: bytes | None, start: int) -> tuple[int, int]:
        """The kept tail filed under `parent` sharing the most tokens with seq from position `start`:
        (block id, tokens in common), leaving >= 1 token of seq to compute; (-1, 0) if none."""
        best, best_m = -1, 0
        limit = seq.num_tokens - 1 - start
        for block_id in self.tails.get(parent, ()):
            kept = self.blocks[block_id].token_ids
            m = 0
            for a, b in zip(kept, seq.token_ids[start : start + min(len(kept), limit)]):
                if a != b:
                    break
                m += 1
            if m > best_m:
                best, best_m = block_id, m
        return best, best_m

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Ids of cached blocks that hold a prefix of seq's tokens (leaving >= 1 token to compute)."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []  # a scored prompt computes every position: its logprobs come from its prefill
        hits: list[int] = []
        prev = seq.cache_root
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
        seq.last_hash = self.blocks[hits[-1]].hash if hits else seq.cache_root
        computed = len(hits) * self.block_size
        reuse = self.enable_prefix_caching and seq.params.prompt_logprobs is None
        tail, common = self._matching_tail(seq, seq.last_hash, computed) if reuse else (-1, 0)
        if common:  # take the kept tail over: its first `common` slots already hold these tokens
            block = self.blocks[tail]
            del self.free[tail]
            self._forget_tail(block)
            block.ref_count = 1
            seq.block_table.append(tail)
            computed += common
        for _ in range(self.blocks_needed(seq.num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._take_free().block_id)
        seq.num_computed_tokens = computed
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
        prev = seq.last_hash if seq.last_hash is not None else seq.cache_root
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
        """Release seq's blocks; cached ones stay findable until reused (LRU: freed last, reused last),
        and so does a partly filled last block (a tail, see above)."""
        self._keep_tail(seq)
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0
            if block.ref_count == 0:
                if block.hash is None and not block.is_tail:
                    self.free[block_id] = None
                    self.free.move_to_end(block_id, last=False)  # uncached: reuse these first
                else:
                    self.free[block_id] = None
        seq.block_table.clear()
        seq.num_computed_tokens = 0

    def _keep_tail(self, seq: Sequence) -> None:
        bs = self.block_size
        computed = min(seq.num_computed_tokens, seq.num_tokens)
        k, filled = divmod(computed, bs)
        if not self.enable_prefix_caching or not filled or k >= len(seq.block_table) or seq.num_hashed_blocks < k:
            return
        block = self.blocks[seq.block_table[k]]
        if block.ref_count != 1 or block.hash is not None:
            return
        parent = self.blocks[seq.block_table[k - 1]].hash if k else seq.cache_root
        block.is_tail, block.tail_parent = True, parent
        block.token_ids = tuple(seq.token_ids[k * bs : computed])
        self.tails.setdefault(parent, {})[block.block_id] = None
