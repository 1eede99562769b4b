"""Block manager + scheduler without a model: accounting, prefix sharing, preemption, no leaks.

A fake runner plays the model's role on the cache: it writes each computed token's id into its slot
(all writes of a step first, as the attention backend does) and then checks that every position a
sequence would attend to holds that sequence's token. That catches a shared block with the wrong
contents, a block freed while in use, or a prefix hit on a block not yet written.
"""
import random

import pytest
from hypothesis import given, settings, strategies as st

from engine.sampler.block_manager import BlockManager
from engine.sampler.sampling import SamplingParams
from engine.sampler.scheduler import Scheduler
from engine.sampler.sequence import Sequence


def make_seq(seq_id, prompt, max_new, sample_index=0):
    params = SamplingParams(max_new_tokens=max_new)
    return Sequence(seq_id, seq_id, sample_index, prompt, params, len(prompt) + max_new, frozenset(), seed=seq_id)


def check_accounting(bm: BlockManager, running):
    refs = [0] * bm.num_blocks
    for seq in running:
        for b in seq.block_table:
            refs[b] += 1
    assert [b.ref_count for b in bm.blocks] == refs
    free, cached = set(bm.free), set(bm.evictable)
    assert len(free) == len(bm.free) and not free & cached
    assert all(refs[b] == 0 for b in free | cached)
    assert len(free) + len(cached) + sum(1 for r in refs if r) == bm.num_blocks
    for h, b in bm.hash_to_block.items():
        assert bm.blocks[b].hash == h


def simulate(requests, num_blocks, block_size, max_num_seqs, max_batched_tokens, caching, rng):
    bm = BlockManager(num_blocks, block_size, caching)
    sched = Scheduler(bm, max_num_seqs, max_batched_tokens)
    cache = {}  # slot -> token id written there
    seqs = [make_seq(i, p, n) for i, (p, n) in enumerate(requests)]
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_work():
        steps += 1
        assert steps < 100_000, "scheduler made no progress"
        scheduled = sched.schedule()
        assert scheduled, "a step with work must schedule something"
        assert sum(n for _, n in scheduled) <= max_batched_tokens
        assert len(sched.running) <= max_num_seqs
        for seq, n in scheduled:  # writes first, like the attention backend
            for p in range(seq.num_computed, seq.num_computed + n):
                cache[seq.block_table[p // block_size] * block_size + p % block_size] = seq.token_ids[p]
        for seq, n in scheduled:
            end = seq.num_computed + n
            assert len(seq.block_table) == bm.blocks_for(end)
            seen = [cache.get(seq.block_table[p // block_size] * block_size + p % block_size) for p in range(end)]
            assert seen == seq.token_ids[:end]
        check_accounting(bm, sched.running)
        for seq, n in scheduled:
            seq.num_computed += n
            if seq.num_computed == len(seq.token_ids):
                # Low-entropy tokens so that different requests' generations also collide in the cache.
                seq.token_ids.append(rng.randrange(3))
                if len(seq.token_ids) >= seq.max_len or rng.random() < 0.02:
                    sched.finish(seq, "length")
    assert all(s.num_generated >= 1 for s in seqs)
    assert all(len(s.token_ids) <= s.max_len for s in seqs)
    assert bm.all_released()
    check_accounting(bm, [])
    return bm, sched


def random_requests(rng, count, max_prompt, max_new, shared_prefixes):
    reqs = []
    for _ in range(count):
        prefix = rng.choice(shared_prefixes)
        tail = [rng.randrange(50) for _ in range(rng.randrange(0, max_prompt))]
        prompt = (prefix + tail)[:max_prompt] or [1]
        reqs.append((prompt, rng.randrange(1, max_new + 1)))
    return reqs


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    num_requests=st.integers(1, 40),
    block_size=st.sampled_from([1, 2, 4, 16]),
    extra_blocks=st.integers(0, 20),
    max_num_seqs=st.integers(1, 8),
    max_batched_tokens=st.integers(1, 64),
    caching=st.booleans(),
)
def test_random_workloads_never_leak_or_corrupt(seed, num_requests, block_size, extra_blocks, max_num_seqs,
                                                max_batched_tokens, caching):
    rng = random.Random(seed)
    prefixes = [[], [rng.randrange(50) for _ in range(20)], [7] * 33]
    reqs = random_requests(rng, num_requests, 48, 24, prefixes)
    # Just enough blocks for the longest request, plus a few: forces preemption under load.
    need = max(-(-(len(p) + n) // block_size) for p, n in reqs)
    simulate(reqs, need + extra_blocks, block_size, max_num_seqs, max_batched_tokens, caching, rng)


def test_thousand_requests_no_leak_and_prefix_hits():
    rng = random.Random(0)
    prefixes = [[rng.randrange(50) for _ in range(40)] for _ in range(3)]
    reqs = random_requests(rng, 1000, 64, 16, prefixes)
    bm, sched = simulate(reqs, 60, 8, 16, 128, True, rng)
    assert sched.num_preemptions > 0  # the budget was tight enough to exercise preemption
    assert bm.hit_rate > 0.3


def test_samples_of_one_prompt_share_blocks_in_the_same_step():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, 8, 1000)
    prompt = list(range(18))  # 4 full blocks + 2 tokens
    seqs = [make_seq(i, prompt, 4, sample_index=i) for i in range(4)]
    for s in seqs:
        sched.add(s)
    scheduled = sched.schedule()
    assert [n for _, n in scheduled] == [18, 2, 2, 2]
    assert all(s.block_table[:4] == seqs[0].block_table[:4] for s in seqs)
    assert all(bm.blocks[b].ref_count == 4 for b in seqs[0].block_table[:4])
    assert bm.hit_rate == pytest.approx(3 * 16 / (4 * 18))


def test_lru_evicts_oldest_cached_block_and_keeps_hash_consistent():
    bm = BlockManager(4, 2)
    a = make_seq(0, [1, 2, 3, 4, 5], 1)
    assert bm.try_admit(a, 100) == 5
    bm.register_full_blocks(a, 5)
    bm.release(a)
    assert len(bm.evictable) == 2 and len(bm.free) == 2
    b = make_seq(1, [9, 9, 9, 9, 9, 9, 9], 1)  # needs 4 blocks: evicts both cached ones
    assert bm.try_admit(b, 100) == 7
    assert not bm.evictable and not bm.hash_to_block
    bm.release(b)
    assert bm.all_released()


def test_admission_refuses_without_changing_state_when_blocks_are_short():
    bm = BlockManager(3, 4)
    a = make_seq(0, list(range(8)), 1)
    assert bm.try_admit(a, 100) == 8
    b = make_seq(1, list(range(20, 30)), 1)
    assert bm.try_admit(b, 100) == 0
    assert b.block_table == [] and bm.num_free_blocks == 1
    assert bm.try_admit(b, 4) == 4  # a smaller chunk fits


def test_request_larger_than_cache_is_rejected():
    sched = Scheduler(BlockManager(2, 4), 4, 64)
    with pytest.raises(ValueError, match="KV blocks"):
        sched.add(make_seq(0, list(range(6)), 4))
