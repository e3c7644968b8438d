"""The FastAPI app factory. Nothing is loaded at import: :func:`create_app` builds the app
and its lifespan loads and verifies the artifact (start-up fails with a clear message
when it is missing or corrupt), then warms up in the background (``/ready`` is 503 until
that is done)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from models.text import VISIBLE_PATTERN
from service.errors import StartupError, install_error_handlers
from service.middleware import AdmissionGateMiddleware, BodySizeLimitMiddleware, RequestContextMiddleware
from service.routes import admin, protected, public
from service.settings import Settings
from service.state import ServiceState

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service app; ``settings`` default to the ``NRS_*`` environment.

    The app's state (``app.state.service``, a :class:`~service.state.ServiceState`) and
    its Prometheus registry belong to this app alone.
    """
    settings = settings if settings is not None else Settings()  # type: ignore[call-arg]
    service = ServiceState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await service.start()
        except StartupError as exc:
            logger.error("%s", exc)
            await service.stop()
            raise
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="Neural retrieval service",
        summary="Dense / sparse / hybrid first stage with ColBERT or cross-encoder reranking.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.settings = settings
    app.openapi = lambda: _openapi_with_limits(app, settings)  # type: ignore[method-assign]
    install_error_handlers(app)
    app.include_router(public)
    app.include_router(protected)
    app.include_router(admin)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes,
                       timeout_s=settings.body_timeout_ms / 1000.0)
    app.add_middleware(AdmissionGateMiddleware, admission=lambda: service.admission,
                       paths=("/search", "/search/batch"))
    app.add_middleware(RequestContextMiddleware, metrics=service.metrics)  # outermost: added last
    return app


def _openapi_with_limits(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The OpenAPI schema with this configuration's limits in it (query length, batch size,
    ``k`` and ``candidates`` maxima) and the visible-character rule for queries
    (:data:`models.text.VISIBLE_PATTERN`), so it says what this server accepts."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        models = schema["components"]["schemas"]
        query = models["SearchRequest"]["properties"]["query"]
        queries = models["BatchSearchRequest"]["properties"]["queries"]
        queries.update(minItems=1, maxItems=settings.max_batch_queries)
        for text in (query, queries["items"]):  # some visible character, at most max_query_chars
            text.update(minLength=1, maxLength=settings.max_query_chars, pattern=VISIBLE_PATTERN)
        ce_most = settings.max_cross_encoder_candidates
        for name in ("SearchRequest", "BatchSearchRequest"):
            for field, most in (("k", settings.max_k), ("candidates", settings.max_candidates)):
                for branch in models[name]["properties"][field].get("anyOf", []):
                    if branch.get("type") == "integer":
                        branch["maximum"] = most
            # a cross-encoder rerank reads at most max_cross_encoder_candidates documents
            capped = {"anyOf": [{"type": "integer", "maximum": ce_most}, {"type": "null"}]}
            models[name]["if"] = {"properties": {"rerank": {"const": "cross-encoder"}}, "required": ["rerank"]}
            models[name]["then"] = {"properties": {"k": capped, "candidates": capped}}
        app.openapi_schema = schema
    return app.openapi_schema
