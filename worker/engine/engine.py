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
from worker.engine.json_constraint import JsonConstraint, JsonGrammar
from worker.engine.kv_cache import BlockManager
from worker.engine.model_runner import ModelRunner
from worker.engine.request import Sequence
from worker.engine.sampler import SampleResult, sample_launch
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


@dataclass(slots=True)
class _Tracked:
    seq: Sequence
    detok: IncrementalDetokenizer
    stop: StopChecker
    sent_tokens: int = 0


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
        self.pending: list[tuple[Sequence, SampleResult, str | None]] = []
        self._json_grammar: JsonGrammar | None = None
        # pipelined output processing (below) pays only where the device runs asynchronously: on a CPU
        # the forward pass blocks, so a step's tokens go out at once instead of a step later
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
            if params.response_format == "json_object":
                seq.constraint = JsonConstraint(self.json_grammar())
            self.tracked[seq.seq_id] = _Tracked(seq, IncrementalDetokenizer(self.tokenizer), StopChecker(params.stop))
            self.scheduler.add(seq)
            seqs.append(seq)
        self.by_request[request_id] = seqs

    def json_grammar(self) -> JsonGrammar:
        if self._json_grammar is None:  # built on first use (~0.5 s for a 50k vocabulary), then shared
            self._json_grammar = JsonGrammar(self.tokenizer, self.eos_ids)
        return self._json_grammar

    def abort(self, request_id: str) -> None:
        """Drop a request at once and free its blocks (a client disconnected)."""
        for seq in self.by_request.pop(request_id, []):
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
            self.tracked.pop(seq.seq_id, None)
        self.pending = [item for item in self.pending if item[0].request_id != request_id]

    def embed(self, inputs: list[list[int]]) -> list[torch.Tensor]:
        """Mean-pooled, normalised hidden states of whole inputs (no KV cache; runs between steps)."""
        return self.runner.embed(inputs)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self.pending)

    # --- stepping -----------------------------------------------------------------------------------
    #
    # Output processing is pipelined: a step queues its forward pass and sampling on the device, then
    # detokenizes and checks stop strings for the *previous* step's tokens while the device works, then
    # waits for its own tokens. Cheap stop conditions (EOS, stop token ids, max_tokens, context) are
    # applied at once, so no extra token is computed for them; a stop string found one step later drops
    # the token computed meanwhile (its blocks are freed before anything can reuse them). Without
    # `overlap` (CPU) the step ends by processing its own tokens.

    @torch.inference_mode()
    def step(self) -> list[SeqOutput]:
        batch = self.scheduler.schedule()
        if not batch.items:
            return self._drain_pending()
        self.last_step_decode_only = batch.is_decode_only
        logits, seqs = self.runner.execute(batch)
        queued = sample_launch(logits, seqs, self.eos_ids) if seqs else None
        outputs = self._drain_pending()  # overlaps with the device work just queued
        results = queued.results() if queued is not None else []
        live = [(s, r) for s, r in zip(seqs, results) if not s.is_finished]
        self.scheduler.update(batch, {s.seq_id: r.token_id for s, r in live})
        self.throughput.add(len(live))
        self.pending = [(s, r, self._finish_early(s, r.token_id)) for s, r in live]
        if not self.overlap:
            outputs += self._drain_pending()
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

    def _drain_pending(self) -> list[SeqOutput]:
        items, self.pending = self.pending, []
        return [self._advance(seq, res, reason) for seq, res, reason in items if seq.seq_id in self.tracked]

    def _advance(self, seq: Sequence, res: SampleResult, reason: str | None) -> SeqOutput:
        tr = self.tracked[seq.seq_id]
        text = tr.detok.step(seq.output_token_ids)
        if reason is not None:
            text += tr.detok.flush(seq.output_token_ids)
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
        if reason is not None:
            self.tracked.pop(seq.seq_id, None)
            group = self.by_request.get(seq.request_id, [])
            if all(s.is_finished for s in group):
                self.by_request.pop(seq.request_id, None)
        return SeqOutput(seq.request_id, seq.index, text, new_tokens, reason is not None, reason,
                         seq.num_prompt_tokens, seq.num_output_tokens, seq.num_cached_tokens, logprobs)

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
