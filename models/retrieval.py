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
  (:func:`models.fusion.fuse_ranked_lists`), cut to ``depth``. When the dense space is
  made of parts (:class:`DenseParts`: an asymmetric student searches its teacher's dense
  members' document vectors side by side), every candidate of either list is scored by
  BM25 and by each part, and those signals are z-scored and summed at the teacher's member
  weights (:func:`fuse_signals`): the teacher's own fusion, at the student's query cost.

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

from models.fusion import fuse_ranked_lists, fuse_scores, interpolate
from models.sparse_index import top_k

RerankMode = Literal["none", "colbert", "cross-encoder"]
FirstStage = Literal["dense", "sparse", "hybrid"]
#: the query encoders a request may run ("hybrid": the hybrid first stage's own, where the artifact has one)
QueryModel = Literal["dense", "hybrid", "colbert"]
RERANK_MODES: tuple[str, ...] = get_args(RerankMode)
FIRST_STAGES: tuple[str, ...] = get_args(FirstStage)

#: ``dense_search(query_vectors [n, dim], k) -> (scores [n, k], indices [n, k])``, padded with -1.
DenseSearch = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


class SparseSearcher(Protocol):
    """What the sparse first stage needs of BM25 (:class:`models.sparse_index.BM25Index`)."""

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def scores(self, query: str) -> np.ndarray: ...


#: ``doc_vectors(corpus indices [n]) -> [n, dim]``: the dense space's document vectors (exact
#: in the builder, the index's reconstructions in the service)
DocVectors = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class DenseParts:
    """A dense space made of parts: the columns ``bounds[j]:bounds[j + 1]`` of every vector
    are part ``j`` (a teacher member's embedding), weighted ``weights[j]`` within the
    hybrid's dense weight (the weights sum to 1).

    >>> p = DenseParts((0, 2, 3), (0.5, 0.5))
    >>> [s.tolist() for s in p.scores(np.array([1.0, 0.0, 2.0]), np.array([[3.0, 1.0, 1.0]]))]
    [[3.0], [2.0]]
    """

    bounds: tuple[int, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.bounds) != len(self.weights) + 1 or list(self.bounds) != sorted(self.bounds) or self.bounds[0]:
            raise ValueError(f"dense parts: bounds {self.bounds} do not split a vector into {len(self.weights)} parts")
        if any(w < 0 for w in self.weights) or not sum(self.weights) > 0:
            raise ValueError(f"dense parts: weights {self.weights} must be >= 0, not all 0")

    @classmethod
    def from_dims(cls, dims: Sequence[int], weights: Sequence[float]) -> DenseParts:
        total = float(sum(weights))
        return cls(tuple(int(x) for x in np.cumsum([0, *dims])), tuple(float(w) / total for w in weights))

    @property
    def dim(self) -> int:
        return self.bounds[-1]

    def scores(self, query: np.ndarray, docs: np.ndarray) -> list[np.ndarray]:
        """Each part's inner products of ``query`` [dim] with ``docs`` [n, dim]."""
        return [np.asarray(docs[:, a:b] @ query[a:b], np.float64) for a, b in zip(self.bounds, self.bounds[1:])]


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


def fuse_signals(candidates: np.ndarray, signals: Sequence[np.ndarray], weights: Sequence[float],
                 depth: int) -> Ranked:
    """One query's candidates ranked by the weighted sum of each signal's z-scores over them
    (:func:`models.fusion.fuse_scores`), cut to ``depth`` (ties by corpus index).

    >>> r = fuse_signals(np.array([4, 2, 9]), [np.array([1.0, 2.0, 3.0]), np.array([6.0, 4.0, 2.0])], [1, 1], 2)
    >>> r.indices.tolist(), r.scores.round(3).tolist()
    ([2, 4], [0.0, 0.0])
    """
    candidates = np.asarray(candidates, np.int64)
    fused = fuse_scores(signals, weights) if len(candidates) else np.zeros(0)
    order = np.lexsort((candidates, -fused))[:depth]
    return Ranked(candidates[order], fused[order])


def fuse_parts(dense: Ranked, sparse: Ranked, sparse_scores: np.ndarray, query: np.ndarray,
               doc_vectors: DocVectors, parts: DenseParts, weights: tuple[float, float], depth: int) -> Ranked:
    """The hybrid of one query over a dense space of parts: every candidate of either list
    scored by BM25 (``sparse_scores``, over the whole corpus) and by each part of the dense
    space, the signals z-scored over those candidates and summed at ``weights = (dense,
    sparse)``, the dense weight split over the parts by :attr:`DenseParts.weights`."""
    cands = np.union1d(dense.indices, sparse.indices)
    vectors = doc_vectors(cands) if len(cands) else np.zeros((0, parts.dim), np.float32)
    signals = [*parts.scores(query, vectors), np.asarray(sparse_scores, np.float64)[cands]]
    return fuse_signals(cands, signals, [weights[0] * w for w in parts.weights] + [weights[1]], depth)


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
    dense_parts: DenseParts | None = None,
    doc_vectors: DocVectors | None = None,
    timings: Sequence[StageTimings] | None = None,
) -> dict[str, list[Ranked]]:
    """Each requested first stage's top-``depth`` for every query, ``{stage: [Ranked per query]}``.

    Dense and sparse lists are computed once and shared with the hybrid. ``dense_vectors``
    holds one query vector per text (needed by ``dense`` and ``hybrid``), ``sparse`` is the
    BM25 index (needed by ``sparse`` and ``hybrid``). With ``dense_parts`` (and
    ``doc_vectors`` to score the candidates by), the hybrid fuses BM25 with each part
    (:func:`fuse_parts`), else the two lists (:func:`fuse_hybrid`). When ``timings`` is
    given (one per query), the dense search's time goes to ``ann`` (the batch's, in every
    query) and BM25 plus the fusion to ``sparse`` (per query).
    """
    if dense_parts is not None and doc_vectors is None:
        raise ValueError("a hybrid over dense parts needs the document vectors to score its candidates")
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
            if "hybrid" in wanted and dense_parts is not None:
                bm25 = sparse.scores(text)
                top_scores, top = top_k(bm25, depth)
                ranked = Ranked(top, top_scores)
                assert doc_vectors is not None and dense_vectors is not None
                hybrid_lists.append(fuse_parts(dense_lists[row], ranked, bm25, dense_vectors[row], doc_vectors,
                                               dense_parts, hybrid_weights, depth))
            else:
                ranked = _rows(*sparse.search([text], depth))[0]
                if "hybrid" in wanted:
                    hybrid_lists.append(fuse_hybrid(dense_lists[row], ranked, hybrid_weights, depth))
            sparse_lists.append(ranked)
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
    """The weights a served mode ranks with: the hybrid's ``(dense, sparse)`` fusion weights
    (and, over a dense space of parts, each part's share of the dense weight) and, per first
    stage, each reranker's interpolation weight."""

    hybrid: tuple[float, float] = (0.5, 0.5)
    dense_parts: DenseParts | None = None
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
        sections (``indexes.hybrid``, with its ``dense_parts`` where the hybrid fuses them,
        ``indexes.colbert.interpolation``, ``models.cross-encoder.interpolation``), each
        replaced by an explicit override when given; equal hybrid weights and plain reranking
        (1) where nothing was tuned."""
        tuned = indexes.get("hybrid", {})
        if hybrid is None:
            hybrid = (float(tuned.get("dense_weight", 0.5)), float(tuned.get("sparse_weight", 0.5)))
        parts = tuned.get("dense_parts")
        return cls(
            hybrid=hybrid,
            dense_parts=None if parts is None else DenseParts.from_dims(parts["dims"], parts["weights"]),
            colbert=_per_stage(colbert, indexes.get("colbert", {}).get("interpolation", {})),
            cross_encoder=_per_stage(cross_encoder, models.get("cross-encoder", {}).get("interpolation", {})),
        )


def _per_stage(configured: float | None, tuned: Mapping[str, Any]) -> dict[str, float]:
    if configured is not None:
        return dict.fromkeys(FIRST_STAGES, float(configured))
    weights = tuned.get("weights", {})
    return {stage: float(weights.get(stage, 1.0)) for stage in FIRST_STAGES}
