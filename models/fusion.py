"""Per-query score normalization and fusion of ranked lists (teacher ensembles and the
hybrid first stage)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

Norm = Literal["zscore", "minmax", "none"]


def normalize(scores: np.ndarray, method: Norm = "zscore", ref: np.ndarray | None = None) -> np.ndarray:
    """Normalize one query's scores; statistics come from ``ref`` (default: ``scores``).

    >>> normalize(np.array([1.0, 2.0, 3.0])).round(4).tolist()
    [-1.2247, 0.0, 1.2247]
    >>> normalize(np.array([1.0, 2.0, 3.0]), "minmax").tolist()
    [0.0, 0.5, 1.0]
    """
    scores = np.asarray(scores, dtype=np.float64)
    ref = scores if ref is None else np.asarray(ref, dtype=np.float64)
    if method == "none" or ref.size == 0:
        return scores
    if method == "zscore":
        std = ref.std()
        return (scores - ref.mean()) / (std if std > 1e-12 else 1.0)
    if method == "minmax":
        lo, hi = ref.min(), ref.max()
        return (scores - lo) / (hi - lo if hi - lo > 1e-12 else 1.0)
    raise ValueError(f"unknown normalization {method!r}")


def fuse_scores(
    member_scores: Sequence[np.ndarray], weights: Sequence[float], method: Norm = "zscore"
) -> np.ndarray:
    """Weighted sum of per-member normalized scores over the same candidate list.

    >>> fuse_scores([np.array([1.0, 3.0]), np.array([10.0, 0.0])], [1.0, 1.0]).tolist()
    [0.0, 0.0]
    """
    if len(member_scores) != len(weights):
        raise ValueError(f"{len(member_scores)} score arrays but {len(weights)} weights")
    total = np.zeros_like(np.asarray(member_scores[0], dtype=np.float64))
    for s, w in zip(member_scores, weights):
        total += w * normalize(s, method)
    return total


def fuse_ranked_lists(
    lists: Sequence[Mapping[int, float]],
    weights: Sequence[float],
    *,
    method: Literal["zscore", "minmax", "rrf"] = "zscore",
    rrf_k: int = 60,
    missing: Literal["min", "zero"] = "min",
) -> list[tuple[int, float]]:
    """Fuse several ``{doc: score}`` candidate lists of one query into one ranking.

    For ``zscore``/``minmax``, each list is normalized on its own scores; a document
    absent from a list gets that list's minimum normalized score (``missing="min"``).
    For ``rrf``, score = sum_i w_i / (rrf_k + rank_i) over the lists holding the doc.

    >>> fuse_ranked_lists([{1: 3.0, 2: 1.0}, {2: 5.0, 3: 4.0}], [1, 1], method="rrf", rrf_k=0)
    [(2, 1.5), (1, 1.0), (3, 0.5)]
    """
    if len(lists) != len(weights):
        raise ValueError(f"{len(lists)} lists but {len(weights)} weights")
    docs = sorted({d for lst in lists for d in lst})
    fused = dict.fromkeys(docs, 0.0)
    for lst, w in zip(lists, weights):
        if not lst:
            continue
        if method == "rrf":
            ranked = sorted(lst.items(), key=lambda kv: -kv[1])
            for rank, (d, _) in enumerate(ranked, start=1):
                fused[d] += w / (rrf_k + rank)
            continue
        keys = list(lst)
        norm = normalize(np.array([lst[d] for d in keys]), method)
        floor = float(norm.min()) if missing == "min" else 0.0
        values = dict(zip(keys, norm.tolist()))
        for d in docs:
            fused[d] += w * values.get(d, floor)
    return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))


def interpolate(first_stage: np.ndarray, rerank: np.ndarray, rerank_weight: float,
                method: Norm = "zscore") -> np.ndarray:
    """Final scores of one query's reranked candidates: ``rerank_weight * norm(rerank) +
    (1 - rerank_weight) * norm(first_stage)``, each normalized over the candidates. A weight
    of 1 returns the reranker's scores unchanged (plain reranking).

    >>> interpolate(np.array([3.0, 2.0, 1.0]), np.array([0.1, 0.4, 0.3]), 0.25).round(3).tolist()
    [0.584, 0.267, -0.852]
    >>> interpolate(np.array([3.0, 1.0]), np.array([0.2, 0.4]), 1.0).tolist()
    [0.2, 0.4]
    """
    if not 0.0 <= rerank_weight <= 1.0:
        raise ValueError(f"rerank_weight must be in [0, 1], got {rerank_weight}")
    rerank = np.asarray(rerank)
    if len(first_stage) != len(rerank):
        raise ValueError(f"{len(first_stage)} first-stage scores but {len(rerank)} rerank scores")
    if rerank_weight == 1.0:
        return rerank
    return fuse_scores([rerank, np.asarray(first_stage)], [rerank_weight, 1.0 - rerank_weight], method)
