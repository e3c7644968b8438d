"""Pure ASGI middlewares: request context (id, access log, request metrics, last-resort 500),
the admission gate (429 before the body is read) and the request body size limit."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import (
    CLIENT_CLOSED,
    ERROR_TYPE_SCOPE_KEY,
    BodyTimeout,
    Overloaded,
    PayloadTooLarge,
    internal_error_response,
    service_error_response,
)
from service.metrics import ServiceMetrics
from service.state import RESERVATION, AdmissionControl

access_logger = logging.getLogger("service.access")
logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID_SCOPE_KEY = "nrs.request_id"
#: the route label of a request answered before routing (the admission gate sets it)
ROUTE_SCOPE_KEY = "nrs.route"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id_of(scope: Scope) -> str:
    """The id the middleware gave this request (``""`` outside it)."""
    return str(scope.get(REQUEST_ID_SCOPE_KEY, ""))


class RequestContextMiddleware:
    """Outermost app middleware.

    - takes ``X-Request-Id`` from the request (if it is short and plain) or makes one, and
      echoes it on the response;
    - answers an exception no handler mapped with a generic 500 envelope (the traceback
      goes to the log, never to the client);
    - counts the request in ``nrs_requests_total{route, status, error_type}`` and writes
      its server-side time in ``nrs_request_duration_seconds{route, status}`` (how fast a 429
      is answered under overload, for one), and writes one JSON access-log line; a request
      whose client left before any answer counts as status 499, error type ``client_closed``.
    """

    def __init__(self, app: ASGIApp, *, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        incoming = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-request-id"), "")
        request_id = incoming if _VALID_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope[REQUEST_ID_SCOPE_KEY] = request_id
        state: dict[str, Any] = {"status": 500, "started": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("unhandled error", extra={"request_id": request_id, "path": scope.get("path")})
            if state["started"]:
                raise  # too late for an error response; the server closes the connection
            await internal_error_response(scope)(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            route_path = getattr(route, "path", None) or scope.get(ROUTE_SCOPE_KEY) or "unmatched"
            error_type = str(scope.get(ERROR_TYPE_SCOPE_KEY, "")) or "none"
            if not state["started"] and error_type == CLIENT_CLOSED:
                state["status"] = 499
            total_ms = (time.perf_counter() - started) * 1000.0
            self.metrics.requests.labels(route_path, str(state["status"]), error_type).inc()
            self.metrics.request_latency.labels(route_path, str(state["status"])).observe(total_ms / 1000.0)
            access_logger.info(
                "request",
                extra={
                    "request_id": request_id, "method": scope.get("method"), "route": route_path,
                    "path": scope.get("path"), "status": state["status"], "total_ms": round(total_ms, 3),
                    "error_type": None if error_type == "none" else error_type,
                },
            )


class AdmissionGateMiddleware:
    """Admits or refuses a search request before its body is read, routed or validated
    (:meth:`AdmissionControl.reserve <service.state.AdmissionControl.reserve>`): a refusal is
    a 429 (``Retry-After``) answered at once; an admitted request holds its place in the wait
    queue until its slot takes it up (:data:`service.state.RESERVATION`), or hands it back if
    it ends first. Under overload most requests are refused: each refusal must cost the
    server far less than a search, or refusing them takes the CPU that the admitted requests
    need, and none is refused after its body has been read and validated."""

    def __init__(self, app: ASGIApp, *, admission: Callable[[], AdmissionControl | None],
                 paths: tuple[str, ...]) -> None:
        self.app = app
        self.admission = admission
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        control = None
        if scope["type"] == "http" and scope.get("method") == "POST" and scope.get("path") in self.paths:
            control = self.admission()
        if control is None:
            await self.app(scope, receive, send)
            return
        admitted = control.reserve()
        if isinstance(admitted, Overloaded):
            scope[ROUTE_SCOPE_KEY] = scope["path"]
            await service_error_response(admitted, scope)(scope, receive, send)
            return
        token = RESERVATION.set(admitted)
        try:
            await self.app(scope, receive, send)
        finally:
            RESERVATION.reset(token)
            control.cancel(admitted)  # a request that ended before its slot (no-op after it)


class BodySizeLimitMiddleware:
    """Reads the whole request body before the app sees it: 413 for a body over
    ``max_bytes`` (at once from ``Content-Length``, else while reading the stream), 408 when
    the next piece of the body takes longer than ``timeout_s``; a client that disconnects
    mid-body is recorded as ``client_closed``. The buffered body is then replayed to the app."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, timeout_s: float = 5.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def _too_large(self, size: str) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body of {size} bytes is over the limit of {self.max_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > self.max_bytes:
                await service_error_response(self._too_large(str(declared)), scope)(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except asyncio.TimeoutError:
                error = BodyTimeout(f"the request body stalled: no data for {self.timeout_s:g} s "
                                    f"after {size} bytes")
                await service_error_response(error, scope)(scope, receive, send)
                return
            if message["type"] != "http.request":  # the client left: nothing to answer
                scope[ERROR_TYPE_SCOPE_KEY] = CLIENT_CLOSED
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await service_error_response(self._too_large(f"more than {self.max_bytes}"), scope)(
                    scope, receive, send
                )
                return
            chunks.append(body)
            more = bool(message.get("more_body", False))
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
