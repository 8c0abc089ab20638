"""Rendering conversations to token ids, the one path from messages to a prompt.

The tokenizer's own chat template wins unless a template is named (per worker or per request); a model
without one gets its family's template by name match, else the plain default (logged once, never a hidden
few-shot example). Template stop strings that are single special tokens become stop token ids (special
tokens never appear in detokenized text); the others stay stop strings.

Tools: a chat template that takes `tools` (HF templates of Llama 3.1+, Qwen 2.5+, Mistral, Hermes
fine-tunes) gets them, and the tool history, as it was trained to; any other template gets them written in
the model's tool-call format (chatserve/tools/formats.py): the tool list in the system prompt, an
assistant's calls as the text of the calls, tool results as a user turn. Either way turn N's prompt stays
a prefix of turn N+1's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from chatserve.conversation import DEFAULT_TEMPLATE, Template, TemplateRegistry
from chatserve.protocol.chat import arguments_object
from chatserve.tools.formats import ToolFormat, detect_format, get_format, template_takes_tools
from chatserve.tools.reasoning import OPEN, PARSERS, starts_open, template_reasons

log = logging.getLogger("chatserve.worker")


@dataclass(slots=True)
class Rendered:
    text: str
    token_ids: list[int]
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)


def _calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"id": c.get("id"), "name": c["function"]["name"],
             "arguments": arguments_object(c["function"]["arguments"])} for c in message.get("tool_calls") or []]


def written_out(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                fmt: ToolFormat) -> list[dict[str, str]]:
    """Messages with tools and tool history as plain {role, content} text in `fmt`, for a template that
    knows only system, user and assistant turns."""
    out: list[dict[str, str]] = []
    if tools:
        prompt = fmt.tools_prompt(tools)
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": messages[0]["content"] + "\n\n" + prompt})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": prompt})
    previous = ""
    for m in messages:
        if m["role"] == "tool":
            text = fmt.render_result(m["content"])
            if previous == "tool":  # results of one round of calls share a user turn
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            calls = fmt.render_calls(_calls(m))
            out.append({"role": "assistant", "content": (m["content"] + "\n" if m["content"] else "") + calls})
        else:
            out.append({"role": m["role"], "content": m["content"]})
        previous = m["role"]
    return out


def for_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as HF chat templates read them: tool calls with their arguments as objects, no null keys."""
    out = []
    for m in messages:
        msg: dict[str, Any] = {"role": m["role"], "content": m["content"]}
        if m.get("tool_calls"):
            msg["tool_calls"] = [{"id": c["id"], "type": "function",
                                  "function": {"name": c["name"], "arguments": c["arguments"]}} for c in _calls(m)]
        for key in ("tool_call_id", "name"):
            if m.get(key):
                msg[key] = m[key]
        out.append(msg)
    return out


class PromptRenderer:
    def __init__(self, tokenizer: Any, model_name: str, template_name: str = "", tool_format: str = "",
                 reasoning: str = "auto"):
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
        source = getattr(tokenizer, "chat_template", None) if self.default is None else None
        source = source if isinstance(source, str) else None
        self.native_tools = template_takes_tools(source)
        self.tool_format = get_format(tool_format or detect_format(source, model_name))
        if reasoning not in PARSERS:
            raise ValueError(f"--reasoning-parser must be one of {', '.join(PARSERS)} (got {reasoning!r})")
        named_reasons = self.default is not None and OPEN in self.default.generation_prefix
        self.reasons = reasoning == "think" or (reasoning == "auto" and (template_reasons(source) or named_reasons))
        log.info("chat template: %s; tool calls: %s format, %s", self.default.name if self.default else
                 "the tokenizer's own", self.tool_format.name,
                 "tools rendered by the template" if self.native_tools else "tools written into the prompt")

    def reasoning_start(self, prompt_text: str) -> str | None:
        """Where a reply begins for the reasoning parser: "open" (inside a <think> span the prompt opened),
        "closed", or None for a model that does not reason."""
        if not self.reasons:
            return None
        return "open" if starts_open(prompt_text) else "closed"

    @property
    def template_name(self) -> str:
        return self.default.name if self.default else "tokenizer"

    def render(self, messages: list[dict[str, Any]], template: str | None = None,
               add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None,
               continue_final: bool = False, template_kwargs: dict[str, Any] | None = None) -> Rendered:
        """`continue_final`: the last message (the assistant's) is left open for the model to continue
        (prefill), not closed. `template_kwargs` go to a tokenizer's chat template (`enable_thinking`)."""
        tpl = self.registry.get(template) if template else self.default
        if tpl is None:
            kwargs = dict(template_kwargs or {})
            if continue_final:
                kwargs["continue_final_message"] = True
            if self.native_tools:
                if tools:
                    kwargs["tools"] = tools
                text = self.tokenizer.apply_chat_template(for_template(messages), tokenize=False,
                                                          add_generation_prompt=add_generation_prompt, **kwargs)
            else:
                text = self.tokenizer.apply_chat_template(written_out(messages, tools, self.tool_format),
                                                          tokenize=False, add_generation_prompt=add_generation_prompt,
                                                          **kwargs)
            return Rendered(text, self.encode(text), [], [])
        plain = written_out(messages, tools, self.tool_format)
        if continue_final:  # the generation prefix opens an assistant turn: the message's text follows it
            text = tpl.render(plain[:-1], True) + plain[-1]["content"]
        else:
            text = tpl.render(plain, add_generation_prompt)
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
