"""HTTP plumbing shared by every service: error envelope handlers, the internal-plane secret, serving.

Every error a service returns is the OpenAI envelope with the right status: validation errors are 400
(never FastAPI's 422) with `param` naming the field, unknown routes 404, anything unexpected a generic 500
that carries no stack trace and no internal address (the detail goes to the log).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatserve.protocol.errors import (
    AuthenticationError,
    BadRequestError,
    ChatServeError,
    InternalError,
    NotFoundError,
    RequestTooLargeError,
)

log = logging.getLogger("chatserve.http")

SECRET_HEADER = "X-Chatserve-Secret"


def error_response(err: ChatServeError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.to_dict(), status_code=err.status_code, headers=headers)


def validation_param(errors: list[dict[str, Any]]) -> str | None:
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if loc:
            return ".".join(loc)
    return None


def validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        msg = str(e.get("msg", "invalid value"))
        if e.get("type") == "extra_forbidden":
            msg = "this field is not supported by this server"
        elif e.get("type") == "json_invalid":
            return "Invalid JSON body: " + str(e.get("ctx", {}).get("error", msg))
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ChatServeError)
    async def _chatserve(_: Request, exc: ChatServeError) -> JSONResponse:
        headers = None
        if exc.status_code in (429, 503):
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
        return error_response(exc, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        param = validation_param(errors)
        if any(e.get("type") == "json_invalid" for e in errors):
            param = None
        return error_response(BadRequestError(validation_message(errors), param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFoundError(f"no route for {request.method} {request.url.path}"))
        if exc.status_code == 405:
            err = BadRequestError(f"method {request.method} is not allowed on {request.url.path}")
            err.code = 405
            resp = error_response(err)
            resp.status_code = 405
            return resp
        if exc.status_code == 413:
            return error_response(RequestTooLargeError(str(exc.detail)))
        err2 = ChatServeError(str(exc.detail))
        err2.status_code = exc.status_code
        err2.code = exc.status_code
        return error_response(err2)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(InternalError("internal server error"))


def check_secret(request: Request, secret: str) -> None:
    """Internal-plane calls carry the shared secret; compared in constant time."""
    if not secret:
        return
    given = request.headers.get(SECRET_HEADER, "")
    if not hmac.compare_digest(given.encode(), secret.encode()):
        raise AuthenticationError("missing or wrong internal secret")


def require_secret(secret: str) -> Callable[[Request], Awaitable[None]]:
    """A route dependency that admits only internal-plane callers (no-op when no secret is set). A coroutine:
    FastAPI would run a plain function in a worker thread, a thread hop per internal call."""

    async def dependency(request: Request) -> None:
        check_secret(request, secret)

    return dependency


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve to anything


NO_SECRET = ("chatserve {service}: refusing to listen on {host} without an internal secret: anyone who reaches "
             "the port could {what}. Give every service of the deployment the same secret with "
             "--internal-secret-file FILE or CHATSERVE_INTERNAL_SECRET (make one with `openssl rand -hex 24` or "
             "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`), or bind to 127.0.0.1. "
             "--insecure-open-internal-plane serves it open anyway.")
WHAT = {"controller": "register a worker and receive users' prompts, or drop real workers",
        "worker": "call /generate past API keys, rate limits and the max_tokens cap",
        "gateway": "point it at any worker address"}


def guard_internal_plane(settings: Any, service: str) -> None:
    """Read the secret from its file, and refuse a non-loopback bind without one (SystemExit with how to fix
    it), unless --insecure-open-internal-plane: then warn now and every minute."""
    if settings.internal_secret_file:
        try:
            settings.internal_secret = open(settings.internal_secret_file, encoding="utf-8").read().strip()
        except OSError as exc:
            raise SystemExit(f"chatserve {service}: cannot read --internal-secret-file: {exc}") from None
        if not settings.internal_secret:
            raise SystemExit(f"chatserve {service}: the internal secret file {settings.internal_secret_file} is empty")
    if settings.internal_secret or is_loopback(settings.host):
        return
    if not settings.insecure_open_internal_plane:
        raise SystemExit(NO_SECRET.format(service=service, host=settings.host, what=WHAT.get(service, "call it")))

    def nag() -> None:
        while True:
            log.warning("the internal plane of this %s is OPEN on %s (--insecure-open-internal-plane): anyone who "
                        "reaches it can %s", service, settings.host, WHAT.get(service, "call it"))
            time.sleep(60)

    threading.Thread(target=nag, name="insecure-plane-warning", daemon=True).start()


def secret_headers(secret: str) -> dict[str, str]:
    return {SECRET_HEADER: secret} if secret else {}


def serve(app: FastAPI, host: str, port: int, log_level: str = "info",
          before_exit: Callable[[], Awaitable[None]] | None = None) -> None:
    """Run the app under uvicorn. `before_exit`: awaited when SIGTERM or SIGINT first arrives, before the
    server stops (a worker drains its streams there); a second signal stops at once."""
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        draining = False

        async def startup(self, sockets: Any = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if before_exit is None or self.draining or not hasattr(self, "loop"):
                super().handle_exit(sig, frame)
                return
            self.draining = True
            log.info("signal %s: finishing before exit", sig)

            async def then_exit() -> None:
                try:
                    await before_exit()
                finally:
                    self.should_exit = True  # a clean stop: exit 0 (uvicorn re-raises signals it handled itself)

            self.loop.call_soon_threadsafe(lambda: self.loop.create_task(then_exit()))

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                            timeout_graceful_shutdown=5)
    Server(config).run()


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level.lower() != "debug":
        logging.getLogger("httpx").setLevel(logging.WARNING)
