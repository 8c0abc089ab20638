"""Stop strings, held back until resolved.

Text that might be the start of a stop string is not released until the next tokens show whether it is
one. When a stop string appears, the text before it is released and the sequence stops (the stop string
itself is never sent, as in the OpenAI API).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class StopChecker:
    stops: list[str]
    pending: str = ""  # text held back
    stopped: bool = False
    max_stop: int = field(init=False)

    def __post_init__(self) -> None:
        self.max_stop = max((len(s) for s in self.stops), default=0)

    def feed(self, text: str) -> str:
        """Add new text; return what can be released now (sets `stopped` when a stop string appears)."""
        if not self.stops:
            return text
        buf = self.pending + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.pending = ""
            return buf[:cut]
        hold = 0
        for s in self.stops:  # longest suffix of buf that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        self.pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
