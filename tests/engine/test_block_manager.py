"""Block manager: allocation, growth, prefix caching, LRU eviction, copy-on-write, no leaks."""

from __future__ import annotations

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lepton.engine.block_manager import BlockManager, NoFreeBlocksError, hash_block_tokens


def run_prompt(bm: BlockManager, seq_id, tokens: list[int]) -> int:
    """Allocate a prompt, 'compute' it in one step and publish its full blocks."""
    cached = bm.allocate(seq_id, tokens)
    assert bm.append_slots(seq_id, cached, len(tokens) - cached) == []
    bm.cache_blocks(seq_id, tokens, len(tokens))
    bm.check_invariants()
    return cached


def test_allocate_grow_and_free():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    assert bm.allocate("a", list(range(5))) == 0
    assert len(bm.block_table("a")) == 2 and bm.num_free_blocks == 6
    assert bm.append_slots("a", 5, 3) == [] and len(bm.block_table("a")) == 2   # fills block 1
    assert bm.append_slots("a", 8, 1) == [] and len(bm.block_table("a")) == 3   # opens block 2
    assert bm.append_slots("a", 9, 9) == [] and len(bm.block_table("a")) == 5   # 18 tokens
    assert bm.usage == pytest.approx(5 / 8)
    bm.check_invariants()
    bm.free("a")
    bm.free("a")   # freeing twice (abort after finish) is harmless
    bm.check_invariants()
    assert bm.num_free_blocks == 8 and bm.usage == 0
    assert bm.allocate("b", list(range(5))) == 0   # caching off: nothing is ever reused


def test_prefix_reuse_caps_at_last_prompt_token():
    bm = BlockManager(16, 4)
    a = list(range(100, 110))                        # 2 full blocks + 2 tokens
    assert run_prompt(bm, "a", a) == 0
    shared = bm.block_table("a")[:2]
    assert run_prompt(bm, "b", a[:8] + [7, 7, 7]) == 8
    assert bm.block_table("b")[:2] == shared and bm.block_table("b")[2] not in shared
    assert run_prompt(bm, "c", a[:8]) == 4           # fully cached: the last block is recomputed
    assert run_prompt(bm, "d", a[:9]) == 8
    assert run_prompt(bm, "e", a[:3]) == 0           # no full block
    assert bm.prefix_cache_hit_rate == pytest.approx((8 + 4 + 8) / (10 + 11 + 8 + 9 + 3))
    for s in "abcde":
        bm.free(s)
    bm.check_invariants()
    assert bm.num_free_blocks == 16 and bm.usage == 0
    assert bm.allocate("again", a) == 8              # cached blocks outlive their users
    assert bm.block_table("again")[:2] == shared
    bm.free("again")
    bm.reset_prefix_cache()
    bm.check_invariants()
    assert bm.allocate("after-reset", a) == 0


def test_lru_eviction_order():
    bm = BlockManager(6, 2)
    x, y = [1, 2, 3, 4, 5], [7, 8, 9, 10, 11]        # 2 full blocks + 1 partial each
    for name, toks in (("x", x), ("y", y)):
        run_prompt(bm, name, toks)
        bm.free(name)
    # Free list: the two partial blocks; LRU first: x's tail, x's head, y's tail, y's head.
    bm.allocate("w", [50] * 5)                       # 2 free + evicts x's tail (never published)
    bm.free("w")
    assert run_prompt(bm, "x2", x) == 2              # x's head survived its tail
    bm.free("x2")                                    # x is now the most recently used
    bm.check_invariants()
    bm.allocate("z", [60] * 7)                       # 2 free + evicts y's two blocks, not x's
    bm.free("z")
    assert bm.allocate("y2", y) == 0
    bm.free("y2")
    assert bm.allocate("x3", x) == 4
    bm.free("x3")
    bm.check_invariants()
    assert bm.num_free_blocks == 6


def test_hits_are_claimed_before_eviction():
    bm = BlockManager(4, 2)
    run_prompt(bm, "a", [1, 2, 3])
    bm.free("a")
    run_prompt(bm, "b", [5, 6, 7])
    bm.free("b")
    bm.allocate("fill", [0] * 4)                     # takes both free blocks
    a0, b0 = bm._evictor                             # LRU first: a's head, then b's
    assert bm.can_allocate([1, 2, 9]) and bm.allocate("c", [1, 2, 9]) == 2
    assert bm.block_table("c")[0] == a0 and bm.block_table("c")[1] == b0   # b0 evicted, a0 kept
    bm.check_invariants()
    bm.free("fill")
    assert bm.allocate("c2", [1, 2, 5]) == 2         # a0 in use by c: still a hit, now shared
    assert bm.num_free_blocks == 1
    bm.check_invariants()


def test_hash_chaining_and_salt():
    salt, toks = b"s" * 16, [1, 2, 3, 4]
    root = hash_block_tokens(salt, None, [9, 9, 9, 9])
    assert hash_block_tokens(salt, root, toks) == hash_block_tokens(salt, root, list(toks))
    assert hash_block_tokens(salt, root, toks) != hash_block_tokens(salt, None, toks)
    other_root = hash_block_tokens(salt, None, [8] * 4)
    assert hash_block_tokens(salt, root, toks) != hash_block_tokens(salt, other_root, toks)
    assert hash_block_tokens(salt, None, toks) != hash_block_tokens(b"t" * 16, None, toks)
    assert hash_block_tokens(salt, None, [1, 256]) != hash_block_tokens(salt, None, [256, 1])
    assert hash_block_tokens(salt, None, [2**40]) != hash_block_tokens(salt, None, [0])
    # Same second block under a different first block: no reuse.
    bm = BlockManager(8, 4)
    run_prompt(bm, "a", [1] * 4 + toks + [0])
    assert run_prompt(bm, "b", [2] * 4 + toks + [0]) == 0
    # Different managers (random salts) key the same tokens differently.
    assert BlockManager(4, 4)._prompt_hashes(toks) != BlockManager(4, 4)._prompt_hashes(toks)
    with pytest.raises(ValueError, match="salt"):
        BlockManager(4, 4, salt=b"x" * 65)


