"""A sequence's state machine: WAITING -> RUNNING -> FINISHED (RUNNING -> WAITING on preemption).

Invariants: `token_ids` = prompt + generated tokens; `num_computed_tokens` of them have KV in the cache
(their blocks listed in `block_table`); a sequence samples a new token only in a step that computes up to
its last token.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from chatserve.protocol.sampling import SamplingParams


def root_hash(salt: str | None) -> bytes:
    """Where a sequence's chain of prefix-cache block hashes starts: the same for all without a salt."""
    return hashlib.sha256(b"chatserve-prefix-cache\0" + (salt or "").encode()).digest()


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_counter = itertools.count()

PLACEHOLDER = -1  # a token id still on the device


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n choices
    token_ids: list[int]
    params: SamplingParams
    num_prompt_tokens: int = 0
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    cached_counted: bool = False
    num_hashed_blocks: int = 0  # leading blocks of block_table whose hashes are registered
    last_hash: bytes | None = None
    cache_root: bytes = b""  # where this sequence's chain of block hashes starts (its cache salt's hash)
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    constraint: Any = None  # a GrammarConstraint (guided.py): masks the tokens that may follow
    # Running ahead (engine.py): the last token may still be on the device, in row `pending_row` of the step
    # that sampled it, with PLACEHOLDER in token_ids until the engine reads it back; `final_pending`: that
    # token ends the sequence whatever it is (max_tokens, context), so no step runs for it.
    pending_row: int = -1
    final_pending: bool = False

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)
        self.cache_root = root_hash(self.params.cache_salt)
        if self.params.seed is not None:
            g = torch.Generator()
            g.manual_seed((self.params.seed + self.index) & 0xFFFF_FFFF_FFFF_FFFF)  # torch takes 64 bits
            self.generator = g

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def reads_tokens(self) -> bool:
        """Whether sampling reads this sequence's generated tokens on the host (penalties): then a step
        must not run before the previous step's tokens are back. (A constraint reads them too, but only
        after its step is queued: engine.py.)"""
        return self.params.penalized

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens
