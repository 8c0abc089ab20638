"""The tool-call formats models are trained on, one object each: how tools and tool history are written
into a prompt whose chat template does not take `tools`, how calls look in the output (for the parser,
chatserve/tools/parsers.py), and the grammar that forces a call (constrained decoding, grammar.py).

- `hermes`: Hermes-2-Pro / Qwen 2.5+ / SmolLM3: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`,
  tool results in `<tool_response>` tags inside a user turn; tools listed as JSON lines inside `<tools>`.
- `llama3_json`: Llama 3.1+ JSON tool calling: `{"name": ..., "parameters": {...}}`, optionally after
  `<|python_tag|>`, several calls separated by `; `; results as the `ipython` role.
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, tools in `[AVAILABLE_TOOLS]...`,
  results in `[TOOL_RESULTS]...[/TOOL_RESULTS]`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_PARALLEL_CALLS = 8  # calls one constrained reply may hold


def lark_str(text: str) -> str:
    """A Lark string literal."""
    return json.dumps(text)


@dataclass(frozen=True)
class ToolFormat:
    name: str
    args_key: str  # "arguments" or "parameters"
    trigger: str  # the text a call starts with ("" where a call is bare JSON)
    call_open: str  # written before each constrained call
    call_close: str
    separator: str  # between constrained calls
    list_open: str = ""  # around all calls (mistral's JSON array)
    list_close: str = ""

    # --- prompts for templates that do not take tools -----------------------------------------------

    def tools_prompt(self, tools: list[dict[str, Any]]) -> str:
        raise NotImplementedError

    def render_calls(self, calls: list[dict[str, Any]]) -> str:
        """An assistant message's tool_calls as the text the model would have written."""
        raise NotImplementedError

    def render_result(self, content: str) -> str:
        raise NotImplementedError

    # --- constrained decoding -------------------------------------------------------------------------

    def call_schema(self, tool: dict[str, Any]) -> dict[str, Any]:
        fn = tool["function"]
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        return {"type": "object", "properties": {"name": {"const": fn["name"]}, self.args_key: params},
                "required": ["name", self.args_key], "additionalProperties": False}

    def more_calls(self, parallel: bool) -> str:
        """Lark for the calls that may follow the first: up to MAX_PARALLEL_CALLS in all, or none."""
        return f"({lark_str(self.separator)} call){{0,{MAX_PARALLEL_CALLS - 1}}}" if parallel else ""

    def calls_rules(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        """Lark rules defining `calls` (one or more calls of the given tools) and `call`."""
        schema = {"anyOf": [self.call_schema(t) for t in tools]} if len(tools) > 1 else self.call_schema(tools[0])
        more = self.more_calls(parallel)
        return (f"calls: {lark_str(self.list_open) + ' ' if self.list_open else ''}call {more}"
                f"{' ' + lark_str(self.list_close) if self.list_close else ''}\n"
                f"call: {lark_str(self.call_open) + ' ' if self.call_open else ''}call_json"
                f"{' ' + lark_str(self.call_close) if self.call_close else ''}\n"
                f"call_json: %json {json.dumps(schema)}\n")


class Hermes(ToolFormat):
    def tools_prompt(self, tools: list[dict[str, Any]]) -> str:
        lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
                f"{lines}\n</tools>\n\nFor each function call, return a json object with function name and "
                "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')

    def render_calls(self, calls: list[dict[str, Any]]) -> str:
        return "\n".join("<tool_call>\n" + json.dumps({"name": c["name"], "arguments": c["arguments"]},
                                                      ensure_ascii=False) + "\n</tool_call>" for c in calls)

    def render_result(self, content: str) -> str:
        return f"<tool_response>\n{content}\n</tool_response>"


class Llama3Json(ToolFormat):
    def tools_prompt(self, tools: list[dict[str, Any]]) -> str:
        listed = "\n\n".join(json.dumps(t, indent=4, ensure_ascii=False) for t in tools)
        return ("Given the following functions, please respond with a JSON for a function call with its proper "
                "arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function name, "
                "\"parameters\": dictionary of argument name and its value}. Do not use variables.\n\n" + listed)

    def render_calls(self, calls: list[dict[str, Any]]) -> str:
        return "; ".join(json.dumps({"name": c["name"], "parameters": c["arguments"]}, ensure_ascii=False)
                         for c in calls)

    def render_result(self, content: str) -> str:
        return content


class Mistral(ToolFormat):
    def tools_prompt(self, tools: list[dict[str, Any]]) -> str:
        return "[AVAILABLE_TOOLS]" + json.dumps(tools, ensure_ascii=False) + "[/AVAILABLE_TOOLS]"

    def render_calls(self, calls: list[dict[str, Any]]) -> str:
        return "[TOOL_CALLS]" + json.dumps([{"name": c["name"], "arguments": c["arguments"]} for c in calls],
                                           ensure_ascii=False)

    def render_result(self, content: str) -> str:
        return "[TOOL_RESULTS]" + json.dumps({"content": content}, ensure_ascii=False) + "[/TOOL_RESULTS]"


FORMATS: dict[str, ToolFormat] = {
    "hermes": Hermes("hermes", "arguments", "<tool_call>", "<tool_call>\n", "\n</tool_call>", "\n"),
    "llama3_json": Llama3Json("llama3_json", "parameters", "<|python_tag|>", "", "", "; "),
    "mistral": Mistral("mistral", "arguments", "[TOOL_CALLS]", "", "", ", ", "[", "]"),
}
DEFAULT_FORMAT = "hermes"


def get_format(name: str) -> ToolFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown tool-call format {name!r}; known: {', '.join(FORMATS)}") from None


def detect_format(template_source: str | None, model_name: str = "") -> str:
    """The format a chat template (its Jinja source) or a model name implies; hermes where nothing says."""
    src = template_source or ""
    name = model_name.lower()
    if "<tool_call>" in src:
        return "hermes"
    if "[TOOL_CALLS]" in src or "[AVAILABLE_TOOLS]" in src or "mistral" in name or "mixtral" in name:
        return "mistral"
    if "<|python_tag|>" in src or "ipython" in src or "llama-3" in name or "llama3" in name:
        return "llama3_json"
    return DEFAULT_FORMAT


def template_takes_tools(template_source: str | None) -> bool:
    """Whether a Jinja chat template renders the `tools` it is given (HF templates of Llama 3.1+, Qwen 2.5+,
    Mistral, Hermes fine-tunes)."""
    return bool(template_source) and "tools" in template_source  # type: ignore[operator]
