"""The evaluate stage: every system on the collection's test split (full-corpus first
stages, reranking as the service reranks, the served default mode), and on TREC DL pools by
reranking their BM25 runs; the build's results files."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from index_build.context import BuildContext
from index_build.data import Collection, load_collection, query_key
from index_build.metrics import Run, Scores, markdown_table, metrics, run_from_arrays, write_json_atomic
from index_build.tune import DENSE_ROW_PREFIX, choose_default, mode_row, tune_hybrid, tune_rerank_weights
from models.dense_index import exact_search
from models.encoders import ONNX_NAME
from models.retrieval import Ranked, fuse_hybrid, fuse_parts, rerank_order

if TYPE_CHECKING:
    from index_build.asymmetric import TeacherSpace

log = logging.getLogger(__name__)

#: the evaluate stage's file of every row's nDCG@10 per judged query
PER_QUERY = "per_query.json"


def per_query(systems: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Each row's nDCG@10 per judged query (rows scored by :func:`index_build.metrics.metrics`)."""
    return {name: row.per_query for name, row in systems.items() if isinstance(row, Scores)}


def evaluate(ctx: BuildContext, out: Path) -> dict:
    """Evaluate on the collection's test split (or, in ``rerank`` mode, its own TREC DL pool),
    on the other judged splits of ``evaluate.extra_splits`` and on every ``evaluate.trec_dl``
    pool; writes ``out/eval.json`` and every row's nDCG@10 per query, ``out/per_query.json``."""
    splits: dict[str, dict[str, dict[str, float]]] = {}
    if ctx.cfg.evaluate.mode == "rerank":  # a TREC DL pool: rerank its BM25 run
        collection_result = evaluate_trec(ctx, Path(ctx.cfg.data.path))
    else:
        collection_result = evaluate_collection(ctx)
        # the label-free build's other judged splits, by the same rows, on the queries it never
        # read (a query log's are left out)
        splits = {split: rows for split in ctx.extra_splits() if (rows := evaluate_collection(ctx, split))}
    trec = {}
    for path in ctx.cfg.evaluate.trec_dl:
        if Path(path).is_dir():
            trec[Path(path).name] = evaluate_trec(ctx, Path(path))
        else:
            log.warning("TREC DL folder %s not found: skipped", path)
    result: dict[str, Any] = {"collection": collection_result, "trec": trec, **({"splits": splits} if splits else {})}
    if ctx.logged_queries and ctx.cfg.evaluate.extra_splits:
        result["splits_logged"] = {split: _logged_count(ctx, split) for split in ctx.cfg.evaluate.extra_splits}
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    write_json_atomic(out / PER_QUERY, {"metric": "nDCG@10", "mode": ctx.cfg.evaluate.mode,
                                        "collection": per_query(collection_result),
                                        "trec": {k: per_query(v) for k, v in trec.items()},
                                        "splits": {k: per_query(v) for k, v in splits.items()}})
    if ctx.served_dense in ctx.cfg.students.kinds:
        # the default mode the served-default row scores, kept with the stage: a rebuild that
        # finds the stage up to date writes its results without tuning again
        result["default"] = choose_default(ctx)
    if ctx.trec_weights:  # dev-slice weights of a pool's own students (recorded with the stage)
        result["weights"] = ctx.trec_weights
    return result


@dataclass
class JudgedQueries:
    """The collection's test split as every full-corpus row reads it."""

    qids: list[str]
    texts: list[str]
    qrels: dict[str, dict[str, int]]
    doc_ids: list[str]
    depth: int
    #: the teacher's own query vectors in its space (a build with an asymmetric student)
    teacher_queries: np.ndarray | None = None

    def metrics(self, run: Run) -> Scores:
        return metrics(self.qrels, run)

    def arrays(self, scores: np.ndarray, indices: np.ndarray) -> Scores:
        """The metrics of ``[n_queries, k]`` score and corpus-index arrays."""
        return metrics(self.qrels, run_from_arrays(self.qids, self.doc_ids, scores, indices))


