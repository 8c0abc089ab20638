"""`chatserve template list` and `chatserve template render NAME --messages FILE.json`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from chatserve.conversation import TEMPLATES, TemplateRegistry


def template(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="chatserve template")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the built-in templates")
    r = sub.add_parser("render", help="print the exact prompt a template renders")
    r.add_argument("name")
    r.add_argument("--messages", required=True, help="JSON file: a list of {role, content}")
    r.add_argument("--no-generation-prompt", action="store_true")
    a = p.parse_args(list(argv))
    if a.cmd == "list":
        for t in TEMPLATES:
            print(f"{t.name:18} {t.description}")
        return
    try:
        tpl = TemplateRegistry.builtin().get(a.name)
    except KeyError as exc:
        raise SystemExit(str(exc.args[0])) from None
    with open(a.messages, encoding="utf-8") as f:
        messages = json.load(f)
    sys.stdout.write(tpl.render(messages, not a.no_generation_prompt))
    sys.stdout.write("\n")
