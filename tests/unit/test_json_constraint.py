"""The JSON-object automaton and the token masks built on it."""

from __future__ import annotations

import json

import pytest
import torch

from worker.engine.json_constraint import DONE, INITIAL, JsonConstraint, JsonGrammar, feed, vocab_bytes

VALID = [
    {},
    {"a": 1},
    {"a": [1, -2.5, 3e10, 0, -0.0, 1.5E-3], "b": {"c": None, "d": True, "e": False}, "f": ""},
    {"nested": [[[]], [{}], {"x": [1, {"y": "z"}]}]},
    {"text": "quote \" backslash \\ newline \n tab \t unicode é ☃ \u0001"},
]


@pytest.mark.parametrize("doc", VALID)
@pytest.mark.parametrize("indent", [None, 2])
def test_valid_objects_reach_the_final_state(doc, indent):
    for ascii_only in (True, False):
        text = json.dumps(doc, indent=indent, ensure_ascii=ascii_only)
        state = feed(INITIAL, text.encode())
        assert state is not None and state[0] == DONE, text


@pytest.mark.parametrize("text", [
    "[1]", '"x"', "1", ' {"a" 1}', '{"a":01}', '{"a":tru}', "{,}", '{"a":1,}', '{"a":[1,]}', '{"a":1}}',
    '{"a":"line\nbreak"}', '{"a":"\\x"}', '{"a":"\\u12g4"}', '{a:1}', '{"a":1} {', '{"a":.5}', '{"a":1.}',
    '{"a":[1}', '{"a":{]}',
])
def test_invalid_text_is_refused_at_the_first_bad_byte(text):
    state = feed(INITIAL, text.encode())
    assert state is None or state[0] != DONE
    # every proper prefix up to the failure is still accepted: the mask can steer away from the bad byte
    assert feed(INITIAL, text.encode()[:1]) is not None or text[0] != "{"


def test_whitespace_and_numbers_are_capped():
    assert feed(INITIAL, b"{" + b" " * 24) is not None
    assert feed(INITIAL, b"{" + b" " * 25) is None
    assert feed(INITIAL, b'{"a":' + b"1" * 24) is not None
    assert feed(INITIAL, b'{"a":' + b"1" * 25) is None


class PieceTokenizer:
    """SentencePiece-style vocabulary: '\u2581' is a space, <0x..> pieces are raw bytes."""

    def __init__(self):
        pieces = ["<s>", "</s>", "{", "}", '"', "a", ":", "1", "\u2581", "\u2581{", '":', '"}', "<0x0A>", "[", "]",
                  ",", "x}", "\u2581\u2581"]
        self.vocab = {p: i for i, p in enumerate(pieces)}
        self.all_special_ids = [0, 1]

    def get_vocab(self):
        return dict(self.vocab)


def test_vocab_bytes_maps_sentencepiece_pieces():
    tok = PieceTokenizer()
    pieces = vocab_bytes(tok)
    assert pieces[0] is None and pieces[1] is None  # special tokens are never allowed by the grammar
    assert pieces[tok.vocab["\u2581{"]] == b" {" and pieces[tok.vocab["<0x0A>"]] == b"\n"


def test_masks_follow_the_grammar_and_allow_eos_only_at_the_end():
    tok = PieceTokenizer()
    v = tok.vocab
    g = JsonGrammar(tok, eos_ids=(1,))
    c = JsonConstraint(g)

    def allowed(ids):
        m = c.mask(ids, len(v) + 2, torch.device("cpu"))  # wider than the vocabulary, as padded lm heads are
        assert not m[len(v):].any()
        return {p for p, i in v.items() if m[i]}

    assert allowed([]) == {"{", "\u2581", "\u2581{", "<0x0A>", "\u2581\u2581"}
    ids = [v["\u2581{"]]
    # '"}' and '":' open a key that starts with '}' or ':' (valid JSON, if odd)
    assert allowed(ids) == {"}", '"', "\u2581", "<0x0A>", "\u2581\u2581", '"}', '":'}
    ids += [v['"'], v["a"], v['":'], v["1"]]
    assert allowed(ids) == {"}", "1", ",", "\u2581", "<0x0A>", "\u2581\u2581"}
    ids += [v["}"]]
    assert allowed(ids) == {"</s>"}
    assert c.state is not None and c.state[0] == DONE
