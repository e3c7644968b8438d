"""HTTP routes: translate requests to :class:`service.state.ServiceState` calls and back."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response

from models.retrieval import StageTimings
from service.errors import Forbidden, NotReady, Unauthorized
from service.middleware import request_id_of
from service.schemas import (
    BatchSearchRequest,
    BatchSearchResponse,
    ErrorResponse,
    HealthResponse,
    ReadyResponse,
    ReloadRequest,
    ReloadResponse,
    SearchRequest,
    SearchResponse,
)
from service.search import SearchResult
from service.state import ServiceState

#: Error statuses documented in the OpenAPI schema (all use the one envelope).
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in {
        400: "Body is not UTF-8 JSON", 401: "Missing or invalid API key", 408: "Body stalled",
        413: "Body too large", 422: "Invalid request",
        429: "Overloaded (see Retry-After)", 503: "Not ready", 504: "Timed out",
    }.items()
}


def get_service(request: Request) -> ServiceState:
    """The app's :class:`ServiceState` (set by the lifespan)."""
    return request.app.state.service  # type: ignore[no-any-return]


ServiceDep = Annotated[ServiceState, Depends(get_service)]


def _check_key(request: Request, expected: str, what: str) -> None:
    """Accept ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (compared in constant time)."""
    supplied = request.headers.get("x-api-key") or None  # an empty header does not hide a Bearer key
    if supplied is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        supplied = token.strip() if scheme.lower() == "bearer" else None
    if not supplied:
        raise Unauthorized(f"missing {what}: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    if not hmac.compare_digest(supplied.encode(), expected.encode()):
        raise Unauthorized(f"invalid {what}")


def require_api_key(request: Request, svc: ServiceDep) -> None:
    """When ``api_key`` is set, the search and info routes need it."""
    if svc.settings.api_key is not None:
        _check_key(request, svc.settings.api_key.get_secret_value(), "API key")


def require_admin_key(request: Request, svc: ServiceDep) -> None:
    """The admin routes are off (403) unless ``admin_key`` is set, and then need it."""
    if svc.settings.admin_key is None:
        raise Forbidden("the admin routes are disabled: set NRS_ADMIN_KEY to enable them")
    _check_key(request, svc.settings.admin_key.get_secret_value(), "admin key")


public = APIRouter()
protected = APIRouter(dependencies=[Depends(require_api_key)], responses=ERRORS)
admin = APIRouter(dependencies=[Depends(require_admin_key)], responses={
    **ERRORS, 403: {"model": ErrorResponse, "description": "Admin routes disabled (no NRS_ADMIN_KEY)"}})


def _timing_headers(response: Response, t: StageTimings) -> None:
    for name, value in (("total", t.total), ("queue", t.queue), ("encode", t.encode), ("ann", t.ann),
                        ("rerank", t.rerank)):
        response.headers[f"x-{name}-time"] = f"{value:.3f}"


def _result(r: SearchResult) -> SearchResponse:
    return SearchResponse(
        hits=r.hits,
        timings_ms=StageTimings(**r.timings.as_dict()),
        artifact_version=r.artifact_version,
        rerank=r.rerank,  # type: ignore[arg-type]
        first_stage=r.first_stage,  # type: ignore[arg-type]
    )


@protected.post("/search", response_model=SearchResponse, response_model_exclude_none=True)
async def search(body: SearchRequest, svc: ServiceDep, request: Request, response: Response) -> SearchResponse:
    """Dense / sparse / hybrid first stage, optional ColBERT or cross-encoder rerank."""
    outcome = await svc.search([body.query], body.options(), request_id_of(request.scope))
    _timing_headers(response, outcome.timings)
    return _result(outcome.results[0])


@protected.post("/search/batch", response_model=BatchSearchResponse, response_model_exclude_none=True)
async def search_batch(body: BatchSearchRequest, svc: ServiceDep, request: Request,
                       response: Response) -> BatchSearchResponse:
    """Several queries with the same options, encoded in one ONNX batch."""
    outcome = await svc.search(body.queries, body.options(), request_id_of(request.scope))
    _timing_headers(response, outcome.timings)
    return BatchSearchResponse(results=[_result(r) for r in outcome.results],
                               timings_ms=StageTimings(**outcome.timings.as_dict()))


@protected.get("/info")
async def info(svc: ServiceDep) -> dict[str, Any]:
    """Manifest summary: models, index parameters, document count, artifact version, limits."""
    out = svc.loaded_engine().info()
    s = svc.settings
    out["ready"] = svc.ready
    out["limits"] = {
        name: getattr(s, name)
        for name in ("default_k", "max_k", "default_candidates", "max_candidates", "max_cross_encoder_candidates",
                     "max_query_chars", "max_batch_queries", "max_body_bytes", "body_timeout_ms", "max_concurrency",
                     "max_queue", "request_timeout_ms", "batch_max_size", "batch_max_wait_ms")
    }
    return out


@admin.post("/admin/reload", response_model=ReloadResponse,
                responses={409: {"model": ErrorResponse, "description": "Reload in progress"}})
async def reload(svc: ServiceDep, body: ReloadRequest | None = None) -> ReloadResponse:
    """Load an artifact beside the served one, verify and warm it up, then swap it in."""
    return ReloadResponse(**await svc.reload(body.artifact_dir if body is not None else None))


@public.get("/health", response_model=HealthResponse)
async def health() -> HealthResponse:
    """Liveness: 200 while the process is up."""
    return HealthResponse()


@public.get("/ready", response_model=ReadyResponse, responses={503: {"model": ErrorResponse}})
async def ready(svc: ServiceDep) -> ReadyResponse:
    """Readiness: 503 until the artifact is loaded and warmed up."""
    if not svc.ready or svc.engine is None:
        raise NotReady(f"the service is not ready: {svc.not_ready_reason}")
    return ReadyResponse(artifact_version=svc.engine.artifact_version)


@public.get("/metrics", response_class=Response)
async def metrics(svc: ServiceDep) -> Response:
    """Prometheus text exposition of this app's registry."""
    body, content_type = svc.metrics.render()
    return Response(content=body, media_type=content_type)
