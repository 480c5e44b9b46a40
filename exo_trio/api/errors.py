"""API errors, raised anywhere in a handler and rendered in the dialect's envelope."""

from __future__ import annotations

from typing import TypeVar

import msgspec

T = TypeVar("T")


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


def openai_error_body(error: ApiError) -> dict[str, object]:
    return {
        "error": {
            "message": error.message,
            "type": error.type,
            "param": error.param,
            "code": error.code,
        }
    }


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
    except msgspec.DecodeError as exc:
        raise ApiError(
            400, f"We could not parse the JSON body of your request: {exc}", code="invalid_json"
        ) from None