def evaluate_collection(ctx: BuildContext, split: str | None = None) -> dict[str, dict[str, float]]:
    """Every system on the test split (or another judged ``split``): first stages over the
    whole corpus (the full-tower dense student's rows ``dense``, ``hybrid``, ...; the
    asymmetric student's ``asym-*``), rerankers on the served dense model's
    top-``rerank_depth``, and ``served-default``: the row of the mode the artifact serves by
    default (:func:`index_build.tune.choose_default`)."""
    col, split = ctx.collection, split or ctx.cfg.data.test_split
    if split not in col.qrels:
        log.warning("no %r judgments in %s: nothing to evaluate on this corpus", split, ctx.cfg.data.path)
        return {}
    tq, qrels = col.split_queries(split), col.qrels[split]
    if split != ctx.cfg.data.test_split and ctx.logged_queries:  # the test split's are never trained on
        tq = {qid: text for qid, text in tq.items() if query_key(text) not in ctx.logged_queries}
        qrels = {qid: rel for qid, rel in qrels.items() if qid in tq}
        if not qrels:
            log.warning("every judged %r query is in the query log: nothing of that split to evaluate", split)
            return {}
    test = JudgedQueries(list(tq), list(tq.values()), qrels, col.doc_ids, ctx.cfg.evaluate.rerank_depth)
    if "asymmetric" in ctx.cfg.students.kinds:
        test.teacher_queries = ctx.teacher_space.query_vectors(test.texts)
    systems = _reference_rows(ctx, test)
    if ctx.served_dense not in ctx.cfg.students.kinds:
        return systems
    firsts, q8_lists = _first_stage_rows(ctx, test, systems)
    hybrid_weight = tune_hybrid(ctx, test.depth)["dense_weight"]
    if "colbert" in ctx.cfg.students.kinds:
        _colbert_rows(ctx, test, firsts, q8_lists, hybrid_weight, systems)
    if "cross-encoder" in ctx.cfg.students.kinds:
        _cross_encoder_rows(ctx, test, firsts, hybrid_weight, systems)
    row = mode_row(ctx, choose_default(ctx))
    if row in systems:
        systems["served-default"] = systems[row].copy()
    return systems


def _logged_count(ctx: BuildContext, split: str) -> dict[str, int]:
    """How many of ``split``'s judged queries the query log holds (left out of its rows)."""
    judged = list(ctx.collection.split_queries(split).values())
    logged = sum(query_key(t) in ctx.logged_queries for t in judged)
    return {"judged": len(judged), "logged": logged, "evaluated": len(judged) - logged}


def _reference_rows(ctx: BuildContext, test: JudgedQueries) -> dict[str, dict[str, float]]:
    """``bm25``, ``base-dense`` (the base model untrained), ``teacher`` (over the union of
    BM25's and the base model's top candidates) and, with an asymmetric student,
    ``teacher-space``: the teacher members' own query vectors searched over the document
    vectors the student searches (the target its alignment loss pulls it to; the student
    goes beyond it only through the ranking loss against the full teacher, BM25 included)."""
    from index_build.teachers import cached_teacher_scores

    systems: dict[str, dict[str, float]] = {"bm25": test.arrays(*ctx.bm25.search(test.texts, test.depth)),
               "base-dense": test.arrays(*ctx.base_dense.retrieve(test.texts, test.depth))}
    pools, _ = ctx.candidate_pools(test.texts, ctx.cfg.teacher.pool_depth)
    t_scores = cached_teacher_scores(ctx.teacher, ctx.cache, test.texts, pools, progress=ctx.progress)
    systems["teacher"] = test.metrics({q: {test.doc_ids[int(d)]: float(s) for d, s in zip(p, ts)}
                                       for q, p, ts in zip(test.qids, pools, t_scores)})
    if test.teacher_queries is not None:
        systems["teacher-space"] = test.arrays(*exact_search(ctx.teacher_space.doc_vectors(), test.teacher_queries,
                                                             test.depth))
    return systems


