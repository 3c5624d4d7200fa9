"""Errors the server answers with, in the OpenAI error envelope.

`{"error": {"message": str, "type": str, "param": str | None, "code": str | None}}` with the HTTP status that
OpenAI (and vLLM, llama.cpp's server) use: 400 invalid_request_error for bad JSON/types/bounds (never FastAPI's
422), 400 `context_length_exceeded` for a prompt plus max_tokens beyond the context, 401 authentication_error,
403 `host_not_allowed` (a Host header outside the allowed names: DNS-rebinding protection), 404
`model_not_found` / unknown route, 405, 408 `request_timeout` (headers or body too slow), 413 for an oversized
body, 415 `unsupported_media_type` (a body that is not `application/json`), 429 with Retry-After when the slots
and the queue are full, 500 `server_error` with a request id and no traceback (RELIABILITY.md §3), 503
`server_overloaded` past the connection cap.

Note the openai SDKs retry 408/409/429/>=500 twice by default, which is why bad input must never be a 5xx.
"""

from __future__ import annotations

from pocketlm.errors import PocketLMError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 408: "invalid_request_error",
          413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}


class APIError(PocketLMError):
    """An error answered to the client: HTTP status, message, OpenAI `type`, the failing `param`, a `code`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


class QueueFullError(APIError):
    """Every slot is busy and the queue is full: 429 with Retry-After."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(429, message, code="rate_limit_exceeded", headers={"Retry-After": str(retry_after)})
