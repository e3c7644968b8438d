"""The evaluate stage: every system on the collection's test split (full-corpus first
stages, reranking as the service reranks, the served default mode), and on TREC DL pools by
reranking their BM25 runs; the build's results files."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from index_build.context import BuildContext
from index_build.data import load_collection
from index_build.metrics import markdown_table, metrics, run_from_arrays, write_json_atomic
from index_build.teachers import exact_topk
from index_build.tune import DENSE_ROW_PREFIX, choose_default, mode_row, tune_hybrid, tune_rerank_weights
from models.encoders import ONNX_NAME
from models.retrieval import Ranked, fuse_hybrid, rerank_order

log = logging.getLogger(__name__)


def evaluate(ctx: BuildContext, out: Path) -> dict:
    """Evaluate on the collection (or, in ``rerank`` mode, its own TREC DL pool) and on every
    ``evaluate.trec_dl`` pool; writes ``out/eval.json``."""
    if ctx.cfg.evaluate.mode == "rerank":  # a TREC DL pool: rerank its BM25 run
        collection_result = evaluate_trec(ctx, Path(ctx.cfg.data.path))
    else:
        collection_result = evaluate_collection(ctx)
    trec = {}
    for path in ctx.cfg.evaluate.trec_dl:
        if Path(path).is_dir():
            trec[Path(path).name] = evaluate_trec(ctx, Path(path))
        else:
            log.warning("TREC DL folder %s not found: skipped", path)
    (out / "eval.json").write_text(json.dumps({"collection": collection_result, "trec": trec}, indent=2))
    result = {"collection": collection_result, "trec": trec}
    if ctx.trec_weights:  # dev-slice weights of a pool's own students (recorded with the stage)
        result["weights"] = ctx.trec_weights
    return result



def evaluate_collection(ctx: BuildContext) -> dict[str, dict[str, float]]:
    """Every system on the test split: first stages over the whole corpus (the full-tower
    dense student's rows ``dense``, ``hybrid``, ...; the asymmetric student's ``asym-*``),
    rerankers on the served dense model's top-``rerank_depth``, and ``served-default``:
    the row of the mode the artifact serves by default (:func:`index_build.tune.choose_default`)."""
    from index_build.export import INT8_NAME
    from index_build.teachers import cached_teacher_scores

    col, depth = ctx.collection, ctx.cfg.evaluate.rerank_depth
    split = ctx.cfg.data.test_split
    if split not in col.qrels:
        log.warning("no %r judgments in %s: nothing to evaluate on this corpus", split, ctx.cfg.data.path)
        return {}
    tq = col.split_queries(split)
    qids, texts = list(tq), list(tq.values())
    qrels, doc_ids = col.qrels[split], col.doc_ids
    systems: dict[str, dict[str, float]] = {}
    bm_s, bm_i = ctx.bm25.search(texts, depth)
    systems["bm25"] = metrics(qrels, run_from_arrays(qids, doc_ids, bm_s, bm_i))
    base_s, base_i = ctx.base_dense.retrieve(texts, depth)
    systems["base-dense"] = metrics(qrels, run_from_arrays(qids, doc_ids, base_s, base_i))
    pools, _ = ctx.candidate_pools(texts, ctx.cfg.teacher.pool_depth)
    t_scores = cached_teacher_scores(ctx.teacher, ctx.cache, texts, pools, progress=ctx.progress)
    systems["teacher"] = metrics(qrels, {q: {doc_ids[int(d)]: float(s) for d, s in zip(p, ts)}
                                          for q, p, ts in zip(qids, pools, t_scores)})
    kinds = ctx.cfg.students.kinds
    served = ctx.served_dense
    if served not in kinds:
        return systems
    int8_corpus = ctx.cfg.export_int8 and ctx.cfg.evaluate.int8_corpus
    firsts: dict[str, list[Ranked]] = {}
    q8_lists: list[Ranked] = []
    for kind in ("dense", "asymmetric"):
        if kind not in kinds:
            continue
        prefix = DENSE_ROW_PREFIX[kind]
        # hybrid first stage: z-score fusion with BM25's top-depth, weight tuned on the dev slice
        hw = tune_hybrid(ctx, depth, kind)["dense_weight"]
        lists = ctx.first_stage_lists(texts, ctx.dense_queries(texts, kind), hw, depth, kind)
        systems[f"{prefix}dense"] = metrics(qrels, ctx.run_of(qids, lists["dense"]))
        systems[f"{prefix}hybrid"] = metrics(qrels, ctx.run_of(qids, lists["hybrid"]))
        if ctx.cfg.export_int8:
            q8 = ctx.dense_queries(texts, kind, INT8_NAME)
            if int8_corpus and kind == "dense":
                s8, i8 = exact_topk(ctx.dense_corpus(INT8_NAME), q8, depth)
                systems["dense-int8"] = metrics(qrels, run_from_arrays(qids, doc_ids, s8, i8))
            # what the service serves with NRS_USE_INT8: int8 query encoder, fp32 document vectors
            q8_s, q8_i = exact_topk(ctx.corpus_vectors(kind), q8, depth)
            systems[f"{prefix}dense-int8-query"] = metrics(qrels, run_from_arrays(qids, doc_ids, q8_s, q8_i))
            if kind == served:
                q8_lists = [Ranked(i[i >= 0], s[i >= 0]) for s, i in zip(q8_s, q8_i)]
        if kind == served:
            firsts = lists
    hybrid_weight = tune_hybrid(ctx, depth)["dense_weight"]
    if "colbert" in kinds:
        # ColBERT reranks, its scores interpolated with the first stage's (weights tuned on the dev slice)
        weights = tune_rerank_weights(ctx, "colbert", hybrid_weight, depth)["weights"]
        for f in [ONNX_NAME] + ([INT8_NAME] if int8_corpus else []):
            cb = ctx.colbert_scores(texts, firsts["dense"], f)
            systems["dense+colbert" + ("-int8" if f == INT8_NAME else "")] = metrics(
                qrels, ctx.run_of(qids, firsts["dense"], cb, weights["dense"]))
            if f == ONNX_NAME:
                systems["dense+colbert-maxsim"] = metrics(qrels, ctx.run_of(qids, firsts["dense"], cb, 1.0))
        if q8_lists:  # as served with NRS_USE_INT8: int8 query encoders, fp32-encoded corpus
            cb = ctx.colbert_scores(texts, q8_lists, query_onnx_file=INT8_NAME)
            systems["dense+colbert-int8-query"] = metrics(qrels, ctx.run_of(qids, q8_lists, cb, weights["dense"]))
        cb = ctx.colbert_scores(texts, firsts["hybrid"])
        systems["hybrid+colbert"] = metrics(qrels, ctx.run_of(qids, firsts["hybrid"], cb, weights["hybrid"]))
        systems["hybrid+colbert-maxsim"] = metrics(qrels, ctx.run_of(qids, firsts["hybrid"], cb, 1.0))
    if "cross-encoder" in kinds:
        # the cross-encoder reranks the dense top-depth, its scores interpolated with the served
        # dense model's (weight tuned on the dev slice); "-plain": its scores alone
        ce_weight = tune_rerank_weights(ctx, "cross-encoder", hybrid_weight, depth)["weights"]["dense"]
        cand_texts = [[ctx.corpus_texts[int(j)] for j in c] for c, _ in firsts["dense"]]
        scores = ctx.cross_encoder_scores(texts, cand_texts)
        systems["dense+cross-encoder"] = metrics(qrels, ctx.run_of(qids, firsts["dense"], scores, ce_weight))
        systems["dense+cross-encoder-plain"] = metrics(qrels, ctx.run_of(qids, firsts["dense"], scores, 1.0))
        if ctx.cfg.export_int8:  # as served with NRS_USE_INT8 and the cross-encoder among NRS_INT8_MODELS
            scores8 = ctx.cross_encoder_scores(texts, cand_texts, onnx_file=INT8_NAME)
            systems["dense+cross-encoder-int8"] = metrics(
                qrels, ctx.run_of(qids, firsts["dense"], scores8, ce_weight))
    row = mode_row(ctx, choose_default(ctx))
    if row in systems:
        systems["served-default"] = dict(systems[row])
    return systems


def evaluate_trec(ctx: BuildContext, path: Path) -> dict[str, dict[str, float]]:
    """Rerank the BM25 run's top-100 of a TREC DL pool with every scoring model."""
    from index_build.data import load_trec_run
    from index_build.export import INT8_NAME, base_dense_onnx
    from index_build.teachers import build_teacher, cached_teacher_scores
    from models.encoders import ColbertEncoder, DenseEncoder, maxsim

    col = load_collection(path, unknown_docs="keep")
    split = next(iter(col.qrels))
    qrels = col.qrels[split]
    run_in = load_trec_run(path / "runs" / "BM25.trec", depth=ctx.cfg.evaluate.rerank_depth)
    qids = [q for q in col.queries if q in qrels and q in run_in]
    texts = [col.queries[q] for q in qids]
    cands = [[d for d, _ in run_in[q]] for q in qids]
    docs = {d.id: d.full_text for d in col.docs}
    systems: dict[str, dict[str, float]] = {}

    def score_all(fn) -> dict[str, dict[str, float]]:
        run = {}
        for qid, q, cs in zip(qids, texts, cands):
            run[qid] = dict(zip(cs, map(float, fn(q, cs))))
        return run

    systems["bm25"] = metrics(qrels, {q: dict(run_in[q]) for q in qids}, min_rel=2)

    def dense_fn(enc: DenseEncoder):
        def fn(q: str, cs: list[str]) -> np.ndarray:
            return enc.encode_docs([docs[c] for c in cs]) @ enc.encode_queries([q])[0]
        return fn

    base = DenseEncoder(base_dense_onnx(ctx.cfg.students.base, max_doc_len=ctx.cfg.students.max_doc_len)[0],
                        threads=ctx.cfg.threads)
    base_run = score_all(dense_fn(base))
    systems["base-dense"] = metrics(qrels, base_run, min_rel=2)
    # teacher: the configured ensemble (members z-scored per query), BM25 statistics over this pool's corpus
    teacher = build_teacher(ctx.teacher_spec(), col.doc_texts(), col.checksum(), ctx.cache,
                            threads=ctx.cfg.threads)
    t_scores = cached_teacher_scores(teacher, ctx.cache, texts,
                                     [np.array([col.doc_index[c] for c in cs], np.int64) for cs in cands],
                                     progress=ctx.progress)
    teacher_run = {qid: dict(zip(cs, map(float, ts))) for qid, cs, ts in zip(qids, cands, t_scores)}
    systems["teacher"] = metrics(qrels, teacher_run, min_rel=2)
    kinds = ctx.cfg.students.kinds
    # students trained on this pool (a label-free build): the first stages and the ColBERT
    # interpolation are evaluated as the service serves them, weights from the dev slice
    own_pool = ctx.cfg.evaluate.mode == "rerank" and Path(ctx.cfg.data.path).resolve() == path.resolve()
    # Rerankers are evaluated as the service serves them after the dense first stage: their
    # scores interpolated with the dense student's (on this pool's BM25 candidates), at the
    # weights chosen on the build's dev slice, the artifact's; never on these judgments.
    firsts: dict[str, dict[str, dict[str, float]]] = {}  # the served dense model's first stages
    hw, record = 1.0, {}
    served = ctx.served_dense
    for kind in ("dense", "asymmetric"):
        if kind not in kinds:
            continue
        prefix = DENSE_ROW_PREFIX[kind]
        if kind == "asymmetric":  # the student's queries against the teacher members' document vectors
            from index_build.asymmetric import TeacherSpace
            from index_build.teachers import BiEncoderTeacher, EnsembleTeacher

            assert isinstance(teacher, EnsembleTeacher)
            space = TeacherSpace([m for m in teacher.members if isinstance(m, BiEncoderTeacher)])
            asym = DenseEncoder(ctx.onnx_dir(kind), threads=ctx.cfg.threads)

            def asym_fn(q: str, cs: list[str], enc: DenseEncoder = asym, space=space) -> np.ndarray:
                idx = np.array([col.doc_index[c] for c in cs], np.int64)
                return np.hstack([m.embeddings(idx) for m in space.members]) @ enc.encode_queries([q])[0]

            dense_run = score_all(asym_fn)
        else:
            dense_run = score_all(dense_fn(DenseEncoder(ctx.onnx_dir(kind), threads=ctx.cfg.threads)))
            if ctx.cfg.export_int8:
                enc8 = DenseEncoder(ctx.onnx_dir(kind), onnx_file=INT8_NAME, threads=ctx.cfg.threads)
                systems["dense-int8"] = metrics(qrels, score_all(dense_fn(enc8)), min_rel=2)
        systems[f"{prefix}dense"] = metrics(qrels, dense_run, min_rel=2)
        kind_hw = tune_hybrid(ctx, kind=kind)["dense_weight"]
        if kind == served:
            firsts["dense"], hw = dense_run, kind_hw
            record = ctx.trec_weights[path.name] = {"hybrid_dense_weight": hw}
        if own_pool:
            hybrid_run = {}
            for qid, cs in zip(qids, cands):  # the service's hybrid over this pool's candidates
                bm25, pool = dict(run_in[qid]), np.arange(len(cs))
                fused = fuse_hybrid(Ranked(pool, np.array([dense_run[qid][c] for c in cs])),
                                    Ranked(pool, np.array([bm25[c] for c in cs])), (kind_hw, 1 - kind_hw),
                                    len(cs))
                hybrid_run[qid] = {cs[int(j)]: float(x) for j, x in zip(*fused)}
            systems[f"{prefix}hybrid"] = metrics(qrels, hybrid_run, min_rel=2)
            if kind == served:
                firsts["hybrid"] = hybrid_run
    if "colbert" in kinds:
        cb = ColbertEncoder(ctx.onnx_dir("colbert"))

        def colbert_fn(q: str, cs: list[str]) -> np.ndarray:
            toks = cb.encode_docs([docs[c] for c in cs])
            offsets = np.cumsum([0] + [len(t) for t in toks])
            return maxsim(cb.encode_queries([q])[0], np.concatenate(toks), offsets)

        colbert_run = score_all(colbert_fn)
        if not firsts:
            systems["dense+colbert"] = metrics(qrels, colbert_run, min_rel=2)
        else:
            # ColBERT's scores interpolated with the first stage's (models.fusion.interpolate), as
            # in full-corpus evaluation and the service; "-maxsim": plain reranking
            weights = tune_rerank_weights(ctx, "colbert", hw)["weights"]
            record["colbert_weight"] = weights
            for stage, first_run in firsts.items():
                systems[f"{stage}+colbert"] = metrics(
                    qrels, interpolated_run(first_run, colbert_run, weights[stage]), min_rel=2)
            systems["dense+colbert-maxsim"] = metrics(qrels, colbert_run, min_rel=2)
    if "cross-encoder" in kinds:
        scores = ctx.cross_encoder_scores(texts, [[docs[c] for c in cs] for cs in cands])
        ce_run = {qid: dict(zip(cs, map(float, sc))) for qid, cs, sc in zip(qids, cands, scores)}
        if "dense" in firsts:  # as served: interpolated with the dense student; "-plain": alone
            ce_weight = tune_rerank_weights(ctx, "cross-encoder", hw)["weights"]["dense"]
            record["cross_encoder_weight"] = ce_weight
            systems["dense+cross-encoder"] = metrics(
                qrels, interpolated_run(firsts["dense"], ce_run, ce_weight), min_rel=2)
            systems["dense+cross-encoder-plain"] = metrics(qrels, ce_run, min_rel=2)
        else:
            systems["dense+cross-encoder"] = metrics(qrels, ce_run, min_rel=2)
    row = mode_row(ctx, choose_default(ctx)) if firsts else None
    if row in systems:  # e.g. no hybrid rows on another collection's pool
        systems["served-default"] = dict(systems[row])
    return systems


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
        main["serving"] = {"dense_model": ctx.served_dense, "default": choose_default(ctx)}
    write_json_atomic(results_dir / f"{name}.json", main)
    md = markdown_table(main["systems"], f"{name} ({cfg.data.test_split})")
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
