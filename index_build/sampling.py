"""Training data for distillation: candidate pools, hard negatives, positives (from
qrels, or the teacher's top candidates when there are none) and batch composition
(random or TAS-Balanced)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Example:
    """One training query with its candidate pool and the teacher's score for each candidate."""

    qid: str
    query: str
    pool: np.ndarray          # corpus indices
    teacher: np.ndarray       # teacher score per pool entry
    positives: list[int]      # positions in ``pool``
    negatives: list[int]      # positions in ``pool`` (hard negatives)


def union_pools(rankings: Sequence[np.ndarray], extra: Sequence[Sequence[int]] | None = None) -> list[np.ndarray]:
    """Per query: the union of several rankings' candidates (first occurrence order)."""
    n = len(rankings[0])
    pools = []
    for i in range(n):
        seen: dict[int, None] = {}
        for r in rankings:
            for d in r[i]:
                if d >= 0:
                    seen.setdefault(int(d), None)
        if extra is not None:
            for d in extra[i]:
                seen.setdefault(int(d), None)
        pools.append(np.fromiter(seen, dtype=np.int64, count=len(seen)))
    return pools


def make_examples(qids: Sequence[str], queries: Sequence[str], pools: Sequence[np.ndarray],
                  teacher_scores: Sequence[np.ndarray], rankings: Sequence[np.ndarray], *,
                  positives: Sequence[set[int]] | None = None, neg_depth: int = 50,
                  teacher_positives: int = 3) -> list[Example]:
    """Build examples. Positives come from ``positives`` (qrels, corpus indices) when given
    for that query, else from the teacher's top ``teacher_positives`` candidates. Hard
    negatives: the top ``neg_depth`` of each miner ranking that are not positives."""
    out = []
    for i, qid in enumerate(qids):
        pool, t = pools[i], teacher_scores[i]
        pos_of = {int(d): j for j, d in enumerate(pool)}
        judged = positives[i] if positives is not None else set()
        if judged:
            pos = [pos_of[d] for d in judged if d in pos_of]
        else:
            pos = [int(j) for j in np.argsort(-t)[:teacher_positives]]
        if not pos:
            continue
        pos_set = set(pos)
        negs: dict[int, None] = {}
        for r in rankings:
            for d in r[i][:neg_depth]:
                j = pos_of.get(int(d))
                if j is not None and j not in pos_set:
                    negs.setdefault(j, None)
        if not negs:
            continue
        out.append(Example(qid, queries[i], pool, t, pos, list(negs)))
    return out


def sample_negatives(ex: Example, n: int, rng: random.Random, balanced: bool = False, bins: int = 4) -> list[int]:
    """``n`` negatives of ``ex`` (with replacement if fewer exist). ``balanced`` draws evenly
    from ``bins`` quantile bins of the teacher margin (TAS-Balanced)."""
    negs = ex.negatives
    if not balanced or len(negs) < bins:
        return rng.sample(negs, n) if len(negs) >= n else [rng.choice(negs) for _ in range(n)]
    t_pos = max(ex.teacher[p] for p in ex.positives)
    margins = np.array([t_pos - ex.teacher[j] for j in negs])
    edges = np.quantile(margins, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges, margins, side="right") - 1, 0, bins - 1)
    groups = [[negs[k] for k in np.flatnonzero(which == b)] for b in range(bins)]
    groups = [g for g in groups if g]
    return [rng.choice(groups[i % len(groups)]) for i in range(n)]


def batches(examples: list[Example], batch_size: int, rng: random.Random,
            clusters: np.ndarray | None = None) -> list[list[int]]:
    """Random batches, or TAS batches (each batch from one query cluster) when ``clusters``."""
    idx = list(range(len(examples)))
    if clusters is None:
        rng.shuffle(idx)
        return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    by_cluster: dict[int, list[int]] = {}
    for i in idx:
        by_cluster.setdefault(int(clusters[i]), []).append(i)
    out: list[list[int]] = []
    for members in by_cluster.values():
        rng.shuffle(members)
        out.extend(members[i : i + batch_size] for i in range(0, len(members), batch_size))
    rng.shuffle(out)
    return out


def cluster_queries(embeddings: np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
    """k-means cluster id per query (for TAS batch composition)."""
    from sklearn.cluster import KMeans

    n_clusters = max(1, min(n_clusters, len(embeddings)))
    return KMeans(n_clusters=n_clusters, n_init=1, random_state=seed).fit_predict(embeddings)