def _first_stage_rows(ctx: BuildContext, test: JudgedQueries,
                      systems: dict[str, dict[str, float]]) -> tuple[dict[str, list[Ranked]], list[Ranked]]:
    """Each dense student's first stages (``dense``, ``hybrid``, the int8 rows; ``asym-*``
    for the asymmetric one); returns the served dense model's lists per first stage and its
    int8-query dense lists (empty without int8 export)."""
    from index_build.export import INT8_NAME

    int8_corpus = ctx.cfg.export_int8 and ctx.cfg.evaluate.int8_corpus
    firsts: dict[str, list[Ranked]] = {}
    q8_lists: list[Ranked] = []
    for kind in ("dense", "asymmetric"):
        if kind not in ctx.cfg.students.kinds:
            continue
        prefix = DENSE_ROW_PREFIX[kind]
        # hybrid first stage: z-score fusion with BM25's top-depth, weight tuned on the dev slice
        hw = tune_hybrid(ctx, test.depth, kind)["dense_weight"]
        # the hybrid head's query vectors where it serves the hybrid (BuildContext.hybrid_queries)
        head = ctx.hybrid_queries(test.texts) if kind == ctx.served_dense else None
        queries = ctx.dense_queries(test.texts, kind)
        lists = ctx.first_stage_lists(test.texts, queries, hw, test.depth, kind, hybrid_queries=head)
        systems[f"{prefix}dense"] = test.metrics(ctx.run_of(test.qids, lists["dense"]))
        systems[f"{prefix}hybrid"] = test.metrics(ctx.run_of(test.qids, lists["hybrid"]))
        if head is not None:  # the same hybrid fed the trained student's query vectors
            student = ctx.first_stage_lists(test.texts, queries, hw, test.depth, kind, stages=("hybrid",))["hybrid"]
            systems[f"{prefix}hybrid-student"] = test.metrics(ctx.run_of(test.qids, student))
        if kind == "asymmetric":  # its hybrid without the per-part fusion: two lists at equal weights
            two = ctx.first_stage_lists(test.texts, queries, 0.5, test.depth, kind, stages=("hybrid",),
                                        by_parts=False)["hybrid"]
            systems["asym-hybrid-lists"] = test.metrics(ctx.run_of(test.qids, two))
            # the same hybrid with the teacher's own query vectors: what a perfect imitation would serve
            assert test.teacher_queries is not None
            own = ctx.first_stage_lists(test.texts, test.teacher_queries, hw, test.depth, kind,
                                        stages=("hybrid",))["hybrid"]
            systems["teacher-space-hybrid"] = test.metrics(ctx.run_of(test.qids, own))
        if ctx.cfg.export_int8:
            q8 = ctx.dense_queries(test.texts, kind, INT8_NAME)
            if int8_corpus and kind == "dense":
                systems["dense-int8"] = test.arrays(*exact_search(ctx.dense_corpus(INT8_NAME), q8, test.depth))
            # what the service serves with NRS_USE_INT8: int8 query encoder, fp32 document vectors
            q8_s, q8_i = exact_search(ctx.corpus_vectors(kind), q8, test.depth)
            systems[f"{prefix}dense-int8-query"] = test.arrays(q8_s, q8_i)
            if kind == ctx.served_dense:
                q8_lists = [Ranked(i[i >= 0], s[i >= 0]) for s, i in zip(q8_s, q8_i)]
        if kind == ctx.served_dense:
            firsts = lists
    return firsts, q8_lists


def _colbert_rows(ctx: BuildContext, test: JudgedQueries, firsts: dict[str, list[Ranked]], q8_lists: list[Ranked],
                  hybrid_weight: float, systems: dict[str, dict[str, float]]) -> None:
    """ColBERT reranking the served dense and hybrid first stages, its scores interpolated
    with the first stage's at the dev-tuned weights (``-maxsim``: MaxSim alone; ``-int8``:
    the int8 graph encoding the corpus too; ``-int8-query``: as served with NRS_USE_INT8).
    With an asymmetric query encoder the query tokens are projected from the pass of the query
    encoder that served the first stage (the student's, or the hybrid head's after the hybrid),
    as served (``-2pass``: from ColBERT's own query encoder, a second pass, at the same weights)."""
    from index_build.export import INT8_NAME

    weights = tune_rerank_weights(ctx, "colbert", hybrid_weight, test.depth)["weights"]
    int8_corpus = ctx.cfg.export_int8 and ctx.cfg.evaluate.int8_corpus
    for f in [ONNX_NAME] + ([INT8_NAME] if int8_corpus else []):
        cb = ctx.colbert_scores(test.texts, firsts["dense"], f)
        systems["dense+colbert" + ("-int8" if f == INT8_NAME else "")] = test.metrics(
            ctx.run_of(test.qids, firsts["dense"], cb, weights["dense"]))
        if f == ONNX_NAME:
            systems["dense+colbert-maxsim"] = test.metrics(ctx.run_of(test.qids, firsts["dense"], cb, 1.0))
    if q8_lists:
        cb = ctx.colbert_scores(test.texts, q8_lists, query_onnx_file=INT8_NAME)
        systems["dense+colbert-int8-query"] = test.metrics(ctx.run_of(test.qids, q8_lists, cb, weights["dense"]))
    cb = ctx.colbert_scores(test.texts, firsts["hybrid"], source=ctx.colbert_query_source("hybrid"))
    systems["hybrid+colbert"] = test.metrics(ctx.run_of(test.qids, firsts["hybrid"], cb, weights["hybrid"]))
    systems["hybrid+colbert-maxsim"] = test.metrics(ctx.run_of(test.qids, firsts["hybrid"], cb, 1.0))
    if ctx.one_pass:  # the rows above project ColBERT's query tokens from the first stage's pass
        for stage in ("dense", "hybrid"):
            cb = ctx.colbert_scores(test.texts, firsts[stage], source="colbert")
            systems[f"{stage}+colbert-2pass"] = test.metrics(
                ctx.run_of(test.qids, firsts[stage], cb, weights[stage]))


