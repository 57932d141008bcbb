"""KV-cache block manager: free list, reference counts, copy-on-write and prefix caching.

Every cache block is in exactly one state:
    free        refcount 0, no hash; handed out first
    cached      refcount 0, hashed: its KV still holds a known token prefix, reusable until it is
                evicted (least recently freed first) to serve an allocation when no block is free
    in use      refcount = the number of block tables that hold it (> 1 after fork, or when several
                sequences share a cached prefix)

Prefix caching keys a FULL block by a hash chained over its parent's key and its token ids:
    key_i = blake2b(key=salt)(key_{i-1} | token_ids[i*bs:(i+1)*bs] as little-endian int64)
with key_{-1} = 32 zero bytes and a random 16-byte salt per manager by default, so a client
cannot craft prompts whose keys collide with another user's prefix. A request's ``cache_salt``
(a string, vLLM's field of that name) replaces key_{-1} with a key derived from it, so it enters
the first block's key and through the chain every later one: requests with different salts
never share a block, whatever their tokens (a server salts per user or per API key). Only blocks whose KV the
runner has written are published (``cache_blocks``). A new prompt reuses the longest chain of
published blocks, but never the block holding its last token: the model must compute at least
one prompt token to produce logits to sample from, so a fully cached prompt of k full blocks
recomputes its last block.

How the scheduler and the engine core drive it (``seq_id`` is any hashable; ``token_ids`` =
prompt + generated):

    if bm.can_allocate(prompt_ids, num_lookahead_slots=1):
        seq.num_computed_tokens = bm.allocate(seq_id, prompt_ids)   # = num_cached_tokens
    # every step, for each scheduled sequence contributing n new tokens:
    if not bm.can_append_slots(seq_id, seq.num_computed_tokens, n): preempt something
    cow += bm.append_slots(seq_id, seq.num_computed_tokens, n)       # [(src, dst), ...]
    executor.execute_model(...)   # lepton_kernels.copy_blocks(cow) first, then the forward over
                                  # bm.block_table(seq_id); then advance num_computed_tokens and
    bm.cache_blocks(seq_id, seq.token_ids, seq.num_computed_tokens)  # publish finished blocks
    bm.fork(parent_id, child_id)                                     # n > 1: share every block
    bm.free(seq_id)                                                  # finished or aborted

``append_slots`` never writes into a block other tables share: it swaps such a block for a fresh
one and returns the (src, dst) pair for copy_blocks. Out of blocks raises NoFreeBlocksError and
leaves the state unchanged.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Hashable, Sequence

ROOT_HASH = bytes(32)
# blake2b's personalization keeps salt roots apart from block keys, whatever bytes a salt holds.
_SALT_PERSON = b"lepton.cachesalt"
_NO_COPIES: list = []   # shared, never mutated: the decode fast path allocates nothing


class NoFreeBlocksError(RuntimeError):
    """The KV cache has too few free or evictable blocks for the request."""


def hash_block_tokens(salt: bytes, parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Key of a full block: keyed blake2b over (parent key, token ids), fixed-width encoding."""
    h = hashlib.blake2b(key=salt, digest_size=32)
    h.update(parent_hash or ROOT_HASH)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


