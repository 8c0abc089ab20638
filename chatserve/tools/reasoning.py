"""Reasoning output: a reasoning model's `<think>…</think>` span, apart from its answer.

A worker whose chat template writes the markers (DeepSeek-R1 distills, Qwen3, QwQ), or that is told to
(`--reasoning-parser think`), names in its stream's start event where the generation begins: inside the span
("open": the template's generation prompt ended with `<think>`, as R1 distills' do) or outside it ("closed":
the model may open one as its first text; Qwen3 with `enable_thinking: false` gets an empty span in the
prompt and answers outside it). The parser splits the text in two: reasoning and content. A span cut by
max_tokens stays reasoning; a model that opens no span answers in content. Feeding never raises, and text
that might still be the start of a marker is held back until it is certain.
"""

from __future__ import annotations

from dataclasses import dataclass

OPEN, CLOSE = "<think>", "</think>"


@dataclass(slots=True)
class Split:
    reasoning: str = ""
    content: str = ""


def starts_open(prompt_text: str, open_tag: str = OPEN, close_tag: str = CLOSE) -> bool:
    """Whether a rendered prompt leaves the generation inside a reasoning span."""
    return prompt_text.rfind(open_tag) > prompt_text.rfind(close_tag)


def _held(text: str, tag: str) -> int:
    """How many trailing characters of text could begin `tag` (held back until the next delta)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningParser:
    """Incremental: `feed(delta)` -> the reasoning and content that are certain now; `finish()` -> the rest."""

    def __init__(self, open_now: bool, open_tag: str = OPEN, close_tag: str = CLOSE):
        self.open_tag, self.close_tag = open_tag, close_tag
        # where the text is: "lead" (before any answer: a span may open), "think", "answer"
        self.state = "think" if open_now else "lead"
        self.buffer = ""

    def feed(self, delta: str, final: bool = False) -> Split:
        """The parts that are certain after `delta`; with `final` (the reply's last delta), all the rest too."""
        out = self._feed(delta)
        if final:
            rest = self.finish()
            out = Split(out.reasoning + rest.reasoning, out.content + rest.content)
        return out

    def _feed(self, delta: str) -> Split:
        self.buffer += delta
        out = Split()
        while True:
            if self.state == "lead":
                lead = self.buffer.lstrip()
                if self.open_tag.startswith(lead):  # only whitespace or part of the tag so far
                    if lead == self.open_tag:
                        self.state, self.buffer = "think", ""
                        continue
                    return out
                if lead.startswith(self.open_tag):
                    self.state, self.buffer = "think", lead[len(self.open_tag):]
                    continue
                self.state = "answer"
            if self.state == "think":
                end = self.buffer.find(self.close_tag)
                if end >= 0:
                    out.reasoning += self.buffer[:end]
                    self.state, self.buffer = "answer", self.buffer[end + len(self.close_tag):].lstrip()
                    if not self.buffer:
                        self.state = "answer_lead"  # whitespace after the span is not part of the answer
                    continue
                keep = _held(self.buffer, self.close_tag)
                out.reasoning += self.buffer[: len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep:]
                return out
            if self.state == "answer_lead":
                self.buffer = self.buffer.lstrip()
                if not self.buffer:
                    return out
                self.state = "answer"
            out.content += self.buffer
            self.buffer = ""
            return out

    def finish(self) -> Split:
        rest, self.buffer = self.buffer, ""
        if self.state == "think":
            return Split(reasoning=rest)
        if self.state == "lead" and not rest.strip():
            return Split()
        return Split(content=rest)


def parse(text: str, open_now: bool, open_tag: str = OPEN, close_tag: str = CLOSE) -> Split:
    """The whole text split at once (non-streaming responses)."""
    return ReasoningParser(open_now, open_tag, close_tag).feed(text, final=True)


PARSERS = ("auto", "none", "think")


def template_reasons(source: str | None) -> bool:
    """A chat template that writes reasoning markers belongs to a reasoning model."""
    return bool(source) and CLOSE in source  # type: ignore[operator]
