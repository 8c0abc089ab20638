"""The `chatserve` command: `up` (everything on one machine), one subcommand per service, `chat` (a
terminal chat against the gateway) and `template` (list/render conversation templates).

Services are imported only when their subcommand runs, so `chatserve chat` needs no torch.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

SERVICES = {
    "controller": "controller.app",
    "worker": "worker.app",
    "gateway": "chatserve.gateway.app",
    "webui": "webui.app",
}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command in SERVICES:
        importlib.import_module(SERVICES[command]).main(rest)
    elif command == "up":
        from chatserve.cli.up import up

        up(rest)
    elif command == "chat":
        from chatserve.cli.chat import chat

        chat(rest)
    elif command == "health":
        from chatserve.cli.health import health

        health(rest)
    elif command == "export":
        importlib.import_module("webui.export").main(rest)
    elif command == "template":
        from chatserve.cli.template import template

        template(rest)
    else:
        print(f"chatserve: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)


USAGE = """usage: chatserve COMMAND [options]   (each command takes --help)

  up          start controller, worker, gateway and web UI on this machine
  controller  the worker registry and dispatcher (port 21001)
  worker      a model worker (port 21002)
  gateway     the OpenAI-compatible API (port 8000, /v1)
  webui       the Gradio chat UI (port 7860)
  chat        chat in the terminal through the gateway
  template    list or render conversation templates
  health      container healthcheck: ask the service this container runs
  export      write the web UI's stored chats as ShareGPT JSON (--format sharegpt --output FILE)"""


if __name__ == "__main__":
    main()