def _cross_encoder_rows(ctx: BuildContext, test: JudgedQueries, firsts: dict[str, list[Ranked]],
                        hybrid_weight: float, systems: dict[str, dict[str, float]]) -> None:
    """The cross-encoder as served: it rescores the served dense model's top
    ``evaluate.cross_encoder_depth``, its scores interpolated with the dense model's at the
    weight tuned on dev at that depth (``-plain``: its scores alone; ``-int8``: as served with
    NRS_USE_INT8 and the cross-encoder among NRS_INT8_MODELS). The first stage's order of
    the candidates below that depth follows, so recall at 100 stays the first stage's."""
    from index_build.export import INT8_NAME

    depth = ctx.cfg.evaluate.served_cross_encoder_depth
    ce_weight = tune_rerank_weights(ctx, "cross-encoder", hybrid_weight, depth)["weights"]["dense"]
    head = [Ranked(c[:depth], s[:depth]) for c, s in firsts["dense"]]
    cand_texts = [[ctx.corpus_texts[int(j)] for j in c] for c, _ in head]

    full = ctx.run_of(test.qids, firsts["dense"])

    def row(scores: list[np.ndarray], weight: float) -> dict[str, float]:
        return test.metrics(with_tail(ctx.run_of(test.qids, head, scores, weight), full))

    scores = ctx.cross_encoder_scores(test.texts, cand_texts)
    systems["dense+cross-encoder"] = row(scores, ce_weight)
    systems["dense+cross-encoder-plain"] = row(scores, 1.0)
    if ctx.cfg.export_int8:
        scores8 = ctx.cross_encoder_scores(test.texts, cand_texts, INT8_NAME)
        systems["dense+cross-encoder-int8"] = row(scores8, ce_weight)


def with_tail(head: Run, full: Run) -> Run:
    """Per query, ``head``'s ranking, then ``full``'s documents that ``head`` lacks in
    ``full``'s order, scored below every head score."""
    out = {}
    for qid, ranked in head.items():
        floor = min(ranked.values(), default=0.0) - 1.0
        rest = sorted((d for d in full.get(qid, {}) if d not in ranked), key=lambda d: -full[qid][d])
        out[qid] = {**ranked, **{d: floor - i * 1e-3 for i, d in enumerate(rest)}}
    return out


@dataclass
class TrecPool:
    """A TREC DL pool: its collection, graded judgments and the BM25 run whose top
    candidates every system reranks."""

    path: Path
    collection: Collection
    qrels: dict[str, dict[str, int]]
    bm25_run: dict[str, list[tuple[str, float]]]
    qids: list[str]
    texts: list[str]
    candidates: list[list[str]]

    @classmethod
    def load(cls, path: Path, depth: int) -> TrecPool:
        from index_build.data import load_trec_run

        col = load_collection(path, unknown_docs="keep")
        qrels = col.qrels[next(iter(col.qrels))]
        run_in = load_trec_run(path / "runs" / "BM25.trec", depth=depth)
        qids = [q for q in col.queries if q in qrels and q in run_in]
        return cls(path, col, qrels, run_in, qids, [col.queries[q] for q in qids],
                   [[d for d, _ in run_in[q]] for q in qids])

    @cached_property
    def docs(self) -> dict[str, str]:
        return {d.id: d.full_text for d in self.collection.docs}

    def score_all(self, fn: Callable[[str, list[str]], np.ndarray]) -> Run:
        """The run of ``fn(query, candidate ids) -> scores`` over every query."""
        return {qid: dict(zip(cs, map(float, fn(q, cs)))) for qid, q, cs in zip(self.qids, self.texts, self.candidates)}

    def metrics(self, run: Run) -> Scores:
        """nDCG@10, RR@10 and R@100, grade >= 2 relevant for the last two (the TREC DL convention)."""
        return metrics(self.qrels, run, min_rel=2)


def evaluate_trec(ctx: BuildContext, path: Path) -> dict[str, dict[str, float]]:
    """Rerank the BM25 run's top candidates of a TREC DL pool with every scoring model: the
    reference rows, each dense student's first stages and the rerankers after the served
    one, as the service serves them, at the weights chosen on the build's dev slice (never
    on these judgments)."""
    pool = TrecPool.load(path, ctx.cfg.evaluate.rerank_depth)
    systems, teacher = _trec_reference_rows(ctx, pool)
    firsts, hw = _trec_first_stage_rows(ctx, pool, teacher, systems)
    record: dict[str, Any] = {}
    if firsts:  # the dev-slice weights this pool is evaluated with (recorded with the evaluate stage)
        record = ctx.trec_weights[path.name] = {"hybrid_dense_weight": hw}
    _trec_rerank_rows(ctx, pool, firsts, hw, record, systems)
    row = mode_row(ctx, choose_default(ctx)) if firsts else None
    if row in systems:
        systems["served-default"] = systems[row].copy()
    return systems


