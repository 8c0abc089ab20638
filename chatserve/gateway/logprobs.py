"""Logprobs in the shapes clients read: the legacy completions shape (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`: what lm-evaluation-harness scores with) and vLLM's `prompt_logprobs`."""

from __future__ import annotations

from collections.abc import Sequence

from chatserve.protocol.completions import CompletionLogprobs, PromptLogprobs
from chatserve.protocol.internal import TokenLogprobInfo


def end_offset(lp: CompletionLogprobs | None, start: int = 0) -> int:
    """The text offset after the last entry (`start` where there is none)."""
    return lp.text_offset[-1] + len(lp.tokens[-1]) if lp is not None and lp.tokens else start


def legacy(items: Sequence[TokenLogprobInfo], out: CompletionLogprobs | None = None,
           start: int = 0) -> CompletionLogprobs:
    """Entries appended to `out` (a prompt's, then its completion's), text offsets counting on from its
    last (from `start` when it has none). A prompt's first token has no logprob (null) and no
    alternatives; with `logprobs: 0` the alternatives are the chosen token alone."""
    out = out if out is not None else CompletionLogprobs()
    offset = end_offset(out, start)
    for lp in items:
        out.tokens.append(lp.token)
        out.token_logprobs.append(lp.logprob)
        if lp.logprob is None:
            out.top_logprobs.append(None)
        else:
            top = dict(lp.top)
            out.top_logprobs.append(top or {lp.token: lp.logprob})
        out.text_offset.append(offset)
        offset += len(lp.token)
    return out


def vllm_prompt(items: Sequence[TokenLogprobInfo], k: int) -> PromptLogprobs:
    """Per prompt token: None for the first, else {token id: {logprob, rank, decoded_token}} for the token
    itself and its top k alternatives."""
    out: PromptLogprobs = []
    for lp in items:
        if lp.logprob is None:
            out.append(None)
            continue
        entry = {str(lp.token_id): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.token}}
        for rank, ((text, value), tid) in enumerate(zip(lp.top[:k], lp.top_ids or []), start=1):
            entry.setdefault(str(tid), {"logprob": value, "rank": rank, "decoded_token": text})
        out.append(entry)
    return out
