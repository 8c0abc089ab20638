"""The engine: `add_request`, `abort`, `step`. One step = schedule -> run -> sample -> update -> outputs.

Not thread-safe by design: one thread owns it (see worker/async_engine.py). Each step returns, for every
sequence that advanced, a `SeqOutput` with the *delta* text and tokens since the last step.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from chatserve.protocol.sampling import SamplingParams
from worker.engine.detokenizer import IncrementalDetokenizer
from worker.engine.guided import Guide
from worker.engine.kv_cache import BlockManager
from worker.engine.model_runner import ModelRunner, PromptScores
from worker.engine.request import PLACEHOLDER, Sequence
from worker.engine.sampler import PendingSample, SampleResult, to_host, sample_launch
from worker.engine.scheduler import Scheduler
from worker.engine.stopping import StopChecker

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SeqOutput:
    request_id: str
    index: int
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None
    # with the first output of a request that asked for them: every prompt token's
    prompt_logprobs: PromptLogprobs | None = None


@dataclass(slots=True)
class PromptLogprobs:
    """Every prompt token's logprob, rank and top alternatives, kept as columns: a step's scores are added
    by slicing its read-back lists (no Python work per token on the engine's thread). Indexing gives
    (id, logprob, rank, [(top id, logprob), ...]); the first token's logprob and rank are None."""

    token_ids: list[int]
    logprobs: list[float | None]
    ranks: list[int | None]
    top_ids: list[list[int]]
    top_vals: list[list[float]]

    @classmethod
    def starting(cls, first_token: int) -> PromptLogprobs:
        return cls([first_token], [None], [None], [[]], [[]])

    def __len__(self) -> int:
        return len(self.token_ids)

    def _entry(self, i: int) -> tuple[int, float | None, int | None, list[tuple[int, float]]]:
        return self.token_ids[i], self.logprobs[i], self.ranks[i], list(zip(self.top_ids[i], self.top_vals[i]))

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._entry(j) for j in range(*i.indices(len(self)))]
        return self._entry(i)

    def __iter__(self) -> Any:
        return (self._entry(i) for i in range(len(self)))


@dataclass(slots=True)
class _Tracked:
    seq: Sequence
    detok: IncrementalDetokenizer
    stop: StopChecker
    sent_tokens: int = 0
    prompt_lp: PromptLogprobs | None = None  # scored prompt tokens so far (params.prompt_logprobs), until sent


@dataclass(slots=True)
class _EmbedJob:
    key: Any  # whoever waits for it
    inputs: list[list[int]]
    vectors: list[Any]
    done: int = 0  # inputs embedded so far, in order


def _scores_to_host(sc: PromptScores) -> tuple[PromptScores, Any]:
    """Queue a step's prompt logprobs' copies to the host behind it, with an event to wait for."""
    host = PromptScores(sc.items, *(to_host(t) for t in (sc.chosen, sc.rank, sc.top_vals, sc.top_ids)))
    ready = None
    if sc.chosen.is_cuda:
        ready = torch.cuda.Event()
        ready.record()
    return host, ready


