"""Grammars for constrained decoding (llguidance: benchmarks/grammar_engines.py measured it against
xgrammar), built from what a request asks for: `response_format` (json_object, json_schema) and tool
choices that must produce a call (`required`, a named function, `auto` with a `strict` tool).

Schemas are checked twice before a token is generated: as JSON Schema (jsonschema's metaschema check) and
against what the engine can enforce; a keyword it cannot enforce is a 400 naming it, never dropped.
"""

from __future__ import annotations

import json
from typing import Any

from chatserve.protocol.errors import BadRequestError
from chatserve.tools.formats import ToolFormat, lark_str

# compact JSON: a weak model cannot pad a reply with whitespace forever
JSON_OPTIONS = {"whitespace_flexible": False}


def _lark_regex_escape(text: str) -> str:
    out = []
    for ch in text:
        if ch == "\n":
            out.append("\\n")
        elif ch in ".^$*+?()[]{}|\\/":
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def check_schema(schema: Any, param: str) -> None:
    """400 naming `param` unless `schema` is valid JSON Schema that the engine enforces in full."""
    import jsonschema
    import llguidance

    if not isinstance(schema, dict) and not isinstance(schema, bool):
        raise BadRequestError("the schema must be a JSON object", param=param)
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise BadRequestError(f"not a valid JSON Schema{' at ' + where if where else ''}: {exc.message}",
                              param=param) from None
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise BadRequestError(f"the schema cannot be enforced: {messages[0]}", param=param)


def json_schema_grammar(schema: dict[str, Any] | None) -> str:
    """llguidance grammar for a JSON value of `schema` (None: any JSON object, `json_object` mode)."""
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(schema if schema is not None else {"type": "object"},
                                                         defaults=JSON_OPTIONS)


def tool_grammar(fmt: ToolFormat, tools: list[dict[str, Any]], choice: str | dict[str, Any],
                 parallel: bool, response_schema: dict[str, Any] | None = None,
                 response_object: bool = False) -> str | None:
    """The grammar for a reply to a request with tools, or None where decoding is free (auto, no tool
    strict, no response format). `choice`: "auto", "required" or {"name": ...}."""
    import llguidance

    if isinstance(choice, dict):
        tools = [t for t in tools if t["function"]["name"] == choice["name"]]
        parallel = False
    elif choice == "auto" and not response_object and response_schema is None and not any(
            t["function"].get("strict") for t in tools):
        return None
    rules = fmt.calls_rules(tools, parallel)
    if choice != "auto":
        lark = "start: calls\n" + rules
    elif response_object or response_schema is not None:
        schema = response_schema if response_schema is not None else {"type": "object"}
        lark = f"start: reply | calls\nreply: %json {json.dumps(schema)}\n" + rules
    elif fmt.call_open:  # calls open with a tag: text without it, or text up to the first tag, then calls
        trigger, opener = _lark_regex_escape(fmt.trigger), _lark_regex_escape(fmt.call_open)
        close = lark_str(fmt.call_close) if fmt.call_close else ""
        lark = (f"start: TEXT | PRE call_json {close} {fmt.more_calls(parallel)}\n"
                f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{trigger}(.|\\n)*/\n"
                f"PRE: /(.|\\n)*{opener}/ & ~/(.|\\n)*{trigger}(.|\\n)*{trigger}(.|\\n)*/\n" + rules)
    else:  # bare JSON calls: a text reply is one that does not open with JSON
        lark = "start: TEXT | calls\nTEXT: /[^\\[{\\s](.|\\n)*/ | /\\s*/\n" + rules
    return llguidance.LLMatcher.grammar_from_lark(lark)


def validate(grammar: str) -> str:
    """An error message for a grammar the engine cannot build, else ""."""
    import llguidance

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return messages[0] if is_error else ""
