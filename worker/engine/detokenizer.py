"""Incremental detokenization that never emits a broken UTF-8 character.

Decoding token by token breaks multi-byte characters and SentencePiece's leading-space rules, so the
text of the last few tokens is decoded with some context before it (prefix_offset..read_offset) and the
new text is released only when it does not end in U+FFFD (an incomplete byte sequence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class IncrementalDetokenizer:
    tokenizer: Any
    prefix_offset: int = 0
    read_offset: int = 0
    skip_special: bool = True

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def step(self, output_ids: list[int]) -> str:
        """Return text newly completed by output_ids[read_offset:] (the generated tokens so far)."""
        prefix_text = self.decode(output_ids[self.prefix_offset : self.read_offset])
        full_text = self.decode(output_ids[self.prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            new_text = full_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(output_ids)
            return new_text
        return ""

    def flush(self, output_ids: list[int], cut: bool = False) -> str:
        """At the end of a sequence: whatever is left. `cut` (the sequence ended by length, possibly inside
        a multi-byte character): the text up to the last whole character, never a U+FFFD standing for the
        part of one."""
        prefix_text = self.decode(output_ids[self.prefix_offset : self.read_offset])
        full_text = self.decode(output_ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(output_ids)
        rest = full_text[len(prefix_text) :]
        return rest.rstrip("\ufffd") if cut else rest
