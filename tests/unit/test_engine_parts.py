"""Block manager, scheduler (with a fake runner), stop strings, detokenizer, sampler."""

import torch

from chatserve.protocol.sampling import SamplingParams
from worker.engine.detokenizer import IncrementalDetokenizer
from worker.engine.kv_cache import BlockManager
from worker.engine.request import SeqStatus, Sequence
from worker.engine.sampler import sample
from worker.engine.scheduler import Scheduler
from worker.engine.stopping import StopChecker


def seq(tokens, max_tokens=4, **kw) -> Sequence:
    return Sequence("r", 0, list(tokens), SamplingParams(max_tokens=max_tokens, temperature=0, **kw))


def run_and_free(bm: BlockManager, tokens, **kw) -> list[int]:
    """A sequence that computed all its tokens and ended; returns the blocks it held."""
    s = seq(tokens, **kw)
    bm.allocate(s)
    table = list(s.block_table)
    s.num_computed_tokens = s.num_tokens
    bm.commit_full_blocks(s)
    bm.free_seq(s)
    return table


def test_prefix_blocks_are_reused_by_a_later_sequence():
    bm = BlockManager(num_blocks=8, block_size=4)
    a_table = run_and_free(bm, range(10))  # blocks [0..3], [4..7] are full, [8, 9] partly filled
    b = seq([*range(10), 99, 98])
    bm.allocate(b)
    # two full blocks by hash, then a's partly filled third block (8, 9) taken over as it is
    assert b.num_cached_tokens == 10 and b.num_computed_tokens == 10
    assert bm.hit_tokens == 10 and b.block_table[:3] == a_table[:3]


def test_cache_salts_keep_prefixes_apart_full_blocks_and_tails_alike():
    bm = BlockManager(num_blocks=16, block_size=4)
    run_and_free(bm, range(10), cache_salt="tenant-a")
    for salt, cached in (("tenant-b", 0), (None, 0), ("tenant-a", 10)):
        other = seq([*range(10), 99], cache_salt=salt)
        bm.allocate(other)
        assert other.num_cached_tokens == cached, salt
        bm.free_seq(other)


def test_block_keys_are_sha256_chains():
    import hashlib
    from array import array

    from worker.engine.kv_cache import chain_hash
    from worker.engine.request import root_hash

    root = root_hash(None)
    assert chain_hash(root, (1, 2)) == hashlib.sha256(root + array("q", [1, 2]).tobytes()).digest()
    assert root_hash("x") != root and chain_hash(root, (1, 2)) != chain_hash(root_hash("x"), (1, 2))


def test_a_kept_tail_is_taken_over_only_as_far_as_the_tokens_agree():
    bm = BlockManager(num_blocks=8, block_size=4)
    run_and_free(bm, range(7))  # block 1 holds 4, 5, 6
    b = seq([0, 1, 2, 3, 4, 5, 77, 78])
    bm.allocate(b)
    assert b.num_computed_tokens == 6  # 4, 5 in common; 77 overwrites slot 2 of the taken-over block
    assert not bm.tails  # taken over: no longer kept for anyone else
    bm.free_seq(b)
    c = seq([9, 1, 2, 3, 4, 5, 6, 8])  # same tail tokens after a different first block: not a match
    bm.allocate(c)
    assert c.num_computed_tokens == 0


def test_a_tail_leaves_the_last_token_to_compute_and_is_forgotten_when_evicted():
    bm = BlockManager(num_blocks=3, block_size=4)
    run_and_free(bm, range(6))
    same = seq(range(6))
    bm.allocate(same)
    assert same.num_computed_tokens == 5  # the prompt's last token is computed, to sample from
    bm.free_seq(same)
    other = seq(range(100, 112))  # needs all three blocks: the kept ones are reused
    bm.allocate(other)
    assert not bm.tails and not bm.by_hash
    bm.free_seq(other)
    again = seq(range(6))
    bm.allocate(again)
    assert again.num_computed_tokens == 0 and bm.num_free + len(again.block_table) == 3


def test_fully_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    run_and_free(bm, range(8))
    b = seq(range(8))
    bm.allocate(b)
    assert b.num_computed_tokens == 4  # the second block is recomputed so a token can be sampled


def test_cached_blocks_are_evicted_least_recently_used_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    for start in (0, 100):
        run_and_free(bm, range(start, start + 3))
    # fill the cache so the oldest cached block must be reused
    big = seq(range(500, 506))
    bm.allocate(big)
    bm.free_seq(big)
    newer = seq([100, 101, 7])
    bm.allocate(newer)
    older = seq([0, 1, 7])
    assert bm.num_free + len(newer.block_table) == 4
    bm.allocate(older)
    assert older.num_cached_tokens == 0


def test_block_accounting_returns_every_block():
    bm = BlockManager(num_blocks=16, block_size=4)
    seqs = [seq(range(i, i + 9)) for i in range(3)]
    for s in seqs:
        bm.allocate(s)
    for s in seqs:
        bm.free_seq(s)
    assert bm.num_free == 16


def run_fake(sched: Scheduler, steps: int = 200) -> list[Sequence]:
    """Drive the scheduler with a fake runner that 'samples' token 7 for every sequence."""
    done = []
    for _ in range(steps):
        if not sched.has_work():
            break
        batch = sched.schedule()
        sampled = {it.seq.seq_id: 7 for it in batch.items if it.samples}
        sched.update(batch, sampled)
        for it in batch.items:
            s = it.seq
            if s.status is SeqStatus.RUNNING and s.num_output_tokens >= s.params.max_tokens:
                sched.finish(s, "length")
                done.append(s)
    return done


