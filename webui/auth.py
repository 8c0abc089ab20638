"""Web UI logins: the auth file holds argon2id hashes (argon2-cffi), written by `chatserve webui add-user
NAME`; a plaintext line stops the UI with how to convert it. Repeated failures lock a user, and the
address they came from, out for a while (doubling from 1 s after 5 in a row, at most 5 minutes), whatever
password is tried meanwhile. Gradio hands the check only a name and a password: `ClientAddress`, an ASGI
middleware on the UI's app, tells it the address."""

from __future__ import annotations

import argparse
import contextvars
import getpass
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

HASHER = PasswordHasher()
CLIENT: contextvars.ContextVar[str] = contextvars.ContextVar("client_address", default="?")


class ClientAddress:
    """Puts each request's client address where the login check can read it (`CLIENT`)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        client = scope.get("client") if scope["type"] == "http" else None
        token = CLIENT.set(client[0] if client else "?")
        try:
            await self.app(scope, receive, send)
        finally:
            CLIENT.reset(token)
FREE_FAILURES = 5
MAX_LOCK_S = 300.0


def read_auth_file(path: str) -> dict[str, str]:
    """USER:HASH per line ('#' comments); a malformed or plaintext line stops the UI with its line number."""
    users: dict[str, str] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, secret = line.partition(":")
        user = user.strip()
        if not sep or not user or not secret:
            raise SystemExit(f"{path}:{n}: expected USER:HASH (write one with `chatserve webui add-user USER "
                             f"--auth-file {path}`)")
        if not secret.startswith("$argon2"):
            raise SystemExit(f"{path}:{n}: the password of {user!r} is stored in plain text; replace the line "
                             f"by running `chatserve webui add-user {user} --auth-file {path}` (it asks for the "
                             "password and stores its argon2 hash)")
        users[user] = secret
    if not users:
        raise SystemExit(f"{path}: no users")
    return users


class Logins:
    """Checks a login against the hashes, locking a user out after repeated failures."""

    def __init__(self, users: dict[str, str], clock: Callable[[], float] = time.monotonic):
        self.users, self.clock = users, clock
        self.failures: dict[str, int] = {}
        self.locked_until: dict[str, float] = {}
        self.lock = threading.Lock()

    def __call__(self, user: str, password: str) -> bool:
        keys = (f"user:{user}", f"addr:{CLIENT.get()}")  # who, and from where
        with self.lock:
            if any(self.clock() < self.locked_until.get(k, 0.0) for k in keys):
                return False
        stored = self.users.get(user)
        ok = False
        try:
            ok = stored is not None and HASHER.verify(stored, password)
        except (VerificationError, InvalidHashError):
            ok = False
        if stored is None:  # the same work for an unknown name: no timing tells which names exist
            try:
                HASHER.verify(DUMMY_HASH, password)
            except VerificationError:
                pass
        with self.lock:
            if ok:
                self.failures.pop(keys[0], None)
                return True
            for k in keys:
                n = self.failures[k] = self.failures.get(k, 0) + 1
                if n >= FREE_FAILURES:
                    self.locked_until[k] = self.clock() + min(2.0 ** (n - FREE_FAILURES), MAX_LOCK_S)
        return False


DUMMY_HASH = HASHER.hash("not a password of anyone")


def add_user(argv: Sequence[str]) -> None:
    """`chatserve webui add-user NAME --auth-file FILE`: ask for a password (twice on a terminal; one line of
    standard input otherwise) and store its hash, replacing the user's line if there is one."""
    ap = argparse.ArgumentParser(prog="chatserve webui add-user")
    ap.add_argument("name")
    ap.add_argument("--auth-file", default=os.environ.get("CHATSERVE_AUTH_FILE", ""), required=False)
    a = ap.parse_args(list(argv))
    if not a.auth_file:
        raise SystemExit("chatserve webui add-user: give --auth-file FILE (or CHATSERVE_AUTH_FILE)")
    if not a.name or ":" in a.name or a.name != a.name.strip():
        raise SystemExit("chatserve webui add-user: a user name has no ':' and no surrounding spaces")
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {a.name}: ")
        if getpass.getpass("again: ") != password:
            raise SystemExit("chatserve webui add-user: the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < 8:
        raise SystemExit("chatserve webui add-user: use a password of at least 8 characters")
    path = Path(a.auth_file)
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    lines = [ln for ln in lines if ln.partition(":")[0].strip() != a.name]
    lines.append(f"{a.name}:{HASHER.hash(password)}")
    path.touch(mode=0o600, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"chatserve: {a.name} stored in {path}")