def test_fork_copy_on_write():
    bm = BlockManager(8, 4)
    toks = list(range(6))
    run_prompt(bm, "p", toks)
    b0, b1 = bm.block_table("p")
    bm.fork("p", "c")
    bm.check_invariants()
    assert bm.block_table("c") == [b0, b1] and bm.num_free_blocks == 6
    (src, dst), = bm.append_slots("p", 6, 1)         # parent writes position 6 into shared b1
    assert src == b1 and dst not in (b0, b1)
    assert bm.block_table("p") == [b0, dst] and bm.block_table("c") == [b0, b1]
    assert bm.append_slots("c", 6, 1) == []          # b1 is the child's alone now
    assert bm.append_slots("c", 7, 2) == [] and len(bm.block_table("c")) == 3
    bm.check_invariants()
    # Forking at a block boundary shares only full blocks: new tokens go to fresh blocks.
    bm.fork("c", "g")
    assert bm.append_slots("c", 9, 1) != [] and bm.append_slots("g", 9, 1) == []
    for s in ("p", "c", "g"):
        bm.free(s)
    bm.check_invariants()
    assert bm.num_free_blocks == 8


def test_out_of_blocks():
    bm = BlockManager(4, 4)
    assert not bm.can_allocate(list(range(17)))
    with pytest.raises(NoFreeBlocksError):
        bm.allocate("big", list(range(17)))
    assert not bm.has_seq("big") and bm.num_free_blocks == 4
    assert bm.can_allocate(list(range(16)))
    assert not bm.can_allocate(list(range(16)), num_lookahead_slots=1)
    bm.allocate("a", list(range(12)))
    assert bm.can_append_slots("a", 12, 4) and not bm.can_append_slots("a", 12, 5)
    with pytest.raises(NoFreeBlocksError):
        bm.append_slots("a", 12, 5)
    assert len(bm.block_table("a")) == 3
    bm.check_invariants()
    with pytest.raises(ValueError, match="already"):
        bm.allocate("a", [1])
    with pytest.raises(ValueError, match="token_ids"):
        bm.allocate("e", [])
    with pytest.raises(ValueError, match="seq_id"):
        bm.append_slots("nope", 0, 1)


VOCAB = st.integers(0, 3)   # tiny vocabulary, many shared prefixes
BASES = [[i % 3] * 3 + list(range(12)) for i in range(3)]


class BlockManagerMachine(RuleBasedStateMachine):
    """Random add / step / fork / free against a model of the cache contents: every block slot
    holds the token whose KV it stores, so reuse, eviction and copy-on-write are all checked."""

    @initialize(num_blocks=st.integers(3, 14), caching=st.booleans())
    def setup(self, num_blocks, caching):
        self.bs = 3
        self.bm = BlockManager(num_blocks, self.bs, enable_prefix_caching=caching)
        self.slots: dict[int, list] = {b: [None] * self.bs for b in range(num_blocks)}
        self.seqs: dict[int, tuple[list[int], int]] = {}   # seq_id -> (tokens, num_computed)
        self.next_id = 0

    def _read(self, seq_id, n):
        table = self.bm.block_table(seq_id)
        return [self.slots[table[p // self.bs]][p % self.bs] for p in range(n)]

    @rule(base=st.sampled_from(BASES), keep=st.integers(0, 15), tail=st.lists(VOCAB, max_size=5))
    def add(self, base, keep, tail):
        prompt = base[:keep] + tail or [0]
        sid, self.next_id = self.next_id, self.next_id + 1
        if not self.bm.can_allocate(prompt):
            with pytest.raises(NoFreeBlocksError):
                self.bm.allocate(sid, prompt)
            return
        cached = self.bm.allocate(sid, prompt)
        assert cached % self.bs == 0 and cached < len(prompt)
        assert self._read(sid, cached) == prompt[:cached]   # a hit holds exactly these tokens
        self.seqs[sid] = (prompt, cached)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), chunk=st.integers(1, 7), token=VOCAB)
    def step(self, data, chunk, token):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        tokens, done = self.seqs[sid]
        if done == len(tokens):                          # decode: the sampled token is pending
            tokens = tokens + [token]
        n = min(chunk, len(tokens) - done)
        if not self.bm.can_append_slots(sid, done, n):
            with pytest.raises(NoFreeBlocksError):
                self.bm.append_slots(sid, done, n)
            return
        for src, dst in self.bm.append_slots(sid, done, n):
            self.slots[dst] = list(self.slots[src])
        table = self.bm.block_table(sid)
        for p in range(done, done + n):                  # the forward writes the new tokens
            self.slots[table[p // self.bs]][p % self.bs] = tokens[p]
        self.seqs[sid] = (tokens, done + n)
        self.bm.cache_blocks(sid, tokens, done + n)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.seqs)))
        sid, self.next_id = self.next_id, self.next_id + 1
        self.bm.fork(parent, sid)
        self.seqs[sid] = self.seqs[parent]

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.bm.free(sid)
        del self.seqs[sid]

    @invariant()
    def consistent(self):
        self.bm.check_invariants()
        for sid, (tokens, done) in self.seqs.items():
            assert self._read(sid, done) == tokens[:done]

    def teardown(self):
        for sid in list(self.seqs):
            self.bm.free(sid)
        self.bm.check_invariants()
        assert self.bm.num_free_blocks == self.bm.num_blocks


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