def _dense_fn(enc, docs: dict[str, str]) -> Callable[[str, list[str]], np.ndarray]:
    return lambda q, cs: enc.encode_docs([docs[c] for c in cs]) @ enc.encode_queries([q])[0]


def _space_run(pool: TrecPool, space: TeacherSpace, queries: np.ndarray) -> Run:
    """The run of a pool's candidates scored in a teacher space
    (:class:`index_build.asymmetric.TeacherSpace`) by ``queries``, one vector per pool query."""
    index = pool.collection.doc_index
    return {qid: dict(zip(cs, map(float, space.doc_vectors_at(np.array([index[c] for c in cs], np.int64)) @ q)))
            for qid, q, cs in zip(pool.qids, queries, pool.candidates)}


def _trec_reference_rows(ctx: BuildContext, pool: TrecPool) -> tuple[dict[str, dict[str, float]], Any]:
    """``bm25`` (the run itself), ``base-dense`` and ``teacher`` (the configured ensemble,
    BM25 statistics over the pool's corpus); also the teacher, whose bi-encoder members'
    document vectors the asymmetric student searches."""
    from index_build.export import base_dense_onnx
    from index_build.teachers import build_teacher, cached_teacher_scores
    from models.encoders import DenseEncoder

    col, s = pool.collection, ctx.cfg.students
    systems: dict[str, dict[str, float]] = {"bm25": pool.metrics({q: dict(pool.bm25_run[q]) for q in pool.qids})}
    base = DenseEncoder(base_dense_onnx(s.base, max_doc_len=s.max_doc_len)[0], threads=ctx.cfg.threads)
    systems["base-dense"] = pool.metrics(pool.score_all(_dense_fn(base, pool.docs)))
    teacher = build_teacher(ctx.teacher_spec(), col.doc_texts(), col.checksum(), ctx.cache, threads=ctx.cfg.threads)
    t_scores = cached_teacher_scores(teacher, ctx.cache, pool.texts,
                                     [np.array([col.doc_index[c] for c in cs], np.int64) for cs in pool.candidates],
                                     progress=ctx.progress)
    systems["teacher"] = pool.metrics({qid: dict(zip(cs, map(float, ts)))
                                       for qid, cs, ts in zip(pool.qids, pool.candidates, t_scores)})
    return systems, teacher


@dataclass
class PoolIndex:
    """What a build serving a pool's corpus would hold over it: its BM25 index and, for the
    asymmetric student, the teacher space's document vectors (``space_vectors(corpus
    indices)``), indexed as ``doc_ids`` / ``doc_index``."""

    bm25: Any
    doc_ids: list[str]
    doc_index: dict[str, int]
    space_vectors: Callable[[np.ndarray], np.ndarray]

    @classmethod
    def of_build(cls, ctx: BuildContext) -> PoolIndex:
        """The build's own indexes (a build whose corpus is the pool's)."""
        vectors = cache(lambda: ctx.corpus_vectors("asymmetric"))  # stacked once, on first use
        return cls(ctx.bm25, ctx.collection.doc_ids, ctx.collection.doc_index, lambda ids: vectors()[ids])

    @classmethod
    def of_pool(cls, pool: TrecPool, teacher) -> PoolIndex:
        """Indexes over another collection's pool: the teacher's BM25 member's index (the
        service's BM25 settings, statistics over the pool's corpus; built when the teacher has
        no BM25 member) and its bi-encoder members' document vectors."""
        from index_build.asymmetric import TeacherSpace
        from index_build.teachers import BiEncoderTeacher, BM25Teacher
        from models.sparse_index import BM25Index

        col = pool.collection
        bm25 = next((m.index for m in teacher.members if isinstance(m, BM25Teacher)), None)
        members = [m for m in teacher.members if isinstance(m, BiEncoderTeacher)]
        return cls(bm25 if bm25 is not None else BM25Index.build(col.doc_texts()), col.doc_ids, col.doc_index,
                   lambda ids: TeacherSpace(members).doc_vectors_at(ids))


