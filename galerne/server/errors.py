"""HTTP errors: every typed exception becomes a status and a body here, once.

The body follows the request's dialect:

* OpenAI: ``{"error": {"message", "type", "param", "code"}}``
* Mistral: ``{"object": "error", "message", "type", "param", "code"}``, plus
  ``detail`` (a list of ``{loc, msg, type}``) on 422, which the ``mistralai``
  client reads as an ``HTTPValidationError``.

Request validation errors (wrong type, out of range, malformed JSON) are 400 for
OpenAI (as OpenAI answers) and 422 for Mistral (as La Plateforme answers); both
name the field in ``param``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from ..errors import (
    EngineDeadError,
    GalerneError,
    InvalidParameter,
    ModelLoadError,
    NotFound,
    PromptTooLong,
    TokenizerError,
    WrongState,
)
from . import dialect as dialects
from .dialect import Dialect

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ the server's own errors


class Unauthorized(GalerneError):
    """No API key, or a wrong one."""


class ModelNotFound(GalerneError):
    def __init__(self, model: str, available: list[str]):
        self.model = model
        super().__init__(f"model {model!r} does not exist; this server has: {', '.join(available)}")


class Overloaded(GalerneError):
    """The queue is full: come back later."""

    def __init__(self, message: str, retry_after: int = 1):
        self.retry_after = retry_after
        super().__init__(message)


class ShuttingDown(GalerneError):
    """The server drains its in-flight requests before exiting; it takes no new ones."""


class ClientGone(GalerneError):
    """The client disconnected before its response started (nobody reads the answer)."""


class Forbidden(GalerneError):
    """A request the server refuses to serve whoever sends it: a ``Host`` or an ``Origin``
    it does not answer to (guards.py); an adapter path outside ``--lora-dir`` (adapters.py).
    ``field``: the body's field at fault, if any."""

    def __init__(self, message: str, code: str, field: str | None = None):
        self.code, self.field = code, field
        super().__init__(message)


class AdapterNotFound(GalerneError):
    """No adapter of that name is loaded (unload), or nothing at the path given (load)."""

    def __init__(self, message: str, field: str):
        self.field = field
        super().__init__(message)


class AdapterInvalid(GalerneError):
    """An adapter the server will not load: unreadable, malformed, for another base, too
    big, or under a name already taken. Nothing loaded changes."""

    def __init__(self, message: str, field: str, code: str = "invalid_adapter"):
        self.field, self.code = field, code
        super().__init__(message)


class BodyTooLarge(GalerneError):
    """The request body is past ``--max-body-mb``."""


class RequestTimeout(GalerneError):
    """The client did not send its request body within ``--body-timeout``."""


class TextTooLong(GalerneError):
    """More text than the context can hold, refused before tokenizing (serving.read_json)."""


@dataclass
class FieldError:
    loc: tuple  # ("body", "messages", 0, "content")
    msg: str
    type: str = "value_error"

    @property
    def param(self) -> str:
        """``messages[0].content``: the field, as our InvalidParameter names fields."""
        out = ""
        for part in self.loc[1:] if self.loc and self.loc[0] == "body" else self.loc:
            out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
        return out


class RequestInvalid(GalerneError):
    """The body does not match the schema: malformed JSON, a wrong type, a value out of range."""

    def __init__(self, errors: list[FieldError]):
        self.errors = errors
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"{first.param or 'body'}: {first.msg}{more}")

    @classmethod
    def from_pydantic(cls, e: ValidationError | RequestValidationError) -> "RequestInvalid":
        errors = [FieldError(("body", *err["loc"]) if isinstance(e, ValidationError) else tuple(err["loc"]),
                             err["msg"], err["type"]) for err in e.errors()]
        return cls(errors or [FieldError(("body",), "invalid request")])


# ------------------------------------------------------------------ the one table

