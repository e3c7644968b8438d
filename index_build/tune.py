"""Choices made on the dev slice (held-out training queries, or held-out pseudo-queries on a
label-free build; never test judgments): the hybrid's fusion weight, each reranker's
interpolation weight per first stage, and the mode served by default. Each is made once per
build and exported models, and recorded in the artifact's manifest."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from index_build.context import BuildContext
from index_build.metrics import one_se_choice, per_query_ndcg
from models.retrieval import FIRST_STAGES

#: fusion and interpolation weights tried on the dev slice
WEIGHT_GRID = [round(0.1 * i, 1) for i in range(11)]
#: the prefix of a dense model's rows in the results (``dense``/``asym-dense``, ``hybrid``/``asym-hybrid``)
DENSE_ROW_PREFIX = {"dense": "", "asymmetric": "asym-"}


def _once(ctx: BuildContext, key: tuple, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    if key not in ctx.tuning:
        ctx.tuning[key] = compute()
    return ctx.tuning[key]


#: how many of the teacher's best candidates judge a dev query when ``evaluate.dev_judge`` is "teacher"
TEACHER_JUDGED = 10


def tuning_qrels(ctx: BuildContext, dev: dict[str, Any]) -> dict[str, dict[str, int]]:
    """The judgments the tuning choices are made on: the dev slice's own (held-out train
    qrels, each pseudo-query's source document, or for logged queries the teacher's
    ranking, :func:`teacher_judged`), or on a pseudo-query slice with
    ``evaluate.dev_judge = "teacher"`` the teacher's ranking of each dev query's pool: its
    top :data:`TEACHER_JUDGED` graded by rank (10 for the first, 1 for the tenth), the source
    document graded as the first. Source judgments reward whatever finds the sentence a
    pseudo-query was cut from, which is BM25's strength by construction; the teacher's
    judge the modes by how close they come to the ranking that the students are distilled
    to reproduce, BM25 one member of it."""
    if not ctx.pseudo_dev or ctx.cfg.evaluate.dev_judge == "source":
        return ctx.dev_qrels(dev)
    judged = teacher_judged(ctx, dev["qids"], dev["queries"], dev["pools"])
    return {qid: graded | dict.fromkeys(dev["qrels"][qid], TEACHER_JUDGED) for qid, graded in judged.items()}


def teacher_judged(ctx: BuildContext, qids: Sequence[str], texts: Sequence[str],
                   pools: Sequence[np.ndarray]) -> dict[str, dict[str, int]]:
    """Per query, the teacher's top :data:`TEACHER_JUDGED` of its pool graded by rank (10
    for the first, 1 for the tenth)."""
    from index_build.teachers import cached_teacher_scores

    scores = cached_teacher_scores(ctx.teacher, ctx.cache, list(texts), list(pools), progress=ctx.progress)
    doc_ids = ctx.collection.doc_ids
    qrels = {}
    for qid, pool, s in zip(qids, pools, scores):
        top = np.asarray(pool)[np.argsort(-s, kind="stable")[:TEACHER_JUDGED]]
        qrels[qid] = {doc_ids[int(d)]: TEACHER_JUDGED - r for r, d in enumerate(top)}
    return qrels


def _dev_slice(ctx: BuildContext) -> str:
    if not ctx.label_free:
        return "train dev slice"
    if not ctx.pseudo_dev:
        return "query-log dev slice judged by the teacher"
    return f"pseudo-query dev slice judged by the {ctx.cfg.evaluate.dev_judge}"


def mode_row(ctx: BuildContext, mode: Mapping[str, str]) -> str:
    """The results row that measures served mode ``{"first_stage", "rerank"}``."""
    prefix = DENSE_ROW_PREFIX[ctx.served_dense]
    stage, rerank = mode["first_stage"], mode["rerank"]
    if rerank == "none":
        return "bm25" if stage == "sparse" else f"{prefix}{stage}"
    return f"{stage}+{rerank}"


def choose_default(ctx: BuildContext, depth: int = 100) -> dict[str, Any]:
    """The mode ``/search`` serves when a request names none: among the cheap modes (every
    first stage, alone or reranked by ColBERT; the cross-encoder costs seconds a query on
    CPU and is never a default), the hybrid first stage alone (the served dense model
    where there is no BM25) unless another mode beats it on the dev slice by more than one
    standard error (:func:`index_build.metrics.one_se_choice`), then the best of those.
    On a pseudo-query dev slice (:attr:`BuildContext.pseudo_dev`) BM25 alone is no candidate:
    its queries are cut from the documents, so BM25 finds their source by construction (as :func:`tune_hybrid` keeps its
    prior for the same reason), while on real queries it can be the weakest signal.
    Never on test judgments. Computed once per build and exported models."""
    memo = ("default", depth, *[ctx.export_key(k) for k in ctx.cfg.students.kinds])
    return _once(ctx, memo, lambda: _choose_default(ctx, depth))


def _choose_default(ctx: BuildContext, depth: int) -> dict[str, Any]:
    kinds = ctx.cfg.students.kinds
    prior = ("hybrid", "none")
    dev = ctx.load_mined()["dev"]
    if not dev["qids"]:
        return {"first_stage": prior[0], "rerank": prior[1], "chosen_on": "default (no dev queries)"}
    qrels, qids = tuning_qrels(ctx, dev), dev["qids"]
    hybrid_weight = tune_hybrid(ctx, depth)["dense_weight"]
    firsts = ctx.first_stage_lists(dev["queries"], ctx.dense_queries(dev["queries"]), hybrid_weight, depth,
                                   hybrid_queries=ctx.hybrid_queries(dev["queries"]))
    # pseudo-queries favour BM25 by construction: judged on them it is not a default
    alone = [s for s in FIRST_STAGES if not (ctx.pseudo_dev and s == "sparse")]
    per_mode = {(stage, "none"): per_query_ndcg(qrels, ctx.run_of(qids, firsts[stage]), qids)
                for stage in alone}
    if "colbert" in kinds:
        weights = tune_rerank_weights(ctx, "colbert", hybrid_weight, depth)["weights"]
        reranked = {stage: firsts[stage] for stage in ("dense", "hybrid")}
        scores = rerank_scores(ctx, "colbert", dev["queries"], reranked)
        for stage, lists in reranked.items():
            per_mode[(stage, "colbert")] = per_query_ndcg(
                qrels, ctx.run_of(qids, lists, scores[stage], weights[stage]), qids)
    stage, rerank = one_se_choice(per_mode, prior, lambda m, p: float(m != p))
    return {"first_stage": stage, "rerank": rerank,
            "chosen_on": _dev_slice(ctx),
            "selection": "one-standard-error rule toward hybrid without rerank",
            **({"not_candidates": {"sparse+none": "pseudo-queries favour BM25 by construction"}}
               if ctx.pseudo_dev else {}),
            "dev_nDCG@10": {f"{s}+{r}": round(float(v.mean()), 4) for (s, r), v in per_mode.items()}}


def tune_hybrid(ctx: BuildContext, depth: int = 100, kind: str | None = None) -> dict[str, Any]:
    """Choose the dense weight of the hybrid (z-score fusion of dense and BM25 top-``depth``)
    on the dev slice of held-out train queries; never on test judgments. The weight is the
    one closest to the prior among those within one standard error of the best
    (:func:`index_build.metrics.one_se_choice`), so a single dev query does not pull it to
    an extreme. The prior is the teacher's weights for the asymmetric student (its hybrid is
    the teacher's fusion), equal weights for the full-tower one. A pseudo-query dev slice
    keeps the prior: its queries are extracted from the documents and favour BM25 by
    construction (BM25 finds their source at rank 1).
    ``kind``: the dense model fused (default: the served one, :attr:`BuildContext.served_dense`). Computed once per
    build and exported dense model (evaluation, each TREC DL pool and the artifact stage
    all need it)."""
    kind = kind or ctx.served_dense
    memo = ("hybrid", depth, kind, ctx.export_key(kind))
    return _once(ctx, memo, lambda: _tune_hybrid(ctx, depth, kind))


def _tune_hybrid(ctx: BuildContext, depth: int, kind: str) -> dict[str, Any]:
    # the asymmetric student's hybrid fuses BM25 with each part of the teacher's space, the
    # teacher's own weights its prior; the full-tower student's fuses two lists, equal weights its prior
    fusion = ctx.teacher_fusion if kind == "asymmetric" else None
    prior = 0.5 if fusion is None else fusion["dense_share"]
    about = ({} if fusion is None else
             {"dense_parts": fusion["record"], "prior": "the teacher's weights of its members"})
    dev = ctx.load_mined()["dev"]
    if not dev["qids"] or ctx.pseudo_dev:
        # pseudo-queries are cut from the documents: BM25 finds their source by construction,
        # so on them more BM25 always looks better, whoever judges; keep the prior
        why = "default (no dev queries)" if not dev["qids"] else "not tuned: pseudo-queries favour BM25 by construction"
        return {"method": "zscore", "dense_weight": prior, "sparse_weight": round(1.0 - prior, 4), "depth": depth,
                **about, "tuned_on": why}
    qrels = tuning_qrels(ctx, dev)
    queries = ctx.hybrid_queries(dev["queries"]) if kind == ctx.served_dense else None
    if queries is None:
        queries = ctx.dense_queries(dev["queries"], kind)
    per_query: dict[float, np.ndarray] = {}
    for w in sorted({*WEIGHT_GRID, prior}):
        hybrid = ctx.first_stage_lists(dev["queries"], queries, w, depth, kind, stages=("hybrid",))["hybrid"]
        per_query[w] = per_query_ndcg(qrels, ctx.run_of(dev["qids"], hybrid), dev["qids"])
    best = one_se_choice(per_query, prior=prior)
    return {"method": "zscore", "dense_weight": best, "sparse_weight": round(1.0 - best, 4),
            "depth": depth, **about, "tuned_on": _dev_slice(ctx),
            "selection": f"one-standard-error rule toward the prior ({prior})",
            "dev_nDCG@10": {str(w): round(float(v.mean()), 4) for w, v in per_query.items()}}


def tune_rerank_weights(ctx: BuildContext, kind: str, hybrid_weight: float, depth: int = 100) -> dict[str, Any]:
    """Per first stage, the weight of reranker ``kind``'s score (``colbert`` or
    ``cross-encoder``) against the first stage's score in the final ranking
    (:func:`models.fusion.interpolate`; 1 = plain reranking, 0 = the first stage alone),
    chosen on the dev slice like :func:`tune_hybrid` with the first stage alone as the
    prior: a reranker that does not beat its first stage on dev by more than one standard
    error gets weight 0 (``no_dev_gain`` lists those first stages). Never on test judgments.
    Computed once per build and exported models (the evaluate and artifact stages both
    need it)."""
    memo = ("rerank", kind, hybrid_weight, depth, ctx.export_key(ctx.served_dense), ctx.export_key(kind))
    return _once(ctx, memo, lambda: _tune_rerank_weights(ctx, kind, hybrid_weight, depth))


def _tune_rerank_weights(ctx: BuildContext, kind: str, hybrid_weight: float, depth: int) -> dict[str, Any]:
    dev = ctx.load_mined()["dev"]
    stages = ("dense", "sparse", "hybrid")
    if not dev["qids"]:
        return {"method": "zscore", "weights": dict.fromkeys(stages, 1.0), "depth": depth,
                "tuned_on": "default (no dev queries)"}
    qrels = tuning_qrels(ctx, dev)
    firsts = ctx.first_stage_lists(dev["queries"], ctx.dense_queries(dev["queries"]), hybrid_weight, depth,
                                   hybrid_queries=ctx.hybrid_queries(dev["queries"]))
    scores = rerank_scores(ctx, kind, dev["queries"], firsts)
    weights, curves = {}, {}
    for stage in stages:
        per_query = {a: per_query_ndcg(qrels, ctx.run_of(dev["qids"], firsts[stage], scores[stage], a),
                                       dev["qids"])
                     for a in WEIGHT_GRID}
        weights[stage] = one_se_choice(per_query, prior=0.0)
        curves[stage] = {str(a): round(float(v.mean()), 4) for a, v in per_query.items()}
    return {"method": "zscore", "weights": weights, "depth": depth,
            "tuned_on": _dev_slice(ctx),
            "selection": "one-standard-error rule toward the first stage alone (0.0)",
            # first stages after which the reranker did not beat the first stage alone on dev
            "no_dev_gain": [stage for stage, w in weights.items() if w == 0.0],
            "dev_nDCG@10": curves}


def rerank_scores(ctx: BuildContext, kind: str, texts: list[str],
                  firsts: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]]) -> dict[str, list[np.ndarray]]:
    """Reranker ``kind``'s score of every candidate of every first stage in ``firsts`` (as
    from :meth:`BuildContext.first_stage_lists`), as served: ColBERT with the query tokens of
    each stage's own pass (:meth:`BuildContext.colbert_query_source`). Each query's candidates
    are scored once per query side, over the union of the lists it scores (the stages overlap
    heavily, and a cross-encoder pass is costly)."""
    if kind not in ("colbert", "cross-encoder"):
        raise ValueError(f"no reranker {kind!r}")
    by_side: dict[str, list[str]] = {}
    for stage in firsts:
        by_side.setdefault(ctx.colbert_query_source(stage) if kind == "colbert" else kind, []).append(stage)
    out: dict[str, list[np.ndarray]] = {}
    for side, stages in by_side.items():
        unions = [np.unique(np.concatenate([firsts[s][r][0] for s in stages] + [np.zeros(0, np.int64)]))
                  for r in range(len(texts))]
        if kind == "colbert":
            scored = ctx.colbert_scores(texts, [(u, np.zeros(len(u))) for u in unions], source=side)
        else:
            scored = ctx.cross_encoder_scores(texts, [[ctx.corpus_texts[int(j)] for j in u] for u in unions])
        for stage in stages:
            out[stage] = [scored[r][np.searchsorted(unions[r], cands)] for r, (cands, _) in enumerate(firsts[stage])]
    return {stage: out[stage] for stage in firsts}