def _trec_first_stage_rows(ctx: BuildContext, pool: TrecPool, teacher,
                           systems: dict[str, dict[str, float]]) -> tuple[dict[str, Run], float]:
    """Each dense student's rows over the pool's BM25 candidates (``dense``/``asym-dense``,
    ``dense-int8``) and the service's hybrid of them (``hybrid``/``asym-hybrid``), with BM25
    and the teacher space over the pool's corpus as a build of that corpus would serve them
    (:class:`PoolIndex`); returns the served dense model's first-stage runs and its hybrid
    weight."""
    from index_build.asymmetric import TeacherSpace
    from index_build.export import INT8_NAME
    from index_build.teachers import BiEncoderTeacher
    from models.encoders import DenseEncoder

    own_pool = ctx.cfg.evaluate.mode == "rerank" and Path(ctx.cfg.data.path).resolve() == pool.path.resolve()
    index = PoolIndex.of_build(ctx) if own_pool else PoolIndex.of_pool(pool, teacher)
    firsts: dict[str, Run] = {}
    hw = 1.0
    for kind in ("dense", "asymmetric"):
        if kind not in ctx.cfg.students.kinds:
            continue
        prefix = DENSE_ROW_PREFIX[kind]
        enc = ctx.student_encoder(DenseEncoder, kind)
        if kind == "asymmetric":  # the student's queries against the teacher members' document vectors
            space = TeacherSpace([m for m in teacher.members if isinstance(m, BiEncoderTeacher)])

            # the target the student's alignment loss pulls it to (see _reference_rows)
            own_queries = space.query_vectors(pool.texts)
            systems["teacher-space"] = pool.metrics(own_run := _space_run(pool, space, own_queries))
            dense_run = _space_run(pool, space, enc.encode_queries(pool.texts))
        else:
            dense_run = pool.score_all(_dense_fn(enc, pool.docs))
            if ctx.cfg.export_int8:
                enc8 = ctx.student_encoder(DenseEncoder, kind, INT8_NAME)
                systems["dense-int8"] = pool.metrics(pool.score_all(_dense_fn(enc8, pool.docs)))
        systems[f"{prefix}dense"] = pool.metrics(dense_run)
        kind_hw = tune_hybrid(ctx, kind=kind)["dense_weight"]
        hybrid_run = pool_hybrid(ctx, pool, index, dense_run, kind_hw, kind)
        head = ctx.hybrid_queries(pool.texts) if kind == ctx.served_dense else None
        if head is not None:  # the hybrid head serves the hybrid; the trained student's hybrid for comparison
            systems[f"{prefix}hybrid-student"] = pool.metrics(hybrid_run)
            hybrid_run = pool_hybrid(ctx, pool, index, _space_run(pool, space, head), kind_hw, kind, queries=head)
        systems[f"{prefix}hybrid"] = pool.metrics(hybrid_run)
        if kind == "asymmetric":
            systems["asym-hybrid-lists"] = pool.metrics(pool_hybrid(ctx, pool, index, dense_run, 0.5, kind, False))
            # with the teacher's own query vectors: what a perfect imitation would serve
            systems["teacher-space-hybrid"] = pool.metrics(pool_hybrid(ctx, pool, index, own_run, kind_hw, kind,
                                                                       queries=own_queries))
        if kind == ctx.served_dense:
            firsts["dense"], firsts["hybrid"], hw = dense_run, hybrid_run, kind_hw
    return firsts, hw


def pool_hybrid(ctx: BuildContext, pool: TrecPool, index: PoolIndex, dense_run: Run, weight: float, kind: str,
                by_parts: bool = True, queries: np.ndarray | None = None) -> Run:
    """The service's hybrid over a pool's candidates, dense weight ``weight``, BM25 from
    ``index``: for the asymmetric student BM25 and each part of the teacher's space
    (:func:`models.retrieval.fuse_parts`; ``queries``: the query vectors whose parts are
    fused, by default the exported student's), else its dense scores and BM25's
    (:func:`models.retrieval.fuse_hybrid`)."""
    parts = ctx.teacher_fusion["parts"] if by_parts and kind == "asymmetric" else None
    if parts and queries is None:
        queries = ctx.dense_queries(pool.texts, kind)
    run = {}
    for r, (qid, q, cs) in enumerate(zip(pool.qids, pool.texts, pool.candidates)):
        docs, bm25 = np.array([index.doc_index[c] for c in cs], np.int64), index.bm25.scores(q)
        dense, sparse = Ranked(docs, np.array([dense_run[qid][c] for c in cs])), Ranked(docs, bm25[docs])
        if parts is None:
            fused = fuse_hybrid(dense, sparse, (weight, 1 - weight), len(cs))
        else:
            assert queries is not None
            fused = fuse_parts(dense, sparse, bm25, queries[r], index.space_vectors, parts,
                               (weight, 1 - weight), len(cs))
        run[qid] = {index.doc_ids[int(j)]: float(x) for j, x in zip(*fused)}
    return run


