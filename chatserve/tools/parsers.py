"""Tool calls out of a model's text, incrementally, for every named format (formats.py).

`ToolCallParser.feed(text)` takes each delta of a stream and returns what is now certain: content text
and whole calls. Text that may still turn into a call (a trigger's first characters, an open call) is
held back until it is decided. A call is whole when its JSON parses, names a function of the request, and
has an object of arguments; anything else (cut off, malformed, an unknown function) comes back as the
content text it was, never an exception: a weak model's output is arbitrary text.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from chatserve.tools.formats import ToolFormat


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(slots=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as text
    id: str = field(default_factory=new_call_id)


@dataclass(slots=True)
class Parsed:
    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.calls)


def _json_end(text: str, start: int) -> int:
    """The index just past the JSON object or array opening at text[start], or -1 while it is open."""
    depth, in_str, esc = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


class ToolCallParser:
    def __init__(self, fmt: ToolFormat, tool_names: set[str]):
        self.fmt = fmt
        self.names = tool_names
        self.bare = not fmt.call_open  # calls are bare JSON (after an optional trigger) at the reply's start
        self.buf = ""  # text not yet decided
        self.in_call = False  # buf opens a call region
        self.seen_text = False  # content other than white space was emitted
        self.called = False
        self.pending_ws = ""  # white space held: it is dropped when it only separates calls

    # --- decoding one call's JSON ---------------------------------------------------------------------

    def _call(self, obj: Any) -> ParsedCall | None:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in self.names:
            return None
        args = obj.get(self.fmt.args_key, obj.get("arguments", obj.get("parameters", {})))
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))

    def _calls_of(self, text: str) -> list[ParsedCall] | None:
        """Every call in `text` (one JSON object, a JSON array of them, or objects separated by `;`/`,`),
        or None when any part of it is not a call."""
        text = text.strip()
        if not text:
            return None
        try:
            obj = json.loads(text)
        except ValueError:
            items: list[Any] = []
            pos = 0
            while pos < len(text):
                while pos < len(text) and text[pos] in " \t\r\n;,":
                    pos += 1
                if pos >= len(text):
                    break
                if text[pos] != "{":
                    return None
                end = _json_end(text, pos)
                if end < 0:
                    return None
                try:
                    items.append(json.loads(text[pos:end]))
                except ValueError:
                    return None
                pos = end
            obj = items
        objs = obj if isinstance(obj, list) else [obj]
        calls = [self._call(o) for o in objs]
        if not calls or any(c is None for c in calls):
            return None
        return calls  # type: ignore[return-value]

    # --- streaming --------------------------------------------------------------------------------------

    def feed(self, text: str) -> Parsed:
        self.buf += text
        out = Parsed()
        while self.buf:
            if self.in_call:
                if not self._close_region(out, final=False):
                    break
                continue
            at = self._find_opener(self.buf)
            if at >= 0:
                self._emit(out, self.buf[:at])
                self.buf, self.in_call = self.buf[at:], True
                continue
            hold = self._partial_tail(self.buf)
            self._emit(out, self.buf[: len(self.buf) - hold])
            self.buf = self.buf[len(self.buf) - hold:]
            break
        return out

    def finish(self) -> Parsed:
        """At the end of the reply: decide whatever is held back."""
        out = Parsed()
        if self.in_call:
            self._close_region(out, final=True)
        self._emit(out, self.buf)
        self.buf = ""
        if not self.called:
            out.content += self.pending_ws
        self.pending_ws = ""
        return out

    def _find_opener(self, buf: str) -> int:
        at = buf.find(self.fmt.trigger)
        if self.bare and not self.seen_text:
            body = buf.lstrip()
            if body.startswith(("{", "[{")):
                lead = len(buf) - len(body)
                at = lead if at < 0 else min(at, lead)
        return at

    def _partial_tail(self, buf: str) -> int:
        """Length of the longest suffix of buf that may begin a call."""
        if self.bare and not self.seen_text and buf.strip() in ("", "["):
            return len(buf)
        trigger = self.fmt.trigger
        for k in range(min(len(trigger) - 1, len(buf)), 0, -1):
            if buf.endswith(trigger[:k]):
                return k
        return 0

    def _emit(self, out: Parsed, text: str) -> None:
        if not text:
            return
        if not text.strip():
            self.pending_ws += text
            return
        out.content += self.pending_ws + text
        self.pending_ws = ""
        self.seen_text = True

    def _add_calls(self, out: Parsed, calls: list[ParsedCall]) -> None:
        out.calls += calls
        self.called = True
        self.pending_ws = ""

    def _close_region(self, out: Parsed, final: bool) -> bool:
        """Decide the call region at the start of buf; False while it is still open."""
        buf = self.buf
        trigger = self.fmt.trigger
        if not self.bare:  # <tool_call> ... </tool_call>
            close_tag = self.fmt.call_close.strip()
            close = buf.find(close_tag, len(trigger))
            if close < 0 and not final:
                return False
            end = close + len(close_tag) if close >= 0 else len(buf)
            calls = self._calls_of(buf[len(trigger):close if close >= 0 else len(buf)])
        else:  # bare JSON after an optional trigger: the rest of the reply, decided at its end
            if not final:
                return False
            end = len(buf)
            calls = self._calls_of(buf[len(trigger):] if buf.startswith(trigger) else buf)
        if calls is None:
            self._emit(out, buf[:end])
        else:
            self._add_calls(out, calls)
        self.buf, self.in_call = buf[end:], False
        return True


def parse_all(fmt: ToolFormat, tool_names: set[str], text: str) -> Parsed:
    """A whole reply at once (non-streaming responses)."""
    p = ToolCallParser(fmt, tool_names)
    first, rest = p.feed(text), p.finish()
    return Parsed(first.content + rest.content, first.calls + rest.calls)
