"""Request and response bodies (pydantic). Limits that depend on the settings (max ``k``,
query length, ...) are checked by :meth:`service.search.SearchEngine.resolve_options`, so
these models only fix shapes, types and fixed ranges."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from models.retrieval import FirstStage, RerankMode, StageTimings


class SearchOptionsBody(BaseModel):
    """Options shared by ``/search`` and ``/search/batch``."""

    model_config = ConfigDict(extra="forbid")

    k: StrictInt | None = Field(None, ge=1, description="Hits to return (default and maximum from the settings).")
    rerank: RerankMode = Field("none", description="Second stage: none, ColBERT MaxSim or the cross-encoder.")
    candidates: StrictInt | None = Field(None, ge=1, description="First-stage depth handed to the reranker.")
    nprobe: StrictInt | None = Field(None, ge=1, le=1 << 16, description="IVF lists probed (default: the index's).")
    include_text: StrictBool = Field(False, description="Return each hit's title and text.")
    first_stage: FirstStage = Field("dense", description="dense (FAISS), sparse (BM25) or hybrid (fused).")

    def options(self) -> dict[str, Any]:
        """Keyword arguments for :meth:`service.search.SearchEngine.resolve_options`."""
        return {
            "k": self.k, "candidates": self.candidates, "rerank": self.rerank, "first_stage": self.first_stage,
            "nprobe": self.nprobe, "include_text": self.include_text,
        }


class SearchRequest(SearchOptionsBody):
    query: str = Field(description="The query text (non-blank, at most max_query_chars characters).")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"query": "what causes fever", "k": 10, "rerank": "colbert"}]},
    )


class BatchSearchRequest(SearchOptionsBody):
    queries: list[str] = Field(description="Queries, encoded together in one ONNX batch.")


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

    artifact_dir: str | None = Field(None, description="Directory to load (default: reload the current one).")


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
