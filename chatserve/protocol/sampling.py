"""Sampling parameters as they travel from the gateway to a worker (one per generated sequence)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    # the prompt's own tokens' logprobs (scoring, echo): every prompt position is computed, none served
    # from the prefix cache; the top N alternatives at each
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    logit_bias: dict[int, float] | None = None
    response_format: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None  # response_format json_schema: the schema
    # prompts of different salts share no prefix-cache blocks (per request, or per API key: the gateway)
    cache_salt: str | None = Field(None, max_length=256)
    # set by the worker: the llguidance grammar the output is constrained to (response formats, tool calls)
    grammar: str | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """Whether repetition, presence or frequency penalties apply (sampling then reads past tokens)."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)
