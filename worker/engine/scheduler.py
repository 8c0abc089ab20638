"""Continuous-batching scheduler: `schedule()` picks what runs this step, `update()` advances requests.

Each step has a token budget. Running sequences in decode get one token each first (steady inter-token
latency for streaming users); the rest of the budget goes to prefill, chunked, of running then waiting
sequences (FCFS). When blocks run out, the newest running sequence is preempted: its blocks are freed and
it goes back to the head of the queue, to be recomputed later (prompt + what it generated so far), so no
request is ever dropped. Prefix-cached blocks make the recompute cheap.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from worker.engine.kv_cache import BlockManager
from worker.engine.request import SeqStatus, Sequence

GROWTH_CAP = 256  # tokens of future growth reserved per running sequence at admission


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed this step, starting at seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last token (so a new token is sampled)."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass(slots=True)
class Batch:
    items: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_decode_only(self) -> bool:
        return all(it.num_tokens == 1 and it.samples for it in self.items)

    @property
    def num_tokens(self) -> int:
        return sum(it.num_tokens for it in self.items)


@dataclass
class Scheduler:
    blocks: BlockManager
    max_num_seqs: int = 256
    max_batched_tokens: int = 2048
    waiting: deque[Sequence] = field(default_factory=deque)
    running: list[Sequence] = field(default_factory=list)
    num_preemptions: int = 0
    growth_cap: int = GROWTH_CAP  # 0: admit on prompt blocks alone (vLLM's behaviour; more preemption)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence, batch: Batch) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)
        self.num_preemptions += 1

    def schedule(self) -> Batch:
        batch = Batch()
        budget = self.max_batched_tokens
        # 1. decode: one token per running sequence that has computed all but its last token
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING or seq.num_uncomputed != 1 or seq.final_pending:
                continue
            while not self.blocks.can_append(seq) and self.running:
                victim = self.running[-1]
                self._preempt(victim, batch)
                batch.items = [it for it in batch.items if it.seq is not victim]
                budget = self.max_batched_tokens - batch.num_tokens
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                continue
            self.blocks.append_slots(seq)
            batch.items.append(ScheduledSeq(seq, 1))
            budget -= 1
        # 2. prefill chunks of running sequences still in prefill
        for seq in self.running:
            if budget <= 0:
                break
            if seq.num_uncomputed > 1:
                n = min(seq.num_uncomputed, budget)
                batch.items.append(ScheduledSeq(seq, n))
                budget -= n
        # 3. admit waiting sequences while blocks and budget last, keeping room for the running sequences'
        #    next tokens (up to GROWTH_CAP each): admitting into that room would only cause preemptions,
        #    whose recompute costs more than the admission gains.
        reserve = sum(self._growth_blocks(s) for s in self.running)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.pending_row >= 0:  # preempted while its last token is on the device: wait for it (FCFS)
                break
            growth = self._growth_blocks(seq)
            if not self.blocks.can_allocate(seq, reserve=reserve + growth if self.running else 0):
                break
            reserve += growth
            self.waiting.popleft()
            self.blocks.allocate(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            batch.items.append(ScheduledSeq(seq, n))
            budget -= n
        return batch

    def _growth_blocks(self, seq: Sequence) -> int:
        """Blocks seq still needs for its next tokens (capped), beyond those it holds."""
        to_come = min(seq.params.max_tokens - seq.num_output_tokens, self.growth_cap)
        held = max(len(seq.block_table), self.blocks.blocks_needed(seq.num_tokens))
        return max(0, self.blocks.blocks_needed(seq.num_tokens + to_come) - held)

    def update(self, batch: Batch, sampled: dict[int, int]) -> None:
        """Advance computed counts and append sampled tokens (seq_id -> token id)."""
        for it in batch.items:
            seq = it.seq
            if seq.status is not SeqStatus.RUNNING:
                continue
            seq.num_computed_tokens += it.num_tokens
            token = sampled.get(seq.seq_id)
            if token is not None:
                seq.token_ids.append(token)
            self.blocks.commit_full_blocks(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self.blocks.free_seq(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
