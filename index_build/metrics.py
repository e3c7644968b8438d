"""Retrieval metrics (``ir-measures``), per-query scores for dev-slice choices, and result tables."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import ir_measures
import numpy as np
from ir_measures import RR, R, nDCG

from models.artifacts import write_json_atomic

__all__ = ["Scores", "markdown_table", "metrics", "one_se_choice", "per_query_ndcg", "run_from_arrays",
           "write_json_atomic"]

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]
K = TypeVar("K", bound=Any)


class Scores(dict[str, float]):
    """A system's aggregate metrics (a plain mapping, as the results files hold them) that also
    keeps its nDCG@10 per judged query (:attr:`per_query`, query id -> value, 0 for a query
    the run misses): paired comparisons between systems scored on the same queries
    (``benchmarks/significance.py``) read them from each build's ``<name>.per-query.json``."""

    def __init__(self, values: Mapping[str, float], per_query: Mapping[str, float]) -> None:
        super().__init__(values)
        self.per_query = dict(per_query)

    def copy(self) -> Scores:
        return Scores(self, self.per_query)


def metrics(qrels: Qrels, run: Run, *, min_rel: int = 1) -> Scores:
    """nDCG@10 (graded), RR@10 and R@100 (relevant = grade >= ``min_rel``), only over judged
    queries; with the nDCG@10 of each judged query (:class:`Scores`)."""
    run = {q: docs for q, docs in run.items() if q in qrels}
    measures = {"nDCG@10": nDCG @ 10, "RR@10": RR(rel=min_rel) @ 10, "R@100": R(rel=min_rel) @ 100}
    # one evaluation pass; the aggregates are the means over the judged queries the run holds
    # (as ir_measures.calc_aggregate), the per-query nDCG@10 counts a judged query it misses as 0
    got: dict[Any, dict[str, float]] = {m: {} for m in measures.values()}
    for r in ir_measures.iter_calc(list(measures.values()), qrels, run):
        got[r.measure][r.query_id] = float(r.value)
    agg = {name: round(float(np.mean(list(got[m].values()))), 4) if got[m] else 0.0 for name, m in measures.items()}
    ndcg = got[measures["nDCG@10"]]
    per_query = {q: round(ndcg.get(q, 0.0), 6) for q in sorted(qrels)}
    return Scores(agg, per_query)


def per_query_ndcg(qrels: Qrels, run: Run, queries: list[str]) -> np.ndarray:
    """nDCG@10 of each of ``queries`` (0 for a judged query the run misses), in that order."""
    got = {m.query_id: float(m.value) for m in ir_measures.iter_calc([nDCG @ 10], qrels, run)}
    return np.array([got.get(q, 0.0) for q in queries])


def one_se_choice(per_query: Mapping[K, np.ndarray], prior: K,
                  distance: Callable[[K, K], float] | None = None) -> K:
    """The setting closest to ``prior`` among those not worse than the best one by more than
    one standard error (the "one-standard-error rule" of model selection, Breiman et al. 1984;
    Hastie et al., ESL 7.10), measured on paired per-query scores: setting ``w`` qualifies
    when ``mean(best - w) <= std(best - w) / sqrt(n)``. On a small or saturated dev slice,
    where a single query separates the settings, this keeps the prior instead of an extreme.
    ``distance(w, prior)`` orders the qualifying settings (default ``|w - prior|``, for
    numbers); ties go to the higher mean.

    >>> one_se_choice({0.0: np.array([1.0, 1.0, 1.0, 1.0]), 0.5: np.array([1.0, 1.0, 1.0, 0.5])}, 0.5)
    0.5
    >>> one_se_choice({0.0: np.array([1.0, 1.0, 1.0, 1.0]), 0.5: np.array([0.5, 0.5, 0.5, 0.5])}, 0.5)
    0.0
    >>> same = lambda a, b: float(a != b)
    >>> one_se_choice({"a": np.array([1.0, 0.5, 1.0]), "b": np.array([1.0, 0.5, 0.9])}, "b", same)
    'b'
    """
    if not per_query:
        raise ValueError("no settings to choose from")
    dist: Callable[[K, K], float] = distance or (lambda w, p: abs(w - p))  # type: ignore[operator]
    means = {w: float(np.mean(v)) for w, v in per_query.items()}
    best = max(means, key=lambda w: (means[w], -dist(w, prior)))
    qualifying = []
    for w, scores in per_query.items():
        diff = per_query[best] - scores
        se = float(np.std(diff, ddof=1)) / np.sqrt(len(diff)) if len(diff) > 1 else 0.0
        if float(np.mean(diff)) <= se + 1e-12:
            qualifying.append(w)
    return min(qualifying, key=lambda w: (dist(w, prior), -means[w]))


def run_from_arrays(qids: list[str], doc_ids: list[str], scores, indices) -> Run:
    """A run from ``[n_queries, k]`` score and corpus-index arrays (index -1 = empty slot)."""
    run: Run = {}
    for r, qid in enumerate(qids):
        run[qid] = {doc_ids[int(j)]: float(s) for s, j in zip(scores[r], indices[r]) if j >= 0}
    return run


def markdown_table(systems: dict[str, dict[str, float]], title: str) -> str:
    cols = ["nDCG@10", "RR@10", "R@100"]
    lines = [f"### {title}", "", "| system | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in systems.items():
        lines.append(f"| {name} | " + " | ".join(f"{m.get(c, float('nan')):.4f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"