@dataclass
class _SeqBlocks:
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)   # keys of its first full blocks
    num_published: int = 0     # leading blocks whose computed KV cache_blocks already handled
    root: bytes = ROOT_HASH    # key_{-1}: the parent of its first block (its cache_salt's root)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 salt: bytes | None = None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        if salt is not None and not (isinstance(salt, bytes) and 1 <= len(salt) <= 64):
            raise ValueError("salt must be 1 to 64 bytes (a blake2b key)")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.salt = os.urandom(16) if salt is None else salt
        self._refcount = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}                        # key -> block holding it
        self._free: deque[int] = deque(range(num_blocks))
        self._evictor: OrderedDict[int, None] = OrderedDict()      # cached blocks, LRU first
        self._seqs: dict[Hashable, _SeqBlocks] = {}
        self._queried_tokens = self._hit_tokens = 0

    # ---- state ------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: free ones plus cached ones nobody uses."""
        return len(self._free) + len(self._evictor)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def prefix_cache_queries(self) -> int:
        """Prompt tokens looked up in the prefix cache (at allocation)."""
        return self._queried_tokens

    @property
    def prefix_cache_hits(self) -> int:
        """Prompt tokens the prefix cache served."""
        return self._hit_tokens

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prompt tokens served from the cache / prompt tokens allocated (0 before any)."""
        return self._hit_tokens / self._queried_tokens if self._queried_tokens else 0.0

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._seq(seq_id).block_table)

    def block_table_view(self, seq_id: Hashable) -> list[int]:
        """The live block table (no copy: the runner reads it every step; never mutate it)."""
        return self._seq(seq_id).block_table

    def has_seq(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def _seq(self, seq_id: Hashable) -> _SeqBlocks:
        if seq_id not in self._seqs:
            raise ValueError(f"seq_id {seq_id!r} has no blocks (allocate it first)")
        return self._seqs[seq_id]

    # ---- allocation -------------------------------------------------------------------------
    def _root(self, cache_salt: str | None) -> bytes:
        """key_{-1} of a request: ROOT_HASH unsalted, else a keyed hash of its cache_salt."""
        if cache_salt is None:
            return ROOT_HASH
        if not isinstance(cache_salt, str) or not cache_salt:
            raise ValueError(f"cache_salt must be None or a non-empty string, got {cache_salt!r}")
        h = hashlib.blake2b(key=self.salt, digest_size=32, person=_SALT_PERSON)
        h.update(cache_salt.encode("utf-8", "surrogatepass"))
        return h.digest()

    def _prompt_hashes(self, token_ids: Sequence[int], root: bytes = ROOT_HASH) -> list[bytes]:
        if not self.enable_prefix_caching:
            return []
        bs, keys, parent = self.block_size, [], root
        for i in range(len(token_ids) // bs):
            parent = hash_block_tokens(self.salt, parent, token_ids[i * bs:(i + 1) * bs])
            keys.append(parent)
        return keys

    def _cache_hits(self, token_ids: Sequence[int], keys: list[bytes], use_cache: bool = True) -> list[int]:
        """Blocks of the longest published chain, leaving the last prompt token to compute."""
        hits = []
        if not use_cache:
            return hits
        for key in keys[:(len(token_ids) - 1) // self.block_size]:
            if key not in self._cached:
                break
            hits.append(self._cached[key])
        return hits

    def can_allocate(self, token_ids: Sequence[int], num_lookahead_slots: int = 0,
                     use_cache: bool = True, cache_salt: str | None = None) -> bool:
        """Whether allocate(token_ids) would succeed with num_lookahead_slots blocks' worth of
        extra slots still available afterwards."""
        keys = self._prompt_hashes(token_ids, self._root(cache_salt))
        hits = self._cache_hits(token_ids, keys, use_cache)
        total = -(-(len(token_ids) + num_lookahead_slots) // self.block_size)
        cost = total - len(hits) + sum(self._refcount[b] == 0 for b in hits)
        return cost <= self.num_free_blocks

    def allocate(self, seq_id: Hashable, token_ids: Sequence[int], use_cache: bool = True,
                 cache_salt: str | None = None) -> int:
        """Give a new sequence blocks for its prompt; returns num_cached_tokens, the prompt
        tokens whose KV the reused prefix blocks already hold (a multiple of block_size).
        ``use_cache=False`` computes every token (prompt logprobs need the logits of all of
        them); the blocks are still published afterwards. Only blocks published under the same
        ``cache_salt`` (None: unsalted) are reused, and its blocks are published under it."""
        if seq_id in self._seqs:
            raise ValueError(f"seq_id {seq_id!r} already has blocks")
        if len(token_ids) == 0:
            raise ValueError("token_ids must hold at least one prompt token")
        root = self._root(cache_salt)
        keys = self._prompt_hashes(token_ids, root)
        hits = self._cache_hits(token_ids, keys, use_cache)
        num_new = -(-len(token_ids) // self.block_size) - len(hits)
        if num_new + sum(self._refcount[b] == 0 for b in hits) > self.num_free_blocks:
            raise NoFreeBlocksError(f"KV cache out of blocks: a prompt of {len(token_ids)} tokens "
                                    f"needs {num_new} new blocks, {self.num_free_blocks} available")
        for b in hits:   # claim the hits before allocating, so eviction cannot take them
            self._evictor.pop(b, None)
            self._refcount[b] += 1
        table = hits + [self._take_block() for _ in range(num_new)]
        self._seqs[seq_id] = _SeqBlocks(table, keys, num_published=len(hits), root=root)
        num_cached = len(hits) * self.block_size
        if self.enable_prefix_caching:
            self._queried_tokens += len(token_ids)
            self._hit_tokens += num_cached
        return num_cached

    def _take_block(self) -> int:
        if self._free:
            b = self._free.popleft()
        elif self._evictor:
            b, _ = self._evictor.popitem(last=False)
            del self._cached[self._hash[b]]
            self._hash[b] = None
        else:
            raise NoFreeBlocksError("KV cache out of blocks")
        self._refcount[b] = 1
        return b

    def _release(self, b: int) -> None:
        self._refcount[b] -= 1
        if self._refcount[b] == 0:
            if self._hash[b] is not None:
                self._evictor[b] = None
            else:
                self._free.append(b)

    # ---- growth and copy-on-write -------------------------------------------------------------
    def _append_plan(self, seq: _SeqBlocks, num_computed_tokens: int, num_new_tokens: int
                     ) -> tuple[int, list[int]]:
        """(blocks to add at the end, indices of shared blocks the write touches)."""
        if num_computed_tokens < 0 or num_new_tokens < 0:
            raise ValueError("num_computed_tokens and num_new_tokens must be >= 0")
        if num_new_tokens == 0:
            return 0, []
        bs, table = self.block_size, seq.block_table
        end = num_computed_tokens + num_new_tokens
        grow = max(0, -(-end // bs) - len(table))
        touched = range(num_computed_tokens // bs, min((end - 1) // bs + 1, len(table)))
        for i in touched:
            if self._hash[table[i]] is not None:
                raise ValueError(f"writing tokens from position {num_computed_tokens} would "
                                 f"overwrite cached block {i} (num_computed_tokens too small?)")
        return grow, [i for i in touched if self._refcount[table[i]] > 1]

    def can_append_slots(self, seq_id: Hashable, num_computed_tokens: int, num_new_tokens: int) -> bool:
        grow, shared = self._append_plan(self._seq(seq_id), num_computed_tokens, num_new_tokens)
        return grow + len(shared) <= self.num_free_blocks

    def append_slots(self, seq_id: Hashable, num_computed_tokens: int, num_new_tokens: int
                     ) -> list[tuple[int, int]]:
        """Make positions num_computed_tokens .. +num_new_tokens-1 writable by this sequence
        alone: grow the table, and swap every shared block the write touches for a private
        copy. Returns the (src, dst) pairs copy_blocks must apply before the forward."""
        seq = self._seqs.get(seq_id) or self._seq(seq_id)
        if num_new_tokens == 1 and num_computed_tokens >= 0:
            # Decode fast path: the slot is inside a block this sequence alone holds, unhashed.
            i = num_computed_tokens // self.block_size
            table = seq.block_table
            if i < len(table):
                b = table[i]
                if self._refcount[b] == 1 and self._hash[b] is None:
                    return _NO_COPIES
        grow, shared = self._append_plan(seq, num_computed_tokens, num_new_tokens)
        if grow + len(shared) > self.num_free_blocks:
            raise NoFreeBlocksError(f"KV cache out of blocks: {grow + len(shared)} needed, "
                                    f"{self.num_free_blocks} available")
        copies = []
        for i in shared:
            src, dst = seq.block_table[i], self._take_block()
            self._release(src)
            seq.block_table[i] = dst
            copies.append((src, dst))
        seq.block_table.extend(self._take_block() for _ in range(grow))
        return copies

    def cache_blocks(self, seq_id: Hashable, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Publish the sequence's full blocks among its first num_computed_tokens tokens (their
        KV is written) so later prompts can reuse them. Cheap to call after every step."""
        seq = self._seq(seq_id)
        if not self.enable_prefix_caching or num_computed_tokens // self.block_size <= seq.num_published:
            return   # no block completed since the last call (most decode steps)
        bs, keys = self.block_size, seq.block_hashes
        if num_computed_tokens > len(token_ids) or num_computed_tokens > len(seq.block_table) * bs:
            raise ValueError(f"num_computed_tokens {num_computed_tokens} exceeds the sequence's "
                             f"{len(token_ids)} tokens or its {len(seq.block_table)} blocks")
        for i in range(seq.num_published, num_computed_tokens // bs):
            if i == len(keys):
                keys.append(hash_block_tokens(self.salt, keys[-1] if keys else seq.root,
                                              token_ids[i * bs:(i + 1) * bs]))
            b = seq.block_table[i]
            # The same content may already be published from another block (two prompts
            # computed concurrently): keep that one, this block simply stays unhashed.
            if self._hash[b] is None and keys[i] not in self._cached:
                self._hash[b], self._cached[keys[i]] = keys[i], b
        seq.num_published = max(seq.num_published, num_computed_tokens // bs)

    # ---- sharing and release ------------------------------------------------------------------
    def fork(self, parent_seq_id: Hashable, child_seq_id: Hashable) -> None:
        """The child shares every block of the parent (n > 1 samples, beam search)."""
        parent = self._seq(parent_seq_id)
        if child_seq_id in self._seqs:
            raise ValueError(f"seq_id {child_seq_id!r} already has blocks")
        for b in parent.block_table:
            self._refcount[b] += 1
        self._seqs[child_seq_id] = _SeqBlocks(list(parent.block_table), list(parent.block_hashes),
                                              parent.num_published, parent.root)

    def free(self, seq_id: Hashable) -> None:
        """Drop the sequence's blocks (finished or aborted; a seq_id without blocks is a no-op).
        Published blocks nobody else uses stay cached; the tail is released first so it is
        evicted before the prefix it extends."""
        for b in reversed(self._seqs.pop(seq_id, _SeqBlocks()).block_table):
            self._release(b)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (e.g. after new weights); blocks in use stay in use."""
        for b in self._evictor:
            self._free.append(b)
        self._evictor.clear()
        self._cached.clear()
        self._hash = [None] * self.num_blocks

    # ---- tests --------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError unless every block is exactly one of free / cached / in use with
        refcount = number of tables holding it, and the key map matches the block hashes."""
        def require(cond: bool, msg: str) -> None:
            if not cond:
                raise AssertionError(msg)

        holders = [0] * self.num_blocks
        for sid, seq in self._seqs.items():
            require(len(set(seq.block_table)) == len(seq.block_table), f"{sid!r} repeats a block")
            for b in seq.block_table:
                holders[b] += 1
        free = list(self._free)
        require(len(set(free)) == len(free), "a block is twice in the free list")
        for b in range(self.num_blocks):
            states = (b in self._evictor) + (self._refcount[b] > 0) + free.count(b)
            require(states == 1, f"block {b} is in {states} states")
            require(self._refcount[b] == holders[b],
                    f"block {b}: refcount {self._refcount[b]}, held by {holders[b]} tables")
            if b in self._evictor:
                require(self._hash[b] is not None, f"cached block {b} has no hash")
            if b in self._free:
                require(self._hash[b] is None, f"free block {b} has a hash")
        hashed = {b: h for b, h in enumerate(self._hash) if h is not None}
        require(len(hashed) == len(self._cached)
                and all(self._cached.get(h) == b for b, h in hashed.items()),
                "key map out of sync with the block hashes")
        require(self.enable_prefix_caching or not self._cached, "caching is off but blocks are cached")