# class -> (status, OpenAI-style type, code). The most derived class that matches wins.
_TABLE: list[tuple[type[BaseException], int, str, str | None]] = [
    (ClientGone, 499, "client_closed_request", None),  # nginx's code; nobody reads it
    (Unauthorized, 401, "authentication_error", "invalid_api_key"),
    (Forbidden, 403, "permission_error", None),  # the code is the error's own
    (BodyTooLarge, 413, "invalid_request_error", "request_too_large"),
    (RequestTimeout, 408, "invalid_request_error", "request_timeout"),
    (TextTooLong, 400, "invalid_request_error", "context_length_exceeded"),
    (ModelNotFound, 404, "invalid_request_error", "model_not_found"),
    (AdapterNotFound, 404, "invalid_request_error", "adapter_not_found"),  # vLLM's 404
    (NotFound, 404, "not_found_error", None),  # the code is the error's own
    (WrongState, 409, "invalid_request_error", None),  # the code is the error's own
    (AdapterInvalid, 400, "invalid_request_error", None),  # vLLM's 400; the code is the error's own
    (Overloaded, 429, "rate_limit_error", "queue_full"),
    (ShuttingDown, 503, "server_error", "shutting_down"),
    (EngineDeadError, 503, "server_error", "engine_failure"),
    (RequestInvalid, 400, "invalid_request_error", "invalid_request"),  # 422 for Mistral
    (PromptTooLong, 400, "invalid_request_error", "context_length_exceeded"),
    (InvalidParameter, 400, "invalid_request_error", "invalid_value"),
    (TokenizerError, 400, "invalid_request_error", "invalid_request"),
    (ModelLoadError, 500, "server_error", "internal_error"),
    (GalerneError, 400, "invalid_request_error", None),
]


_OWN_CODE = (Forbidden, AdapterInvalid, NotFound, WrongState)


def status_of(error: BaseException, dialect: Dialect) -> tuple[int, str, str | None]:
    for cls, status, kind, code in _TABLE:
        if isinstance(error, cls):
            if cls is RequestInvalid and dialect is Dialect.MISTRAL:
                status = 422
            return status, kind, getattr(error, "code", None) if cls in _OWN_CODE else code
    return 500, "server_error", "internal_error"


def error_body(error: BaseException, dialect: Dialect) -> tuple[int, dict, dict]:
    """(status, JSON body, extra headers) for ``error`` in ``dialect``."""
    status, kind, code = status_of(error, dialect)
    message = str(error) if status < 500 or isinstance(error, GalerneError) else "internal server error"
    param = getattr(error, "field", None)
    if isinstance(error, RequestInvalid):
        param = error.errors[0].param or None
    headers = {}
    if isinstance(error, Overloaded):
        headers["Retry-After"] = str(error.retry_after)
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(error, (BodyTooLarge, RequestTimeout)):  # the rest of the body is not read (transport.py)
        headers["Connection"] = "close"
    if dialect is Dialect.MISTRAL:
        body = {"object": "error", "message": message, "type": kind, "param": param, "code": code}
        if isinstance(error, RequestInvalid):
            body["detail"] = [{"loc": list(e.loc), "msg": e.msg, "type": e.type} for e in error.errors]
    else:
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return status, body, headers


def error_response(error: BaseException, dialect: Dialect) -> JSONResponse:
    status, body, headers = error_body(error, dialect)
    return JSONResponse(body, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Route every typed error through ``error_response`` (unexpected ones: app.py's
    middleware, so that they are logged once)."""

    async def galerne_error(request: Request, exc: GalerneError):
        return error_response(exc, dialects.of(request))

    async def validation_error(request: Request, exc: RequestValidationError):
        return error_response(RequestInvalid.from_pydantic(exc), dialects.of(request))

    async def http_error(request: Request, exc: StarletteHTTPException):
        d = dialects.of(request)
        status, body, _ = error_body(GalerneError(str(exc.detail)), d)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        if d is Dialect.MISTRAL:
            body.update(type=kind)
        else:
            body["error"].update(type=kind)
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    app.add_exception_handler(GalerneError, galerne_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
