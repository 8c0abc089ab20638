"""Per-request sampling over a batch of logits: penalties, temperature, top-k, top-p, seeds, logprobs.

Rows are independent: each has its own parameters, and a seeded row draws from its own
`torch.Generator`, so the same seed gives the same output whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from worker.engine.request import Sequence


@dataclass(slots=True)
class SampleResult:
    token_id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            ids = torch.tensor(sorted(set(seq.token_ids)), device=logits.device)
            vals = logits[i, ids]
            logits[i, ids] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
            out = torch.tensor(seq.output_token_ids, device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
            logits[i] -= counts * p.frequency_penalty + (counts > 0).to(logits.dtype) * p.presence_penalty


def _mask_eos(logits: torch.Tensor, seqs: list[Sequence], eos_ids: tuple[int, ...]) -> None:
    for i, seq in enumerate(seqs):
        if seq.num_output_tokens < seq.params.min_tokens and seq.constraint is None:  # a grammar says when  # ignore_eos keeps EOS samplable, as vLLM does
            for eos in (*eos_ids, *seq.params.stop_token_ids):
                if eos < logits.shape[1]:
                    logits[i, eos] = float("-inf")


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [N, V]; top_k [N] (V for off); top_p [N]. Masks the rest to -inf."""
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
    drop = ranks >= top_k.unsqueeze(1)
    probs = sorted_logits.softmax(dim=-1)
    cum = probs.cumsum(dim=-1)
    drop |= (cum - probs) > top_p.unsqueeze(1)  # keep the smallest set whose mass reaches top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, idx, sorted_logits)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """Queue a copy of t to (pinned) host memory; on a CPU, t itself."""
    if not t.is_cuda:
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


@dataclass(slots=True)
class PendingSample:
    """Sampled tokens still on the device. Their copies to the host are queued right behind the sampling,
    with an event after them: `results()` waits for that event, not for the device's whole queue, so it
    returns while a later step (queued since) still runs. `tokens` stays on the device as the next step's
    input (engine.py, running ahead)."""

    tokens: torch.Tensor
    seqs: list[Sequence]
    host_tokens: torch.Tensor
    host_logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # chosen [N], top values, top ids [N, k]
    want_logprobs: list[bool]
    ready: torch.cuda.Event | None

    def results(self) -> list[SampleResult]:
        if self.ready is not None:
            self.ready.synchronize()
        token_list = self.host_tokens.tolist()
        results = [SampleResult(t) for t in token_list]
        if self.host_logprobs is not None:
            chosen, top_vals, top_ids = (t.tolist() for t in self.host_logprobs)
            for i, seq in enumerate(self.seqs):
                if self.want_logprobs[i]:
                    k = seq.params.logprobs or 0
                    results[i].logprob = chosen[i]
                    results[i].top = list(zip(top_ids[i][:k], top_vals[i][:k]))
        return results


def _launched(tokens: torch.Tensor, seqs: list[Sequence], raw_logprobs: torch.Tensor | None,
              want_logprobs: list[bool]) -> PendingSample:
    host_logprobs = None
    if raw_logprobs is not None:  # the chosen token's logprob and the top k, computed on the device
        k = max((s.params.logprobs or 0) for s in seqs)
        chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        top_vals, top_ids = raw_logprobs.topk(k, dim=-1) if k else (raw_logprobs[:, :0], tokens[:, None][:, :0])
        host_logprobs = (to_host(chosen), to_host(top_vals), to_host(top_ids))
    host_tokens = to_host(tokens)
    ready = None
    if tokens.is_cuda:
        ready = torch.cuda.Event()
        ready.record()
    return PendingSample(tokens, seqs, host_tokens, host_logprobs, want_logprobs, ready)


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: tuple[int, ...], guide: Any = None) -> list[SampleResult]:
    return sample_launch(logits, seqs, eos_ids, guide).results()


def sample_launch(logits: torch.Tensor, seqs: list[Sequence], eos_ids: tuple[int, ...],
                  guide: Any = None) -> PendingSample:
    """logits: [N, V] float32, one row per sequence that samples this step. Queues the sampling work.
    `guide` (worker/engine/guided.py) masks the rows of constrained sequences."""
    want_logprobs = [s.params.logprobs is not None for s in seqs]
    raw_logprobs = logits.log_softmax(dim=-1) if any(want_logprobs) else None
    if any(s.params.penalized for s in seqs):
        _apply_penalties(logits, seqs)
    for i, seq in enumerate(seqs):
        if seq.params.logit_bias:
            ids = torch.tensor(list(seq.params.logit_bias), device=logits.device)
            logits[i, ids] += torch.tensor(list(seq.params.logit_bias.values()), device=logits.device)
    if guide is not None:
        guide.mask_batch(logits, seqs)
    _mask_eos(logits, seqs, eos_ids)

    vocab = logits.shape[1]
    tokens = logits.argmax(dim=-1)
    if not all(s.params.greedy for s in seqs):
        greedy = torch.tensor([s.params.greedy for s in seqs], device=logits.device)
        temps = torch.tensor([max(s.params.temperature, 1e-5) for s in seqs], device=logits.device)
        scaled = logits / temps.unsqueeze(1)
        top_k = torch.tensor([s.params.top_k if s.params.top_k > 0 else vocab for s in seqs], device=logits.device)
        top_p = torch.tensor([s.params.top_p for s in seqs], device=logits.device)
        if bool((top_k < vocab).any() or (top_p < 1.0).any()):
            scaled = _top_k_top_p(scaled, top_k, top_p)
        probs = scaled.softmax(dim=-1)
        # exponential race (Gumbel-max on probabilities): argmax(p / E), E ~ Exp(1) per row
        noise = torch.empty_like(probs)
        for i, seq in enumerate(seqs):
            if seq.generator is not None:
                noise[i] = torch.empty(vocab).exponential_(generator=seq.generator).to(noise.device)
            else:
                noise[i].exponential_()
        sampled = (probs / noise).argmax(dim=-1)
        tokens = torch.where(greedy, tokens, sampled)
    return _launched(tokens, seqs, raw_logprobs, want_logprobs)