def _trec_rerank_rows(ctx: BuildContext, pool: TrecPool, firsts: dict[str, Run], hw: float,
                      record: dict[str, Any], systems: dict[str, dict[str, float]]) -> None:
    """ColBERT and the cross-encoder reranking the pool's candidates, their scores
    interpolated with each first stage's (as the service serves them; ``-maxsim`` /
    ``-plain``: the reranker alone); the weights used go into ``record``. ColBERT's query
    tokens come from each first stage's own pass where the build serves one pass
    (:meth:`BuildContext.colbert_query_source`; ``-2pass``: from ColBERT's query encoder)."""
    kinds = ctx.cfg.students.kinds
    if "colbert" in kinds:
        sides = {stage: ctx.colbert_query_source(stage) for stage in firsts}
        runs = _pool_colbert_runs(ctx, pool, {*sides.values(), "colbert"})
        if not firsts:
            systems["dense+colbert"] = pool.metrics(runs["colbert"])
        else:
            weights = record["colbert_weight"] = tune_rerank_weights(ctx, "colbert", hw)["weights"]
            for stage, first_run in firsts.items():
                systems[f"{stage}+colbert"] = pool.metrics(
                    interpolated_run(first_run, runs[sides[stage]], weights[stage]))
            systems["dense+colbert-maxsim"] = pool.metrics(runs[sides["dense"]])
            if ctx.one_pass:
                for stage, first_run in firsts.items():
                    systems[f"{stage}+colbert-2pass"] = pool.metrics(
                        interpolated_run(first_run, runs["colbert"], weights[stage]))
    if "cross-encoder" in kinds:
        # as served: the cross-encoder rescores the first stage's top cross_encoder_depth
        depth = ctx.cfg.evaluate.served_cross_encoder_depth
        base = firsts.get("dense") or {qid: dict(pool.bm25_run[qid]) for qid in pool.qids}
        heads = [sorted(base[qid], key=base[qid].__getitem__, reverse=True)[:depth] for qid in pool.qids]
        scores = ctx.cross_encoder_scores(pool.texts, [[pool.docs[c] for c in h] for h in heads])
        ce_run = {qid: dict(zip(h, map(float, sc))) for qid, h, sc in zip(pool.qids, heads, scores)}
        if "dense" in firsts:
            ce_weight = tune_rerank_weights(ctx, "cross-encoder", hw, depth)["weights"]["dense"]
            record["cross_encoder_weight"] = ce_weight
            head_first = {qid: {d: base[qid][d] for d in h} for qid, h in zip(pool.qids, heads)}
            systems["dense+cross-encoder"] = pool.metrics(
                with_tail(interpolated_run(head_first, ce_run, ce_weight), base))
            systems["dense+cross-encoder-plain"] = pool.metrics(with_tail(ce_run, base))
        else:
            systems["dense+cross-encoder"] = pool.metrics(with_tail(ce_run, base))


def _pool_colbert_runs(ctx: BuildContext, pool: TrecPool, sides: set[str]) -> dict[str, Run]:
    """ColBERT's MaxSim run over the pool's candidates per query side in ``sides`` (as
    :meth:`BuildContext.colbert_scores` takes them: ``"colbert"``, its query encoder, or the
    query encoder whose pass the query tokens are projected from); each query's candidates
    are encoded once for all sides."""
    from models.encoders import ColbertEncoder, maxsim

    cb = ctx.student_encoder(ColbertEncoder, "colbert")
    queries = {side: ctx.colbert_query_tokens(pool.texts, side) for side in sorted(sides)}
    runs: dict[str, Run] = {side: {} for side in queries}
    for r, (qid, cs) in enumerate(zip(pool.qids, pool.candidates)):
        toks = cb.encode_docs([pool.docs[c] for c in cs])
        offsets = np.cumsum([0] + [len(t) for t in toks])
        tokens = np.concatenate(toks) if toks else np.zeros((0, cb.dim), np.float32)
        for side, qv in queries.items():
            runs[side][qid] = dict(zip(cs, map(float, maxsim(qv[r], tokens, offsets))))
    return runs


def interpolated_run(first: dict[str, dict[str, float]], rerank: dict[str, dict[str, float]],
                     weight: float) -> dict[str, dict[str, float]]:
    """Per query, the reranker's scores of the first stage's candidates interpolated with the
    first stage's (:func:`models.retrieval.rerank_order`, ``weight`` 1: the reranker alone)."""
    run = {}
    for qid, firsts in first.items():
        docs = list(firsts)
        final, _ = rerank_order(np.array([firsts[d] for d in docs]), np.array([rerank[qid][d] for d in docs]), weight)
        run[qid] = dict(zip(docs, map(float, final)))
    return run


