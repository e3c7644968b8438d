"""The retrieval core: first stages, hybrid fusion, rerank interpolation and their weights.

The service (:class:`service.search.SearchEngine`) serves through these functions and the
builder's evaluation and weight tuning rank through them too, so a mode the builder
measures is, by construction, the mode the service serves. Torch-free.

A ranked list is a :class:`Ranked` pair ``(corpus indices, scores)``, best first. The
first stages are:

- ``dense``: the dense searcher's top-``depth`` (a FAISS index in the service, an exact
  search over the corpus vectors in the builder);
- ``sparse``: BM25's top-``depth``;
- ``hybrid``: the two fused by weighted per-query z-scores
  (:func:`models.fusion.fuse_ranked_lists`), cut to ``depth``.

A rerank interpolates the reranker's scores with the first stage's
(:func:`models.fusion.interpolate`) at a weight per first stage
(:class:`RetrievalWeights`) and orders candidates by the result (:func:`rerank_order`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, NamedTuple, Protocol, get_args

import numpy as np

from models.fusion import fuse_ranked_lists, interpolate

RerankMode = Literal["none", "colbert", "cross-encoder"]
FirstStage = Literal["dense", "sparse", "hybrid"]
QueryModel = Literal["dense", "colbert"]
RERANK_MODES: tuple[str, ...] = get_args(RerankMode)
FIRST_STAGES: tuple[str, ...] = get_args(FirstStage)

#: ``dense_search(query_vectors [n, dim], k) -> (scores [n, k], indices [n, k])``, padded with -1.
DenseSearch = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


class SparseSearcher(Protocol):
    """What the sparse first stage needs of BM25 (:class:`models.sparse_index.BM25Index`)."""

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class StageTimings:
    """Milliseconds spent per stage of one request.

    ``queue`` is time waiting for a permit and for the encode batch; ``tokenize`` and
    ``encode`` cover the query encoders (dense and ColBERT together); ``ann`` the dense
    search; ``sparse`` BM25 (and the fusion, for the hybrid first stage); ``rerank``
    ColBERT MaxSim or the cross-encoder; ``fetch`` document store reads; ``total`` the
    whole request. In a batch, stages run once for all queries (encode, ann) report the
    batch's time in every result.
    """

    queue: float = 0.0
    tokenize: float = 0.0
    encode: float = 0.0
    ann: float = 0.0
    sparse: float = 0.0
    rerank: float = 0.0
    fetch: float = 0.0
    total: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """``{stage: ms}`` rounded to microseconds."""
        return {f.name: round(getattr(self, f.name), 3) for f in fields(self)}

    @staticmethod
    def stage_names() -> tuple[str, ...]:
        """Every stage, ``total`` last."""
        return tuple(f.name for f in fields(StageTimings))


class Ranked(NamedTuple):
    """One query's candidates, best first: int64 corpus indices and their scores."""

    indices: np.ndarray
    scores: np.ndarray


def doc_full_text(title: str, text: str) -> str:
    """A document as every model in the project sees it.

    >>> doc_full_text("Title", "Body."), doc_full_text("", "Body.")
    ('Title. Body.', 'Body.')
    """
    return f"{title}. {text}" if title else text


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _rows(scores: np.ndarray, indices: np.ndarray) -> list[Ranked]:
    out = []
    for s, i in zip(scores, indices):
        keep = i >= 0
        out.append(Ranked(np.asarray(i[keep], dtype=np.int64), s[keep]))
    return out


def fuse_hybrid(dense: Ranked, sparse: Ranked, weights: tuple[float, float], depth: int) -> Ranked:
    """The hybrid first stage of one query: ``weights = (dense, sparse)`` on per-list z-scores,
    the union cut to ``depth`` (ties by corpus index).

    >>> r = fuse_hybrid(Ranked(np.array([3, 1]), np.array([0.9, 0.5])),
    ...                 Ranked(np.array([1, 7]), np.array([12.0, 4.0])), (0.8, 0.2), 2)
    >>> r.indices.tolist(), r.scores.round(3).tolist()
    ([3, 1], [0.6, -0.6])
    """
    fused = fuse_ranked_lists(
        [dict(zip(dense.indices.tolist(), dense.scores.tolist())),
         dict(zip(sparse.indices.tolist(), sparse.scores.tolist()))],
        weights, method="zscore",
    )[:depth]
    return Ranked(np.array([d for d, _ in fused], dtype=np.int64), np.array([s for _, s in fused], dtype=np.float64))


