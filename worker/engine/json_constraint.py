"""Constrained decoding for `response_format: {"type": "json_object"}`: output that parses as a JSON object.

A byte-level JSON recognizer (a pushdown automaton whose state is a small immutable tuple) walks a trie
of the vocabulary's byte strings: a token is allowed when every byte of it is a valid continuation. The
allowed set depends only on the automaton's state, so masks are cached per state (inside a string, the
state repeats token after token). EOS is allowed only once the top-level object is closed, and then
nothing else is. Runs of whitespace and the length of numbers are capped, so a weak model cannot loop on
padding forever.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

# automaton modes
START, VALUE, OBJ_FIRST, OBJ_KEY, COLON, AFTER, ARR_FIRST, STR, STR_ESC, STR_U, NUM, LIT, DONE = range(13)
MAX_WS = 24  # consecutive whitespace bytes
MAX_NUM = 24  # bytes of one number
MAX_DEPTH = 32  # nesting of objects and arrays

State = tuple[int, str, Any, int]  # (mode, open containers 'o'/'a', mode detail, counter)
INITIAL: State = (START, "", None, 0)

_WS = frozenset(b" \t\n\r")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')
_DIGITS = frozenset(b"0123456789")
_NUM_NEXT = {  # number sub-state -> {byte class -> next sub-state}
    "sign": {"0": "zero", "d": "int"},
    "zero": {".": "dot", "e": "e"},
    "int": {"0": "int", "d": "int", ".": "dot", "e": "e"},
    "dot": {"0": "frac", "d": "frac"},
    "frac": {"0": "frac", "d": "frac", "e": "e"},
    "e": {"+": "esign", "0": "exp", "d": "exp"},
    "esign": {"0": "exp", "d": "exp"},
    "exp": {"0": "exp", "d": "exp"},
}
_NUM_END = frozenset({"zero", "int", "frac", "exp"})
_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}


def _num_class(b: int) -> str:
    if b == 0x30:
        return "0"
    if b in _DIGITS:
        return "d"
    if b in (0x2E,):
        return "."
    if b in (0x65, 0x45):
        return "e"
    if b in (0x2B, 0x2D):
        return "+"
    return ""


def _closed(stack: str) -> State:
    """State after a complete value with `stack` containers still open."""
    return (AFTER, stack, None, 0) if stack else (DONE, "", None, 0)


def _value_start(stack: str, b: int) -> State | None:
    if b == 0x7B:  # {
        return (OBJ_FIRST, stack + "o", None, 0) if len(stack) < MAX_DEPTH else None
    if b == 0x5B:  # [
        return (ARR_FIRST, stack + "a", None, 0) if len(stack) < MAX_DEPTH else None
    if b == 0x22:
        return (STR, stack, "v", 0)
    if b == 0x2D:
        return (NUM, stack, "sign", 1)
    if b == 0x30:
        return (NUM, stack, "zero", 1)
    if b in _DIGITS:
        return (NUM, stack, "int", 1)
    if b in _LITERALS:
        return (LIT, stack, _LITERALS[b], 0)
    return None


def step(st: State, b: int) -> State | None:
    """The state after byte `b`, or None when `b` cannot continue a JSON object."""
    mode, stack, aux, count = st
    if mode == STR:
        if b == 0x22:
            return (COLON, stack, None, 0) if aux == "k" else _closed(stack)
        if b == 0x5C:
            return (STR_ESC, stack, aux, 0)
        return None if b < 0x20 else st
    if mode == STR_ESC:
        if b in _ESCAPES:
            return (STR, stack, aux, 0)
        return (STR_U, stack, (aux, 4), 0) if b == 0x75 else None
    if mode == STR_U:
        if b not in _HEX:
            return None
        kind, left = aux
        return (STR, stack, kind, 0) if left == 1 else (STR_U, stack, (kind, left - 1), 0)
    if mode == NUM:
        nxt = _NUM_NEXT[aux].get(_num_class(b))
        if nxt is not None:
            return (NUM, stack, nxt, count + 1) if count < MAX_NUM else None
        return step(_closed(stack), b) if aux in _NUM_END else None
    if mode == LIT:
        if b != aux[0]:
            return None
        return (LIT, stack, aux[1:], 0) if len(aux) > 1 else _closed(stack)
    if b in _WS:
        return (mode, stack, aux, count + 1) if mode != DONE and count < MAX_WS else None
    if mode == START:
        return (OBJ_FIRST, "o", None, 0) if b == 0x7B else None
    if mode == VALUE:
        return _value_start(stack, b)
    if mode == ARR_FIRST:
        return _closed(stack[:-1]) if b == 0x5D else _value_start(stack, b)
    if mode == OBJ_FIRST:
        if b == 0x7D:
            return _closed(stack[:-1])
        return (STR, stack, "k", 0) if b == 0x22 else None
    if mode == OBJ_KEY:
        return (STR, stack, "k", 0) if b == 0x22 else None
    if mode == COLON:
        return (VALUE, stack, None, 0) if b == 0x3A else None
    if mode == AFTER:
        top = stack[-1]
        if b == 0x2C:
            return (OBJ_KEY if top == "o" else VALUE, stack, None, 0)
        if (b == 0x7D and top == "o") or (b == 0x5D and top == "a"):
            return _closed(stack[:-1])
    return None


def feed(st: State | None, data: bytes) -> State | None:
    for b in data:
        if st is None:
            return None
        st = step(st, b)
    return st


# --- the vocabulary as bytes ------------------------------------------------------------------------------


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-unicode table, inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def vocab_bytes(tokenizer: Any) -> list[bytes | None]:
    """Each token id's bytes as it appears in output text; None for special tokens."""
    vocab: dict[str, int] = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    size = max(vocab.values()) + 1
    out: list[bytes | None] = [None] * size
    decoder_spec = ""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        decoder_spec = json.dumps(json.loads(backend.to_str()).get("decoder"))
    byte_level = "ByteLevel" in decoder_spec
    table = _byte_level_decoder() if byte_level else {}
    for piece, tid in vocab.items():
        if tid in special:
            continue
        if byte_level:
            try:
                out[tid] = bytes(table[ch] for ch in piece)
            except KeyError:
                out[tid] = piece.encode()
        else:
            m = _BYTE_PIECE.match(piece)
            out[tid] = bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode()
    return out


