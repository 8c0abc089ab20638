"""Constrained decoding with llguidance (chosen over xgrammar by benchmarks/grammar_engines.py: schema
compiles 6-50x faster, masks well under a decode step on both vocabularies, and it refuses schema keywords
it cannot enforce instead of dropping them).

One `Guide` per engine holds the vocabulary as llguidance sees it (built once, ~0.3 s at 49k tokens); each
constrained sequence has a `GrammarConstraint` (a matcher). A step's masks are computed together, in
parallel over the sequences (llguidance's executor, without the GIL), after the previous step's tokens are
read back and while the device still runs this step's forward pass; the bitmask then goes to the device
and masks the logits rows there. EOS is allowed exactly where the grammar accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from worker.engine.request import PLACEHOLDER


@dataclass(slots=True)
class GrammarConstraint:
    matcher: Any  # llguidance.LLMatcher
    consumed: int = 0  # output tokens fed to the matcher

    def advance(self, output_ids: list[int], eos_ids: tuple[int, ...]) -> None:
        for tid in output_ids[self.consumed:]:
            if tid == PLACEHOLDER:  # still on the device
                break
            self.consumed += 1
            if tid not in eos_ids:
                self.matcher.consume_token(tid)  # a refused token puts the matcher in its error state


class Guide:
    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: tuple[int, ...]):
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        self.width = max(vocab_size, len(tokenizer))
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, self.width)
        self.executor = llguidance.LLExecutor()
        self.eos_ids = eos_ids
        self.words = (self.width + 31) // 32
        self._bitmask = torch.zeros((0, self.words), dtype=torch.int32)
        self._shifts: dict[torch.device, torch.Tensor] = {}

    def constraint(self, grammar: str) -> GrammarConstraint:
        matcher = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"the grammar cannot be built: {matcher.get_error()}")
        return GrammarConstraint(matcher)

    def _eos_bits(self, row: torch.Tensor, only: bool) -> None:
        if only:
            row.zero_()
        for eos in self.eos_ids:
            if eos < self.width:
                bit = eos % 32
                row[eos // 32] |= (1 << bit) if bit < 31 else -(1 << 31)

    def fill(self, constraints: list[GrammarConstraint], outputs: list[list[int]]) -> torch.Tensor:
        """The bitmask [len(constraints), words] of the tokens each sequence may take next."""
        n = len(constraints)
        if self._bitmask.shape[0] < n:
            self._bitmask = torch.zeros((max(n, 2 * self._bitmask.shape[0]), self.words), dtype=torch.int32,
                                        pin_memory=torch.cuda.is_available())
        bm = self._bitmask[:n]
        for c, out in zip(constraints, outputs):
            c.advance(out, self.eos_ids)
        live = [(c.matcher, i) for i, c in enumerate(constraints) if not c.matcher.is_error()]
        if len(live) > 1:
            self.executor.unsafe_compute_mask_ptr(live, bm.data_ptr(), self.words * 4, n)
        elif live:
            live[0][0].unsafe_compute_mask_ptr(bm[live[0][1]].data_ptr(), self.words * 4)
        for i, c in enumerate(constraints):
            m = c.matcher
            if m.is_error() or m.is_stopped():
                self._eos_bits(bm[i], only=True)
            elif m.is_accepting():
                self._eos_bits(bm[i], only=False)
        return bm

    def apply(self, logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
        """Mask logits[rows] (on their device) to the tokens the bitmask allows."""
        device = logits.device
        shifts = self._shifts.get(device)
        if shifts is None:
            shifts = self._shifts[device] = torch.arange(32, dtype=torch.int32, device=device)
        bm = bitmask.to(device, non_blocking=True)
        allowed = ((bm.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)
        vocab = logits.shape[1]
        if allowed.shape[1] < vocab:
            allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
        index = torch.tensor(rows, device=device)
        logits[index] = logits[index].masked_fill(~allowed[:, :vocab], float("-inf"))

    def mask_batch(self, logits: torch.Tensor, seqs: list[Any]) -> None:
        """Apply every constrained sequence's mask to its row of logits."""
        rows = [i for i, s in enumerate(seqs) if s.constraint is not None]
        if not rows:
            return
        bitmask = self.fill([seqs[i].constraint for i in rows], [seqs[i].output_token_ids for i in rows])
        self.apply(logits, rows, bitmask)