@dataclass
class ThroughputMeter:
    """Generated tokens over the last `window` seconds (reported to the controller)."""

    window: float = 10.0
    recent: deque[tuple[float, int]] = field(default_factory=deque)  # (time, tokens), oldest first

    def add(self, tokens: int) -> None:
        now = time.monotonic()
        self.recent.append((now, tokens))
        while self.recent and now - self.recent[0][0] > self.window:
            self.recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        return sum(n for t, n in self.recent if now - t <= self.window) / self.window


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer: Any, max_num_seqs: int = 256,
                 max_batched_tokens: int = 2048, enable_prefix_caching: bool = True):
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_model_len = runner.max_model_len
        self.blocks = BlockManager(runner.num_blocks, runner.block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=max_num_seqs,
                                   max_batched_tokens=max(max_batched_tokens, max_num_seqs))
        self.eos_ids = tuple(runner.cfg.eos_token_ids)
        self.tracked: dict[int, _Tracked] = {}
        self.by_request: dict[str, list[Sequence]] = {}
        self.throughput = ThroughputMeter()
        self.last_step_decode_only = False
        self.inflight: PendingSample | None = None  # the step whose tokens are not read back yet
        self._guide: Guide | None = None
        self.embed_jobs: deque[_EmbedJob] = deque()
        self.scores_queued: deque[tuple[PromptScores, Any]] = deque()  # prompt logprobs on their way to the host
        # running ahead (below) pays only where the device runs asynchronously: on a CPU the forward pass
        # blocks, so a step's tokens are read back at its end
        self.overlap = runner.device.type == "cuda"

    # --- requests -----------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, n: int = 1) -> None:
        if request_id in self.by_request:
            raise ValueError(f"duplicate request id {request_id}")
        if not prompt_token_ids:
            raise ValueError("empty prompt")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_token_ids)} tokens does not fit the context of "
                             f"{self.max_model_len} tokens")
        if len(prompt_token_ids) + 1 > self.blocks.num_blocks * self.blocks.block_size:
            raise ValueError("prompt is larger than the whole KV cache")
        seqs = []
        for i in range(n):
            seq = Sequence(request_id, i, list(prompt_token_ids), params)
            if params.grammar is not None:
                seq.constraint = self.guide().constraint(params.grammar)
            tr = _Tracked(seq, IncrementalDetokenizer(self.tokenizer), StopChecker(params.stop))
            if params.prompt_logprobs is not None:
                tr.prompt_lp = PromptLogprobs.starting(seq.token_ids[0])
            self.tracked[seq.seq_id] = tr
            self.scheduler.add(seq)
            seqs.append(seq)
        self.by_request[request_id] = seqs

    def guide(self) -> Guide:
        """Constrained decoding's view of the vocabulary: built once (~0.3 s at 49k tokens; the worker's
        warm-up builds it before serving), shared by every constrained sequence."""
        if self._guide is None:
            self._guide = Guide(self.tokenizer, self.runner.cfg.vocab_size, self.eos_ids)
        return self._guide

    def abort(self, request_id: str) -> None:
        """Drop a request at once and free its blocks (a client disconnected)."""
        for seq in self.by_request.pop(request_id, []):
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
            self.tracked.pop(seq.seq_id, None)  # a token of it still in flight is dropped when read back
        if self.inflight is not None and all(s.is_finished for s in self.inflight.seqs):
            self.inflight = None  # nothing left to read back

    def embed(self, inputs: list[list[int]]) -> list[torch.Tensor]:
        """Mean-pooled, normalised hidden states of whole inputs (no KV cache), all at once."""
        return self.runner.embed(inputs)

    def add_embedding(self, key: Any, inputs: list[list[int]]) -> None:
        """Queue an embedding request; `embed_step` runs it a chunk at a time between decode steps."""
        self.embed_jobs.append(_EmbedJob(key, inputs, [None] * len(inputs)))

    def embed_step(self) -> tuple[Any, list[torch.Tensor]] | None:
        """Embed the next chunk of the oldest embedding request: inputs in order up to one step's token
        budget (at least one), so a 2,048-input request never holds the streams for longer than a step.
        Returns (key, vectors) when that request is complete."""
        job = self.embed_jobs[0]
        budget = self.scheduler.max_batched_tokens
        end, tokens = job.done, 0
        while end < len(job.inputs) and (end == job.done or tokens + len(job.inputs[end]) <= budget):
            tokens += len(job.inputs[end])
            end += 1
        try:
            job.vectors[job.done:end] = self.runner.embed(job.inputs[job.done:end], max_batch_tokens=max(budget, tokens))
        except Exception:
            self.embed_jobs.popleft()
            raise
        job.done = end
        if job.done < len(job.inputs):
            return None
        self.embed_jobs.popleft()
        return job.key, job.vectors

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self.inflight is not None or bool(self.embed_jobs)

    # --- stepping -----------------------------------------------------------------------------------
    #
    # Running ahead: a step is queued on the device *before* the previous step's tokens are read back. A
    # sampled token stays on the device (PLACEHOLDER in token_ids, the sequence's `pending_row`), the next
    # step takes it from there as its input, and the host reads it back, checks stop conditions and
    # detokenizes while the device already computes the next token: the device never waits for the host
    # between steps. A sequence found finished then (EOS, a stop string) has had one more token computed,
    # which is dropped; its blocks are freed at once (later steps are queued after that one). One that ends
    # by length whatever its token is (`final_pending`) gets no step. Where sampling reads a sequence's
    # tokens on the host (penalties) or the runner cannot take tokens from the device (tensor parallelism),
    # the previous step is read back first. A constrained sequence (a grammar) needs its last token for its
    # mask, but not before sampling: its step is queued first, the previous step is read back while the
    # device runs it, and the masks are computed then (guided.py), so constrained requests cost their
    # neighbours no running ahead. Without `overlap` (CPU) every step is read back at its end.

    @torch.inference_mode()
    def step(self) -> list[SeqOutput]:
        outputs = self._read_back() if self.inflight is not None and not self._may_run_ahead() else []
        batch = self.scheduler.schedule()
        if not batch.items:
            return outputs + self._read_back()
        self.last_step_decode_only = batch.is_decode_only
        prev = self.inflight.tokens if self.inflight is not None else None
        logits, seqs = self.runner.execute(batch, prev)
        scores, self.runner.last_scores = self.runner.last_scores, None
        guided = any(s.constraint is not None for s in seqs)
        if guided:  # the masks need the previous step's tokens: read back while the device runs this step
            outputs += self._read_back()
        queued = sample_launch(logits, seqs, self.eos_ids, self._guide if guided else None) if seqs else None
        if not guided:
            outputs += self._read_back()  # the previous step's tokens, while the device runs this one
        self.scheduler.update(batch, {s.seq_id: PLACEHOLDER for s in seqs if not s.is_finished})
        live = 0
        for row, seq in enumerate(seqs):
            if seq.is_finished:  # ended by the step read back just now: this row's token is dropped
                continue
            live += 1
            seq.pending_row = row
            seq.final_pending = seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len
        self.throughput.add(live)
        if scores is not None:  # read back with this step's tokens (after the step above): no wait now
            self.scores_queued.append(_scores_to_host(scores))
        self.inflight = queued
        if not self.overlap:
            outputs += self._read_back()
        return outputs

    def _keep_scores(self) -> None:
        """Put the prompt logprobs of the steps read back so far in place (their copies were queued behind
        their steps), keeping the positions not kept yet (a preempted sequence recomputes its prompt)."""
        while self.scores_queued:
            sc, ready = self.scores_queued.popleft()
            if ready is not None:
                ready.synchronize()
            chosen, rank, vals, ids = (t.tolist() for t in (sc.chosen, sc.rank, sc.top_vals, sc.top_ids))
            widest = sc.top_ids.shape[1]
            for seq, first, offset, count in sc.items:
                tr = self.tracked.get(seq.seq_id)
                if tr is None or tr.prompt_lp is None:
                    continue
                kept, k = tr.prompt_lp, seq.params.prompt_logprobs or 0
                skip = max(0, len(kept) - first - 1)
                a, b = offset + skip, offset + count
                kept.token_ids.extend(seq.token_ids[first + 1 + skip : first + 1 + count])
                kept.logprobs.extend(chosen[a:b])
                kept.ranks.extend(rank[a:b])
                kept.top_ids.extend(ids[a:b] if k == widest else [r[:k] for r in ids[a:b]])
                kept.top_vals.extend(vals[a:b] if k == widest else [r[:k] for r in vals[a:b]])

    def _may_run_ahead(self) -> bool:
        return self.overlap and self.runner.device_tokens and not any(s.reads_tokens for s in self.scheduler.running)

    def _read_back(self) -> list[SeqOutput]:
        """Wait for the step in flight; put its tokens in place, apply stop conditions, detokenize."""
        self._keep_scores()  # a step's prompt logprobs before its tokens: a first output carries them
        inflight, self.inflight = self.inflight, None
        if inflight is None:
            return []
        outputs = []
        for row, (seq, res) in enumerate(zip(inflight.seqs, inflight.results())):
            if seq.pending_row != row:  # finished before this token was appended
                continue
            seq.pending_row = -1
            seq.token_ids[-1] = res.token_id
            if seq.is_finished or seq.seq_id not in self.tracked:  # aborted meanwhile
                continue
            outputs.append(self._advance(seq, res, self._finish_early(seq, res.token_id)))
        return outputs

    def _finish_early(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        reason = None
        if not p.ignore_eos and seq.num_output_tokens >= p.min_tokens and (
                token in self.eos_ids or token in p.stop_token_ids):
            reason = "stop"
        elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)
        return reason

    def _advance(self, seq: Sequence, res: SampleResult, reason: str | None) -> SeqOutput:
        tr = self.tracked[seq.seq_id]
        text = tr.detok.step(seq.output_token_ids)
        if reason is not None:
            text += tr.detok.flush(seq.output_token_ids, cut=reason == "length")
        text = tr.stop.feed(text)
        if tr.stop.stopped:
            reason = "stop"
            if not seq.is_finished:
                self.scheduler.finish(seq, reason)
        elif reason is not None:
            text += tr.stop.flush()
        new_tokens = seq.output_token_ids[tr.sent_tokens :]
        tr.sent_tokens = seq.num_output_tokens
        logprobs = None
        if res.logprob is not None:
            logprobs = [(res.token_id, res.logprob, res.top or [])]
        prompt_lp, tr.prompt_lp = tr.prompt_lp, None
        if reason is not None:
            self.tracked.pop(seq.seq_id, None)
            group = self.by_request.get(seq.request_id, [])
            if all(s.is_finished for s in group):
                self.by_request.pop(seq.request_id, None)
        return SeqOutput(seq.request_id, seq.index, text, new_tokens, reason is not None, reason,
                         seq.num_prompt_tokens, seq.num_output_tokens, seq.num_cached_tokens, logprobs, prompt_lp)

    # --- load report --------------------------------------------------------------------------------

    def load(self) -> dict[str, float | int]:
        q, h = self.blocks.query_tokens, self.blocks.hit_tokens
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "queue_length": len(self.scheduler.running) + len(self.scheduler.waiting),
            "kv_cache_usage": self.blocks.usage(),
            "kv_capacity_tokens": self.runner.capacity_tokens,
            "tokens_per_second": self.throughput.tokens_per_second(),
            "prefix_cache_hit_rate": (h / q) if q else 0.0,
        }