def write_results(ctx: BuildContext, evaluation: dict[str, Any], stages: dict[str, dict[str, Any]],
                  command: str) -> dict:
    """Write the build's results files into ``cfg.results_path``: ``<name>.json`` (the
    collection's systems, the stages' times and records, the teacher, the serving choice and
    the command that rebuilds it), ``trec-dl.json`` when TREC DL pools were evaluated, and a
    markdown summary ``<name>.md``; returns the ``<name>.json`` contents."""
    cfg = ctx.cfg
    name = cfg.evaluate.name or Path(cfg.data.path).name
    results_dir = cfg.results_path
    main = {"collection": name, "split": cfg.data.test_split, "rerank_depth": cfg.evaluate.rerank_depth,
            "systems": evaluation["collection"], "stages": stages,
            "teacher": {"members": cfg.teacher.members, "norm": cfg.teacher.norm, "pool_depth": cfg.teacher.pool_depth},
            "command": command}
    if ctx.served_dense in cfg.students.kinds:
        # the served dense model (whose first stage the rerank and served-default rows use)
        # and the default mode, chosen on the dev slice
        main["serving"] = {"dense_model": ctx.served_dense, "default": evaluation.get("default") or choose_default(ctx),
                           # the hybrid's query encoder, as the manifest names it (the stages' head-asymmetric record)
                           "hybrid_model": "hybrid" if ctx.hybrid_head() is not None else "dense"}
    if evaluation.get("splits"):
        main["splits"] = evaluation["splits"]
    write_json_atomic(results_dir / f"{name}.json", main)
    if (per_query_file := ctx.work / "evaluate" / PER_QUERY).is_file():  # the evaluate stage's, beside eval.json
        write_json_atomic(results_dir / f"{name}.per-query.json",
                          {**json.loads(per_query_file.read_text()), "command": command})
    md = markdown_table(main["systems"], f"{name} ({cfg.data.test_split})")
    for split, systems in main.get("splits", {}).items():
        md += "\n" + markdown_table(systems, f"{name} ({split}: a judged split the build never read)")
    if evaluation["trec"]:
        trec: dict[str, Any] = {k: {"systems": v} for k, v in evaluation["trec"].items()}
        trec["note"] = ("every system reranks runs/BM25.trec top-100; RR@10 and R@100 count grade >= 2 "
                        "as relevant; students distilled on " + name)
        write_json_atomic(results_dir / "trec-dl.json", trec)
        for k, v in evaluation["trec"].items():
            md += "\n" + markdown_table(v, f"TREC {k} (rerank BM25 top-100)")
    md += "\n### stages\n\n| stage | seconds | peak RSS (MiB) |\n|---|---|---|\n"
    for n, s in stages.items():
        md += f"| {n} | {s['seconds']} | {s['peak_rss_bytes'] / 2**20:.0f} |\n"
    (results_dir / f"{name}.md").write_text(md)
    return main


def build_summary(ctx: BuildContext, result: dict, records: Mapping[str, Any]) -> str:
    """The end-of-build summary of a build's ``result`` (its results file's contents) and stage
    ``records``: headline quality rows, the default mode, where the artifact is, its size and
    how to serve it."""
    import shlex

    systems = result.get("systems", {})
    rows = [r for r in ("served-default", "teacher", "bm25", "base-dense", "asym-dense", "asym-hybrid", "dense",
                        "hybrid", "hybrid+colbert") if r in systems]
    lines = [f"build done: {sum(r.seconds for r in records.values() if not r.cached) / 60:.1f} min of stages run; "
             f"results in {ctx.cfg.results_path}"]
    if rows:
        lines.append(f"  {'system':<16} nDCG@10  ({ctx.cfg.data.test_split} queries)")
        lines += [f"  {r:<16} {systems[r]['nDCG@10']:.4f}" for r in rows]
    default = result.get("serving", {}).get("default")
    if default:
        lines.append(f"  served by default: first_stage={default['first_stage']} rerank={default['rerank']} "
                     f"(chosen on the {default.get('chosen_on', 'dev slice')})")
    art = Path(ctx.cfg.artifact_dir)
    if "artifact" in records and art.is_dir():
        size = sum(f.stat().st_size for f in art.rglob("*") if f.is_file())
        lines.append(f"artifact: {art} ({size / 2**20:.0f} MiB)")
        lines.append(f"serve it:  NRS_ARTIFACT_DIR={shlex.quote(str(art))} python -m service")
    return "\n".join(lines)
