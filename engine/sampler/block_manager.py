"""KV block bookkeeping: free list, ref counts, and a hash-chained prefix cache with LRU eviction.

Pure Python, no tensors: a block id indexes the per-layer cache tensors [num_blocks, block_size, Hkv, D]
that the runner owns. A full block is identified by the hash of (parent block's hash, its tokens), so two
sequences share a block only if their whole prefix up to and including it is identical. Blocks whose ref
count drops to zero keep their contents and their hash ("cached") until the allocator needs them, oldest
release first.
"""
from __future__ import annotations

from collections import OrderedDict, deque

from .sequence import Sequence


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "tokens")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.tokens: tuple[int, ...] | None = None  # kept to rule out hash collisions


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"BlockManager: num_blocks={num_blocks} and block_size={block_size} must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: deque[int] = deque(range(num_blocks))  # ref 0, no hash: contents meaningless
        self.evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, hashed: reusable prefix, LRU order
        self.hash_to_block: dict[int, int] = {}
        self.lookup_tokens = 0
        self.hit_tokens = 0

    # --- accounting -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free) + len(self.evictable)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def all_released(self) -> bool:
        """True when no sequence holds a block: every block is free or merely cached."""
        return self.num_free_blocks == self.num_blocks and all(b.ref_count == 0 for b in self.blocks)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0

    # --- allocation ---------------------------------------------------------------------------
    def _take_free(self) -> int:
        if self.free:
            block_id = self.free.popleft()
        else:
            block_id, _ = self.evictable.popitem(last=False)
            block = self.blocks[block_id]
            if self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash = block.tokens = None
        self.blocks[block_id].ref_count = 1
        return block_id

    def _prefix_hits(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """Cached blocks matching seq's leading full blocks. The last token is never served from cache:
        its logits are needed to sample, so at least one token must run through the model."""
        if not self.enable_prefix_caching:
            return [], []
        bs, tokens = self.block_size, seq.token_ids
        hits, hashes, parent = [], [], None
        for i in range((len(tokens) - 1) // bs):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = chain_hash(parent, chunk)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].tokens != chunk:
                break
            hits.append(block_id)
            hashes.append(h)
            parent = h
        return hits, hashes

    def try_admit(self, seq: Sequence, token_budget: int) -> int:
        """Give a waiting sequence its cached prefix plus blocks for its first chunk.

        Returns the number of tokens to compute this step (0 = not admitted, nothing changed)."""
        assert not seq.block_table and seq.num_computed == 0
        hits, hashes = self._prefix_hits(seq)
        num_cached = len(hits) * self.block_size
        num_tokens = min(len(seq.token_ids) - num_cached, token_budget)
        if num_tokens <= 0:
            return 0
        new_needed = self.blocks_for(num_cached + num_tokens) - len(hits)
        reclaimed = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if new_needed > self.num_free_blocks - reclaimed:
            return 0
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.evictable[block_id]
            block.ref_count += 1
        seq.block_table = list(hits)
        seq.block_hashes = list(hashes)
        seq.num_computed = num_cached
        self.lookup_tokens += len(seq.token_ids)
        self.hit_tokens += num_cached
        for _ in range(new_needed):
            seq.block_table.append(self._take_free())
        return num_tokens

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make seq's block table cover num_tokens positions (caller checked can_grow)."""
        for _ in range(self.blocks_for(num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._take_free())

    def register_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Publish the blocks that will be full once the first num_tokens of seq are computed.

        Called when the step that computes them is scheduled: the attention backend writes every new K/V
        of a step before any attention read, so a sequence admitted later in the same step may already
        share these blocks."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), num_tokens // bs):
            chunk = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else None, chunk)
            seq.block_hashes.append(h)
            if not self.enable_prefix_caching:
                continue
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.hash_to_block:
                block.hash, block.tokens = h, chunk
                self.hash_to_block[h] = block.block_id

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (their K/V came from weights that have since changed)."""
        assert self.num_free_blocks == self.num_blocks, "reset_prefix_cache while sequences hold blocks"
        for block_id in self.evictable:
            self.blocks[block_id].hash = self.blocks[block_id].tokens = None
            self.free.append(block_id)
        self.evictable.clear()
        self.hash_to_block.clear()

    def release(self, seq: Sequence) -> None:
        """Drop seq's references; its hashed blocks stay reusable until evicted (LRU)."""
        # Release tail first so that, among one sequence's blocks, the deepest prefix is evicted first.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} released more often than taken"
            if block.ref_count == 0:
                if block.hash is not None:
                    self.evictable[block_id] = None
                else:
                    self.free.append(block_id)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed = 0
