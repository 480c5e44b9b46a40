"""API errors, raised anywhere in a handler and rendered in the dialect's envelope.

One exception type (ApiError, in OpenAI's vocabulary) serves every dialect; the
envelope is chosen by the request path, so a 404 or 413 raised before any adapter
runs still reaches an Anthropic or Ollama client in a shape it can parse.
"""

from __future__ import annotations

from typing import Literal, TypeVar

import msgspec

T = TypeVar("T")

Dialect = Literal["openai", "anthropic", "ollama"]


class ApiError(Exception):
    """A client-visible error with an HTTP status. `type` and `code` follow OpenAI's
    vocabulary; other dialects map them onto their own envelopes."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    @property
    def located_message(self) -> str:
        """The message with the offending field named, for envelopes without `param`."""
        if self.param and f"`{self.param}`" not in self.message:
            return f"{self.message} (at `{self.param}`)"
        return self.message


def dialect_for_path(path: str) -> Dialect:
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith(("/api/", "/ollama/")):
        return "ollama"
    return "openai"


def openai_error_body(error: ApiError) -> dict[str, object]:
    return {
        "error": {
            "message": error.message,
            "type": error.type,
            "param": error.param,
            "code": error.code,
        }
    }


# Anthropic's error types are keyed by status (its docs, "Errors"). 499 is our
# "cancelled by POST /v1/cancel", which Anthropic has no type for.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    499: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error_body(error: ApiError) -> dict[str, object]:
    kind = _ANTHROPIC_TYPES.get(error.status)
    if kind is None:
        kind = "invalid_request_error" if 400 <= error.status < 500 else "api_error"
    return {"type": "error", "error": {"type": kind, "message": error.located_message}}


def ollama_error_body(error: ApiError) -> dict[str, object]:
    return {"error": error.located_message}


def ollama_status(status: int) -> int:
    # Ollama answers 503 when it is too busy to queue a request (OLLAMA_MAX_QUEUE);
    # its clients know that status, not 429.
    return 503 if status == 429 else status


def render_error(error: ApiError, dialect: Dialect) -> tuple[dict[str, object], int]:
    """The body and status of an error response in the given dialect."""
    if dialect == "anthropic":
        return anthropic_error_body(error), error.status
    if dialect == "ollama":
        return ollama_error_body(error), ollama_status(error.status)
    return openai_error_body(error), error.status


def decode_body(body: bytes, model: type[T]) -> T:
    """Parse a JSON request body into a msgspec struct, turning every failure into
    a 400 that says what was wrong and where."""
    try:
        return msgspec.json.decode(body, type=model)
    except msgspec.ValidationError as exc:
        message = str(exc)
        param = None
        if " - at `$." in message:
            message, _, where = message.partition(" - at `$.")
            param = where.rstrip("`")
        elif " - at `$`" in message:
            message = message.split(" - at `$`")[0]
        raise ApiError(400, f"Invalid request: {message}", param=param) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec reports invalid UTF-8 inside a string as UnicodeDecodeError, not
        # DecodeError (found by fuzz/): a malformed body all the same.
        raise ApiError(
            400, f"We could not parse the JSON body of your request: {exc}", code="invalid_json"
        ) from None
    except RecursionError:
        # Free-form fields (metadata, tools, options) take any JSON, and msgspec
        # gives up on very deep nesting with a RecursionError (found by fuzz/).
        raise ApiError(
            400, "The JSON body of your request is nested too deeply.", code="invalid_json"
        ) from None
