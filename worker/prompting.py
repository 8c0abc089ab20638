"""Rendering conversations to token ids, the one path from messages to a prompt.

The tokenizer's own chat template wins unless a template is named (per worker or per request); a model
without one gets its family's template by name match, else the plain default (logged once, never a hidden
few-shot example). Template stop strings that are single special tokens become stop token ids (special
tokens never appear in detokenized text); the others stay stop strings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from chatserve.conversation import DEFAULT_TEMPLATE, Template, TemplateRegistry

log = logging.getLogger("chatserve.worker")


@dataclass(slots=True)
class Rendered:
    text: str
    token_ids: list[int]
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)


class PromptRenderer:
    def __init__(self, tokenizer: Any, model_name: str, template_name: str = ""):
        self.tokenizer = tokenizer
        self.registry = TemplateRegistry.builtin()
        self.default: Template | None = None
        if template_name:
            self.default = self.registry.get(template_name)
        elif not getattr(tokenizer, "chat_template", None):
            self.default = self.registry.match(model_name)
            if self.default is None:
                self.default = self.registry.get(DEFAULT_TEMPLATE)
                log.warning("model %s has no chat template and matches no family: using the plain %r template",
                            model_name, DEFAULT_TEMPLATE)
        log.info("chat template: %s", self.default.name if self.default else "the tokenizer's own")

    @property
    def template_name(self) -> str:
        return self.default.name if self.default else "tokenizer"

    def render(self, messages: list[dict[str, str]], template: str | None = None,
               add_generation_prompt: bool = True) -> Rendered:
        tpl = self.registry.get(template) if template else self.default
        if tpl is None:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
            return Rendered(text, self.encode(text), [], [])
        text = tpl.render(messages, add_generation_prompt)
        ids = self.encode(text)
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if tpl.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        stop, stop_ids = self._split_stops(tpl.stop)
        return Rendered(text, ids, stop, stop_ids)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_prompt(self, text: str) -> list[int]:
        """A raw completion prompt: with the BOS token, as the model saw text in training."""
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        return list(ids)

    def _split_stops(self, stops: tuple[str, ...]) -> tuple[list[str], list[int]]:
        strings, ids = [], []
        special = set(getattr(self.tokenizer, "all_special_tokens", []) or [])
        for s in stops:
            if s in special:
                ids.append(self.tokenizer.convert_tokens_to_ids(s))
            else:
                strings.append(s)
        return strings, ids
