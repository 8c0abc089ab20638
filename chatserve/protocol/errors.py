"""One error tree for every service, mapped to the OpenAI envelope.

`{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}` with the HTTP status the class
carries. Anything that is not a `ChatServeError` is an internal error: it is logged by the service and
answered with a generic 500 message, never with a stack trace or an internal address.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ChatServeError(Exception):
    status_code = 500
    error_type = "InternalServerError"
    retry_after = 1.0  # seconds, sent as Retry-After with 429 and 503

    def __init__(self, message: str, *, param: str | None = None, code: int | str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.status_code

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorInfo(message=self.message, type=self.error_type, param=self.param, code=self.code)
        )

    def to_dict(self) -> dict[str, Any]:
        return self.to_response().model_dump()


class BadRequestError(ChatServeError):
    status_code = 400
    error_type = "BadRequestError"


class ContextLengthError(BadRequestError):
    """Prompt plus requested completion does not fit the model's context window."""


class AuthenticationError(ChatServeError):
    status_code = 401
    error_type = "AuthenticationError"


class NotFoundError(ChatServeError):
    status_code = 404
    error_type = "NotFoundError"


class RequestTooLargeError(ChatServeError):
    status_code = 413
    error_type = "RequestTooLargeError"


class OverloadedError(ChatServeError):
    """A queue is full: try again shortly."""

    status_code = 429
    error_type = "RateLimitError"


class RateLimitError(OverloadedError):
    """A key is over its requests- or tokens-per-minute limit; `retry_after` says when it frees up."""

    def __init__(self, message: str, *, retry_after: float, code: int | str | None = None):
        super().__init__(message, code=code)
        self.retry_after = retry_after


class ServiceUnavailableError(ChatServeError):
    status_code = 503
    error_type = "ServiceUnavailableError"


class InternalError(ChatServeError):
    status_code = 500
    error_type = "InternalServerError"


_BY_STATUS: dict[int, type[ChatServeError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    413: RequestTooLargeError,
    429: OverloadedError,
    503: ServiceUnavailableError,
}


def error_from_envelope(status: int, body: Any) -> ChatServeError:
    """Rebuild an error that another chatserve service sent as an envelope (status kept)."""
    cls = _BY_STATUS.get(status, InternalError)
    info = body.get("error") if isinstance(body, dict) else None
    if not isinstance(info, dict):
        return cls(f"upstream error (HTTP {status})")
    return cls(str(info.get("message", "")), param=info.get("param"), code=info.get("code", status))