@dataclass(slots=True)
class _Node:
    children: dict[int, _Node] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)


class JsonGrammar:
    """The vocabulary trie and the per-state mask cache of one tokenizer (shared by all sequences)."""

    def __init__(self, tokenizer: Any, eos_ids: tuple[int, ...], cache_size: int = 512):
        self.eos_ids = eos_ids
        self.root = _Node()
        self.pieces = vocab_bytes(tokenizer)
        for tid, data in enumerate(self.pieces):
            if not data:
                continue
            node = self.root
            for b in data:
                node = node.children.setdefault(b, _Node())
            node.token_ids.append(tid)
        self._masks: OrderedDict[tuple[State, int, str], torch.Tensor] = OrderedDict()
        self._cache_size = cache_size

    def allowed_ids(self, st: State | None) -> list[int]:
        if st is None or st[0] == DONE:
            return list(self.eos_ids)
        allowed: list[int] = []
        todo: list[tuple[_Node, State]] = [(self.root, st)]
        while todo:
            node, s = todo.pop()
            allowed.extend(node.token_ids)
            for b, child in node.children.items():
                nxt = step(s, b)
                if nxt is not None:
                    todo.append((child, nxt))
        return allowed

    def mask(self, st: State | None, width: int, device: torch.device) -> torch.Tensor:
        """Boolean [width]: True where a token may follow state `st`."""
        key = (st if st is not None else (DONE, "", None, 0), width, str(device))
        cached = self._masks.get(key)
        if cached is not None:
            self._masks.move_to_end(key)
            return cached
        ids = [t for t in self.allowed_ids(st) if t < width]
        m = torch.zeros(width, dtype=torch.bool)
        m[ids] = True
        m = m.to(device)
        self._masks[key] = m
        if len(self._masks) > self._cache_size:
            self._masks.popitem(last=False)
        return m


@dataclass(slots=True)
class JsonConstraint:
    """One sequence's place in the grammar; it catches up with the tokens sampled since it last looked."""

    grammar: JsonGrammar
    state: State | None = INITIAL
    consumed: int = 0

    def advance(self, output_ids: list[int]) -> None:
        pieces = self.grammar.pieces
        for tid in output_ids[self.consumed :]:
            if tid in self.grammar.eos_ids:
                continue
            piece = pieces[tid] if tid < len(pieces) else None
            self.state = feed(self.state, piece) if piece else None
        self.consumed = len(output_ids)

    def mask(self, output_ids: list[int], width: int, device: torch.device) -> torch.Tensor:
        self.advance(output_ids)
        return self.grammar.mask(self.state, width, device)