def test_scheduler_chunks_long_prefills_within_the_token_budget():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_batched_tokens=16)
    sched.add(seq(range(40)))
    batch = sched.schedule()
    assert batch.num_tokens == 16 and not batch.items[0].samples


def test_scheduler_gives_decode_tokens_before_new_prefills():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_batched_tokens=8)
    first = seq(range(4), max_tokens=10)
    sched.add(first)
    sched.update(sched.schedule(), {first.seq_id: 7})
    sched.add(seq(range(100, 130)))
    batch = sched.schedule()
    assert batch.items[0].seq is first and batch.items[0].num_tokens == 1
    assert batch.num_tokens == 8


def test_preemption_recomputes_and_every_request_finishes():
    bm = BlockManager(num_blocks=6, block_size=4)  # too small for all three at once
    sched = Scheduler(bm, max_num_seqs=8, max_batched_tokens=64, growth_cap=0)
    seqs = [seq(range(i * 10, i * 10 + 6), max_tokens=8) for i in range(3)]
    for s in seqs:
        sched.add(s)
    done = run_fake(sched)
    assert sorted(s.seq_id for s in done) == sorted(s.seq_id for s in seqs)
    assert all(s.output_token_ids == [7] * 8 for s in seqs)
    assert sched.num_preemptions > 0
    assert bm.num_free == 6


def test_stop_string_is_held_back_then_cut():
    sc = StopChecker(["###"])
    assert sc.feed("Hello #") == "Hello "
    assert sc.feed("#") == ""
    assert sc.feed("# more") == ""
    assert sc.stopped


def test_partial_stop_match_is_released_when_it_turns_out_not_to_be_one():
    sc = StopChecker(["</s>"])
    assert sc.feed("a </") == "a "
    assert sc.feed("b") == "</b"
    assert not sc.stopped


class ByteTokenizer:
    """Each token is one UTF-8 byte: multi-byte characters span several tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_detokenizer_never_emits_a_broken_character():
    ids = list("né✓".encode())
    d = IncrementalDetokenizer(ByteTokenizer())
    out = [d.step(ids[: i + 1]) for i in range(len(ids))]
    assert "".join(out) == "né✓"
    assert all("\ufffd" not in piece for piece in out)


def test_same_seed_same_sample_whatever_shares_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    p = SamplingParams(temperature=1.0, seed=42)
    a = Sequence("a", 0, [1], p)
    b = Sequence("b", 0, [1], SamplingParams(temperature=1.0))
    c = Sequence("c", 0, [1], p)
    first = sample(logits[[0, 1]].clone(), [a, b], (2,))[0].token_id
    second = sample(logits[[2, 0]].clone(), [b, c], (2,))[1].token_id  # same row, other neighbour, other place
    assert first == second


def test_greedy_penalties_and_min_tokens():
    logits = torch.zeros(1, 10)
    logits[0, 2] = 5.0  # EOS is the best token
    logits[0, 3] = 4.0
    s = Sequence("r", 0, [1], SamplingParams(temperature=0, min_tokens=1))
    assert sample(logits.clone(), [s], (2,))[0].token_id == 3  # EOS masked before min_tokens
    s2 = Sequence("r", 0, [1, 3], SamplingParams(temperature=0, repetition_penalty=2.0))
    s2.num_prompt_tokens = 1
    out = sample(logits.clone(), [s2], ())
    assert out[0].token_id == 2


def test_top_k_one_is_greedy():
    logits = torch.randn(1, 100)
    s = Sequence("r", 0, [1], SamplingParams(temperature=1.5, top_k=1))
    assert sample(logits.clone(), [s], ())[0].token_id == int(logits.argmax())


def test_admission_reserves_room_for_running_sequences_to_grow():
    bm = BlockManager(num_blocks=6, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_batched_tokens=64)
    seqs = [seq(range(i * 10, i * 10 + 6), max_tokens=8) for i in range(3)]
    for s in seqs:
        sched.add(s)
    done = run_fake(sched)
    assert len(done) == 3 and sched.num_preemptions == 0


def test_logit_bias_moves_the_greedy_choice():
    logits = torch.zeros(1, 10)
    logits[0, 3] = 1.0
    s = Sequence("r", 0, [1], SamplingParams(temperature=0, logit_bias={7: 5.0, 3: -100.0}))
    assert sample(logits.clone(), [s], ())[0].token_id == 7


def test_piled_up_deltas_merge_per_choice_in_order():
    from worker.async_engine import merge_outputs
    from worker.engine.engine import SeqOutput

    def out(index, text, tok, finished=False):
        return SeqOutput("r", index, text, [tok], finished, "stop" if finished else None, 3, tok, 0)

    merged = merge_outputs([out(0, "a", 1), out(0, "b", 2), out(1, "x", 1), out(0, "c", 3, True), out(0, "z", 9)])
    assert [(m.index, m.text, m.token_ids, m.finished) for m in merged] == [
        (0, "ab", [1, 2], False), (1, "x", [1], False), (0, "c", [3], True), (0, "z", [9], False)]
