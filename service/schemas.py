"""Request and response bodies (pydantic). Limits that depend on the settings (max ``k``,
query length, ...) are checked by :meth:`service.search.SearchEngine.resolve_options`, so
these models only fix shapes, types and fixed ranges."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from annotated_types import Ge, Le
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool

from models.retrieval import FirstStage, RerankMode, StageTimings


def _json_integer(value: Any) -> Any:
    """What JSON Schema calls an integer: ``5`` or ``5.0``, never ``true`` or ``"5"``."""
    if isinstance(value, bool | str):
        raise ValueError("Input should be a valid integer")
    return value


#: A positive integer as JSON Schema defines integers (``5`` or ``5.0``; no booleans, no strings).
PositiveInt = Annotated[int, Ge(1), BeforeValidator(_json_integer)]


class SearchOptionsBody(BaseModel):
    """Options shared by ``/search`` and ``/search/batch``.

    Query texts are plain strings here: the service checks them itself
    (:func:`service.search.validate_query`), so that a lone surrogate or an invisible query
    gets a message naming the problem; the OpenAPI schema states the same rules (see
    ``service.app``)."""

    model_config = ConfigDict(extra="forbid")

    k: PositiveInt | None = Field(None, description="Hits to return (default and maximum from the settings).")
    rerank: RerankMode | None = Field(None, description=(
        "Second stage: none, ColBERT MaxSim or the cross-encoder (default: the artifact's served "
        "default, see /info default_mode)."))
    candidates: PositiveInt | None = Field(None, description="First-stage depth handed to the reranker.")
    nprobe: Annotated[int, Ge(1), Le(1 << 16), BeforeValidator(_json_integer)] | None = Field(
        None, description="IVF lists probed (default: the index's).")
    include_text: StrictBool = Field(False, description="Return each hit's title and text.")
    first_stage: FirstStage | None = Field(None, description=(
        "dense (FAISS), sparse (BM25) or hybrid (fused) (default: the artifact's served default, "
        "see /info default_mode)."))

    def options(self) -> dict[str, Any]:
        """Keyword arguments for :meth:`service.search.SearchEngine.resolve_options`."""
        return {
            "k": self.k, "candidates": self.candidates, "rerank": self.rerank, "first_stage": self.first_stage,
            "nprobe": self.nprobe, "include_text": self.include_text,
        }


class SearchRequest(SearchOptionsBody):
    query: str = Field(description=(
        "The query text: at most max_query_chars characters, some of them visible (not only "
        "whitespace, control or zero-width characters), valid Unicode (no lone surrogates)."))

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"query": "what causes fever", "k": 10, "rerank": "colbert"}]},
    )


class BatchSearchRequest(SearchOptionsBody):
    queries: list[str] = Field(description=(
        "Queries (each as `query` of /search, at most max_batch_queries of them), encoded together."))


class HitOut(BaseModel):
    id: str
    score: float
    rank: int
    first_stage_score: float
    title: str | None = None
    text: str | None = None


class SearchResponse(BaseModel):
    hits: list[HitOut]
    timings_ms: StageTimings
    artifact_version: str
    rerank: RerankMode
    first_stage: FirstStage


class BatchSearchResponse(BaseModel):
    results: list[SearchResponse]
    timings_ms: StageTimings


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    artifact_dir: str | None = Field(None, min_length=1, description=(
        "Directory to load, under the configured artifact root (default: reload the current one)."))


class ReloadResponse(BaseModel):
    artifact_version: str
    previous_artifact_version: str | None
    artifact_dir: str
    n_docs: int
    load_ms: float


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    artifact_version: str


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    """The envelope of every error response."""

    error: ErrorDetail