def first_stages(
    stages: Iterable[str],
    texts: Sequence[str],
    depth: int,
    *,
    dense_vectors: np.ndarray | None = None,
    dense_search: DenseSearch | None = None,
    sparse: SparseSearcher | None = None,
    hybrid_weights: tuple[float, float] = (0.5, 0.5),
    timings: Sequence[StageTimings] | None = None,
) -> dict[str, list[Ranked]]:
    """Each requested first stage's top-``depth`` for every query, ``{stage: [Ranked per query]}``.

    Dense and sparse lists are computed once and shared with the hybrid. ``dense_vectors``
    holds one query vector per text (needed by ``dense`` and ``hybrid``), ``sparse`` is the
    BM25 index (needed by ``sparse`` and ``hybrid``). When ``timings`` is given (one per
    query), the dense search's time goes to ``ann`` (the batch's, in every query) and BM25
    plus the fusion to ``sparse`` (per query).
    """
    wanted = list(dict.fromkeys(stages))
    unknown = [s for s in wanted if s not in FIRST_STAGES]
    if unknown:
        raise ValueError(f"unknown first stage(s) {unknown}; expected some of {FIRST_STAGES}")
    n = len(texts)
    out: dict[str, list[Ranked]] = {}
    dense_lists: list[Ranked] = []
    if "dense" in wanted or "hybrid" in wanted:
        if dense_vectors is None or dense_search is None or len(dense_vectors) != n:
            raise ValueError("the dense first stage needs a dense searcher and one query vector per query")
        started = time.perf_counter()
        dense_lists = _rows(*dense_search(dense_vectors, depth))
        ann_ms = _ms(started)
        for t in timings or ():
            t.ann = ann_ms
        if "dense" in wanted:
            out["dense"] = dense_lists
    if "sparse" in wanted or "hybrid" in wanted:
        if sparse is None:
            raise ValueError("the sparse and hybrid first stages need a BM25 index")
        sparse_lists, hybrid_lists = [], []
        for row, text in enumerate(texts):
            started = time.perf_counter()
            ranked = _rows(*sparse.search([text], depth))[0]
            sparse_lists.append(ranked)
            if "hybrid" in wanted:
                hybrid_lists.append(fuse_hybrid(dense_lists[row], ranked, hybrid_weights, depth))
            if timings is not None:
                timings[row].sparse = _ms(started)
        if "sparse" in wanted:
            out["sparse"] = sparse_lists
        if "hybrid" in wanted:
            out["hybrid"] = hybrid_lists
    return out


def rerank_order(
    first_scores: np.ndarray, rerank_scores: np.ndarray, weight: float, k: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Final scores of one query's candidates (the reranker's interpolated with the first
    stage's at ``weight``; 1 = the reranker alone) and the candidate positions of the top
    ``k`` (all when ``None``), best first, ties in first-stage order.

    >>> final, order = rerank_order(np.array([3.0, 2.0, 1.0]), np.array([0.1, 0.4, 0.3]), 1.0, k=2)
    >>> final.tolist(), order.tolist()
    ([0.1, 0.4, 0.3], [1, 2])
    """
    final = interpolate(first_scores, rerank_scores, weight)
    order = np.argsort(-np.asarray(final), kind="stable")
    return final, order if k is None else order[:k]


@dataclass(frozen=True)
class RetrievalWeights:
    """The weights a served mode ranks with: the hybrid's ``(dense, sparse)`` fusion weights and,
    per first stage, each reranker's interpolation weight."""

    hybrid: tuple[float, float] = (0.5, 0.5)
    colbert: Mapping[str, float] = field(default_factory=lambda: dict.fromkeys(FIRST_STAGES, 1.0))
    cross_encoder: Mapping[str, float] = field(default_factory=lambda: dict.fromkeys(FIRST_STAGES, 1.0))

    def rerank_weight(self, mode: str, stage: str) -> float:
        """Weight of reranker ``mode``'s scores after first stage ``stage`` (1 when untuned)."""
        table = self.colbert if mode == "colbert" else self.cross_encoder
        return float(table.get(stage, 1.0))

    @classmethod
    def from_manifest(
        cls,
        indexes: Mapping[str, Any],
        models: Mapping[str, Any],
        *,
        hybrid: tuple[float, float] | None = None,
        colbert: float | None = None,
        cross_encoder: float | None = None,
    ) -> RetrievalWeights:
        """The builder's dev-tuned weights from a manifest's ``indexes`` and ``models``
        sections (``indexes.hybrid``, ``indexes.colbert.interpolation``,
        ``models.cross-encoder.interpolation``), each replaced by an explicit override when
        given; equal hybrid weights and plain reranking (1) where nothing was tuned."""
        if hybrid is None:
            tuned = indexes.get("hybrid", {})
            hybrid = (float(tuned.get("dense_weight", 0.5)), float(tuned.get("sparse_weight", 0.5)))
        return cls(
            hybrid=hybrid,
            colbert=_per_stage(colbert, indexes.get("colbert", {}).get("interpolation", {})),
            cross_encoder=_per_stage(cross_encoder, models.get("cross-encoder", {}).get("interpolation", {})),
        )


def _per_stage(configured: float | None, tuned: Mapping[str, Any]) -> dict[str, float]:
    if configured is not None:
        return dict.fromkeys(FIRST_STAGES, float(configured))
    weights = tuned.get("weights", {})
    return {stage: float(weights.get(stage, 1.0)) for stage in FIRST_STAGES}
