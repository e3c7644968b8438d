"""The FastAPI app factory. Nothing is loaded at import: :func:`create_app` builds the app
and its lifespan loads and verifies the artifact (start-up fails with a clear message
when it is missing or corrupt), then warms up in the background (``/ready`` is 503 until
that is done)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.errors import StartupError, install_error_handlers
from service.middleware import BodySizeLimitMiddleware, RequestContextMiddleware
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
    install_error_handlers(app)
    app.include_router(public)
    app.include_router(protected)
    app.include_router(admin)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes,
                       timeout_s=settings.body_timeout_ms / 1000.0)
    app.add_middleware(RequestContextMiddleware, metrics=service.metrics)  # outermost: added last
    return app
