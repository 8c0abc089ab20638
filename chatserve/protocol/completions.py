"""/v1/completions: text completion requests and responses."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from chatserve.protocol.openai import FinishReason, GenerationFields, Usage


class CompletionRequest(GenerationFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0: score the prompt only (echo or prompt_logprobs)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)  # vLLM's extension: each prompt token's logprobs
    suffix: None = None

    def scored_prompt(self) -> int | None:
        """How many alternatives each prompt token's entry needs, or None when the prompt is not scored."""
        wants = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return max(wants) if wants else None

    def prompts(self) -> list[str | list[int]]:
        """The prompt field normalised to a list of prompts (each text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return []
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


PromptLogprobs = list[dict[str, dict[str, Any]] | None]  # vLLM's shape: per token {id: {logprob, rank, decoded_token}}


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: PromptLogprobs | None = Field(None, exclude_if=lambda v: v is None)  # sent when asked for


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None
