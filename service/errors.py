"""One typed error hierarchy for the service and its one mapping to HTTP.

Every failure a client can see is a :class:`ServiceError` subclass carrying its HTTP
status, a short machine-readable ``type`` and a message; every error response has the
same envelope::

    {"error": {"type": "invalid_request", "message": "k=500 is above the maximum 100"}}

:func:`install_error_handlers` maps :class:`ServiceError`, FastAPI's
``RequestValidationError`` (422) and Starlette's ``HTTPException`` (404, 405, ...) to that
envelope. Unknown exceptions become a 500 with a generic message (see
:func:`internal_error_response`; the request-context middleware calls it and logs the
traceback), never a stack trace in the body.

This module imports FastAPI / Starlette only inside functions, so the pipeline
(:mod:`service.search`) can raise these errors without depending on the web framework.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from starlette.responses import JSONResponse

#: ``scope`` key under which the request-context middleware keeps the error type of a response.
ERROR_TYPE_SCOPE_KEY = "nrs.error_type"
#: Error type of a request whose client went away before an answer (counted with status 499,
#: nginx's "client closed request": not a server error).
CLIENT_CLOSED = "client_closed"


class ServiceError(Exception):
    """Base of every error the service reports to a client.

    Attributes
    ----------
    status_code
        HTTP status of the response.
    error_type
        Short machine-readable name, the ``error.type`` field of the envelope.
    headers
        Extra response headers (``Retry-After``, ``WWW-Authenticate``).
    """

    status_code: int = 500
    error_type: str = "internal_error"

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})


class InvalidRequest(ServiceError):
    """The request is well-formed JSON but asks for something invalid (422)."""

    status_code = 422
    error_type = "invalid_request"


class InvalidArtifact(ServiceError):
    """``/admin/reload`` was given an artifact that cannot be verified or loaded (422)."""

    status_code = 422
    error_type = "invalid_artifact"


class ReloadInProgress(ServiceError):
    """Another reload is running (409)."""

    status_code = 409
    error_type = "reload_in_progress"


class PayloadTooLarge(ServiceError):
    """Request body over ``max_body_bytes`` (413)."""

    status_code = 413
    error_type = "payload_too_large"


class BodyTimeout(ServiceError):
    """The request body stalled for longer than ``body_timeout_ms`` (408)."""

    status_code = 408
    error_type = "body_timeout"


class Unauthorized(ServiceError):
    """Missing or wrong API key (401)."""

    status_code = 401
    error_type = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ServiceError):
    """A route that this configuration turns off (403)."""

    status_code = 403
    error_type = "forbidden"


class Overloaded(ServiceError):
    """No free slot and the wait queue is full (429, with ``Retry-After``)."""

    status_code = 429
    error_type = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, int(retry_after_s)))})


class NotReady(ServiceError):
    """Artifacts are not loaded or the warm-up has not finished (503)."""

    status_code = 503
    error_type = "not_ready"

    def __init__(self, message: str = "the service is not ready yet (loading or warming up)") -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class RequestTimeout(ServiceError):
    """The request ran past ``request_timeout_ms`` (504)."""

    status_code = 504
    error_type = "timeout"


class StartupError(RuntimeError):
    """The service cannot start (bad settings, missing or corrupt artifact). Not an HTTP error."""


# -- the envelope -------------------------------------------------------------------------------
def error_body(error_type: str, message: str) -> dict[str, dict[str, str]]:
    """The JSON envelope of every error response.

    >>> error_body("overloaded", "try again")
    {'error': {'type': 'overloaded', 'message': 'try again'}}
    """
    return {"error": {"type": error_type, "message": message}}


def _response(
    scope: MutableMapping[str, Any] | None,
    status: int,
    error_type: str,
    message: str,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    from starlette.responses import JSONResponse

    if scope is not None:
        scope[ERROR_TYPE_SCOPE_KEY] = error_type
    return JSONResponse(error_body(error_type, message), status_code=status, headers=dict(headers or {}))


def service_error_response(exc: ServiceError, scope: MutableMapping[str, Any] | None = None) -> JSONResponse:
    """The response for a :class:`ServiceError` (records its type in ``scope`` for metrics/logs)."""
    return _response(scope, exc.status_code, exc.error_type, exc.message, exc.headers)


def internal_error_response(scope: MutableMapping[str, Any] | None = None) -> JSONResponse:
    """A generic 500: no exception text, no stack trace (the caller logs them)."""
    return _response(scope, 500, "internal_error", "internal server error; see the server log for this request id")


def format_validation_errors(errors: Sequence[Any]) -> str:
    """One line from pydantic/FastAPI validation errors: ``body.k: Input should be ...; ...``.

    >>> format_validation_errors([{"loc": ("body", "k"), "msg": "Input should be greater than 0"}])
    'body.k: Input should be greater than 0'
    """
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")
        msg = str(err.get("msg", "invalid value"))
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


_HTTP_TYPES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large", 415: "unsupported_media_type", 429: "overloaded"}


def install_error_handlers(app: FastAPI) -> None:
    """Register the one mapping from exceptions to the error envelope on ``app``."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def on_service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return service_error_response(exc, request.scope)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _response(request.scope, 422, "validation_error", format_validation_errors(exc.errors()))

    async def on_http_exception(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        error_type = _HTTP_TYPES.get(exc.status_code, "http_error")
        return _response(request.scope, exc.status_code, error_type, str(exc.detail), exc.headers)

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)
