"""`chatserve chat`: a terminal chat through the gateway, with history (like FastChat's CLI).

Type a message and press Enter; `/reset` starts over, `/exit` (or Ctrl-D) quits.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def chat(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="chatserve chat", description="chat in the terminal through the gateway")
    p.add_argument("--api-url", default=os.environ.get("CHATSERVE_API_URL", "http://127.0.0.1:8000/v1"))
    p.add_argument("--api-key", default=os.environ.get("CHATSERVE_API_KEY", "none"))
    p.add_argument("--model", default="", help="model name (default: the first the gateway lists)")
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=512)
    a = p.parse_args(list(argv))

    import openai

    client = openai.OpenAI(base_url=a.api_url, api_key=a.api_key or "none")
    try:
        model = a.model or client.models.list().data[0].id
    except (openai.APIError, IndexError) as exc:
        raise SystemExit(f"chatserve chat: no model available at {a.api_url} ({exc})") from None
    print(f"chatting with {model} (/reset to start over, /exit to quit)")
    history: list[dict[str, str]] = [{"role": "system", "content": a.system}] if a.system else []
    while True:
        try:
            text = input("USER: ").strip()
        except EOFError:
            print()
            return
        if not text:
            continue
        if text == "/exit":
            return
        if text == "/reset":
            history = history[:1] if a.system else []
            print("(history cleared)")
            continue
        history.append({"role": "user", "content": text})
        sys.stdout.write("ASSISTANT: ")
        reply: list[str] = []
        try:
            stream = client.chat.completions.create(model=model, messages=history, stream=True,  # type: ignore[arg-type]
                                                    temperature=a.temperature, max_tokens=a.max_tokens)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    reply.append(chunk.choices[0].delta.content)
                    sys.stdout.write(chunk.choices[0].delta.content)
                    sys.stdout.flush()
        except openai.APIError as exc:
            history.pop()
            print(f"\n[error] {exc}")
            continue
        print()
        history.append({"role": "assistant", "content": "".join(reply)})
