"""The reasoning split on recorded outputs of reasoning models: whole and streamed in every split, the
prompt telling where a reply starts (DeepSeek-R1 distills open the span in the generation prompt; Qwen3
with enable_thinking false closes an empty one), a span cut by max_tokens, a model that opens none."""

from __future__ import annotations

import random

import pytest

from chatserve.tools.reasoning import ReasoningParser, Split, parse, starts_open, template_reasons

# recorded: DeepSeek-R1-Distill-Llama-8B, greedy, "What is 2 + 2?" (its template ends the prompt with "<think>\n")
R1 = ("Okay, so I need to figure out what 2 plus 2 is. Let me count: two apples and two more make four.\n"
      "</think>\n\n2 + 2 equals **4**.")
# recorded: Qwen3-8B with thinking on (the model opens the span itself)
QWEN3 = "<think>\nThe user greets me. I should greet back.\n</think>\n\nHello! How can I help you today?"
# recorded: Qwen3-8B with enable_thinking false (the template wrote an empty span into the prompt)
QWEN3_OFF = "Hello! How can I help you today?"
# recorded: R1 distill cut by max_tokens=24 inside its span
R1_CUT = "Okay, the user asks about the <b>capital</b> of France. I recall that it is Pa"

R1_PROMPT = "<｜begin▁of▁sentence｜><｜User｜>What is 2 + 2?<｜Assistant｜><think>\n"
QWEN3_OFF_PROMPT = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_PROMPT = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"

CASES = [
    (R1, R1_PROMPT, Split("Okay, so I need to figure out what 2 plus 2 is. Let me count: two apples and two more "
                          "make four.\n", "2 + 2 equals **4**.")),
    (QWEN3, QWEN3_PROMPT, Split("\nThe user greets me. I should greet back.\n", "Hello! How can I help you today?")),
    (QWEN3_OFF, QWEN3_OFF_PROMPT, Split("", QWEN3_OFF)),
    (R1_CUT, R1_PROMPT, Split(R1_CUT, "")),
    ("  <b>not a span</b> but an answer", QWEN3_PROMPT, Split("", "  <b>not a span</b> but an answer")),
]


@pytest.mark.parametrize("text, prompt, want", CASES, ids=["r1", "qwen3", "qwen3-off", "r1-cut", "no-span"])
def test_recorded_outputs_split_into_reasoning_and_content(text, prompt, want):
    assert parse(text, starts_open(prompt)) == want


@pytest.mark.parametrize("text, prompt, want", CASES, ids=["r1", "qwen3", "qwen3-off", "r1-cut", "no-span"])
def test_streaming_in_any_split_gives_the_same_parts(text, prompt, want):
    rng = random.Random(len(text))
    for trial in range(40):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 12))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        parser = ReasoningParser(starts_open(prompt))
        got = Split()
        for piece in pieces:
            part = parser.feed(piece)
            got.reasoning += part.reasoning
            got.content += part.content
            assert "</think>" not in part.reasoning + part.content and "<think>" not in part.reasoning
        rest = parser.finish()
        assert Split(got.reasoning + rest.reasoning, got.content + rest.content) == want, pieces


def test_one_character_at_a_time_holds_back_only_a_possible_marker():
    parser = ReasoningParser(True)
    seen = []
    for ch in "abc</thi":
        seen.append(parser.feed(ch).reasoning)
    assert "".join(seen) == "abc"  # "</thi" might still close the span
    assert parser.feed("nk>done").content == "done"


def test_templates_with_markers_mark_a_reasoning_model():
    assert template_reasons("{% if '</think>' in content %}{% endif %}")
    assert not template_reasons("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}")
    assert not template_reasons(None)
