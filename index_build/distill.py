"""The distill and export stages: a student trained from the teacher's scores, then exported
to ONNX (:func:`export_stage`). Full-tower students (dense, ColBERT, cross-encoder) by
Margin-MSE on the mined examples (:func:`index_build.train.train`); the asymmetric student,
a query encoder into the teacher's document space, by alignment and listwise KL
(:mod:`index_build.asymmetric`). Model selection on the dev slice."""

from __future__ import annotations

import logging
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from index_build.context import BuildContext
from index_build.metrics import metrics, per_query_ndcg, run_from_arrays
from models.dense_index import exact_search

log = logging.getLogger(__name__)


def distill_student(ctx: BuildContext, kind: str, out: Path, extra: Sequence = ()) -> dict:
    """Train full-tower student ``kind`` on the mined examples plus ``extra`` ones (the
    labelled path's pseudo-query examples) and save the best dev checkpoint to ``out/student``."""
    from index_build.sampling import cluster_queries
    from index_build.students import new_student, set_seed
    from index_build.train import train
    from models.sources import resolve_model

    mined = ctx.load_mined()
    tcfg = ctx.cfg.train[kind]
    examples = list(mined["examples"]) + list(extra)
    s = ctx.cfg.students
    overrides: dict[str, Any] = {"max_query_len": s.max_query_len, "max_doc_len": s.max_doc_len}
    if kind == "colbert":
        overrides.update(dim=s.colbert_dim, colbert_query_len=s.colbert_query_len)
    set_seed(tcfg.seed)  # the new head's init (ColBERT projection, classifier) is seeded too
    student = new_student(kind, resolve_model(s.base), **overrides)
    init: dict[str, Any] = {}
    if kind == "colbert" and tcfg.proj_init == "pca":
        from index_build.config import PROJ_INIT_DOCS
        from index_build.students import ColbertStudent

        assert isinstance(student, ColbertStudent)
        sample = random.Random(tcfg.seed).sample(ctx.corpus_texts, min(PROJ_INIT_DOCS, len(ctx.corpus_texts)))
        init = {"proj_init": "pca", "proj_variance_kept": round(student.init_projection_pca(sample), 4)}
    clusters = None
    if tcfg.tas_balanced:
        emb = ctx.base_dense.encode_queries([e.query for e in examples])
        clusters = cluster_queries(emb, tcfg.tas_clusters, seed=tcfg.seed)
    retrieval = tcfg.dev_retrieval and kind == "dense"
    dev_eval = dev_evaluator(ctx, mined["dev"], retrieval=retrieval)
    initial = ((lambda: base_dense_dev_score(ctx, mined["dev"], student, retrieval))
               if kind == "dense" else None)
    res = train(student, examples, ctx.corpus_texts, tcfg, ctx.work / f"train-{kind}",
                dev_eval=dev_eval, clusters=clusters, progress=ctx.progress, initial_dev=initial)
    shutil.copytree(ctx.work / f"train-{kind}" / "best", out / "student")
    return {**init, "steps": res.steps, "examples": len(examples), "best_dev_nDCG@10": round(res.best_dev, 4),
            "dev_history": res.dev_history, "train_seconds": round(res.seconds, 1),
            "final_loss": float(np.mean(res.loss_history[-20:])) if res.loss_history else None}



def base_dense_dev_score(ctx: BuildContext, dev: dict, student, retrieval: bool = True) -> float | None:
    """Dev nDCG@10 of an untrained dense ``student`` (full-corpus search, or with
    ``retrieval`` False reranking each dev query's pool) from the base model's cached
    corpus encodings (the mining stage's), which score like it when checkpoint, lengths,
    pooling and similarity agree (in fp32: the training loop evaluates at its training
    precision); None when they do not (then it is encoded anew)."""
    from models.sources import resolve_model

    base = ctx.base_dense.encoder.config
    same = Path(student.checkpoint) == resolve_model(ctx.cfg.students.base) and all(
        getattr(base, f) == getattr(student.config, f)
        for f in ("max_query_len", "max_doc_len", "pooling", "similarity", "dim"))
    if not same or not dev["qids"]:
        return None
    if not retrieval:
        return pool_dev_score(ctx, dev, ctx.base_dense.encode_queries(dev["queries"]),
                                   ctx.base_dense.doc_embeddings)
    s, i = ctx.base_dense.retrieve(dev["queries"], 100)
    return metrics(ctx.dev_qrels(dev), run_from_arrays(dev["qids"], ctx.collection.doc_ids, s, i))["nDCG@10"]


def asymmetric_training_texts(ctx: BuildContext, dev: dict) -> tuple[list[str], np.ndarray, dict[str, Any], np.ndarray]:
    """The asymmetric student's training queries, how often each is drawn per pass, what they
    are (counts) and, per query, the corpus index of the document it was cut from (-1 for a
    real query): a label-free build's query log (``label_free.query_log``),
    ``asymmetric.log_draws`` times each; the mined training queries (labelled, or the
    label-free pseudo-queries), every one of them, ``asymmetric.mined_draws`` times; plus, with
    ``asymmetric.pseudo_per_doc`` > 0, pseudo-queries from every document (titles, sentences,
    key-phrases, statements, random spans) up to ``asymmetric.max_queries`` in all, once each;
    never a dev or test query."""
    from index_build.pseudo_queries import (
        Generator,
        KeyphraseGenerator,
        SentenceGenerator,
        SpanGenerator,
        StatementGenerator,
        TitleGenerator,
        filter_queries,
    )

    a = ctx.cfg.asymmetric
    held_out = set(dev["queries"])
    if ctx.cfg.data.test_split in ctx.collection.qrels:
        held_out |= set(ctx.collection.split_queries(ctx.cfg.data.test_split).values())
    mined_file = ctx.load_mined()
    logged = set(mined_file.get("query_log", ()))
    source: dict[str, int] = {}
    if ctx.label_free:  # a label-free build's mined queries are pseudo-queries, their positive the source
        for e in mined_file["examples"]:
            if e.query not in logged and e.positives:
                source.setdefault(e.query, int(e.pool[e.positives[0]]))
    mined_all = [t for t in dict.fromkeys(e.query for e in mined_file["examples"]) if t not in held_out]
    mined = [t for t in mined_all if t not in logged]
    from_log = [t for t in mined_all if t in logged]
    pseudo: list[str] = []
    stats: dict[str, Any] = {}
    if a.pseudo_per_doc > 0:
        docs = ctx.collection.docs
        generators: list[Generator] = [TitleGenerator(), SentenceGenerator(per_doc=a.sentences_per_doc),
                                       KeyphraseGenerator(per_doc=a.keyphrases_per_doc)]
        if a.statements_per_doc > 0:
            generators.append(StatementGenerator(per_doc=a.statements_per_doc))
        if a.spans_per_doc > 0:
            generators.append(SpanGenerator(per_doc=a.spans_per_doc, seed=a.seed))
        generated = [q for g in generators for q in g.generate(docs)]
        kept, stats = filter_queries(generated, docs, per_doc=a.pseudo_per_doc)
        for q in kept:
            source.setdefault(q.text, q.doc)
        taken = set(mined_all)
        pseudo = [t for t in dict.fromkeys(q.text for q in kept) if t not in held_out and t not in taken]
    random.Random(a.seed).shuffle(pseudo)
    if a.max_queries:
        pseudo = pseudo[: max(0, a.max_queries - len(mined_all))]
    texts = from_log + mined + pseudo
    draws = np.array([a.log_draws] * len(from_log) + [a.mined_draws] * len(mined) + [1] * len(pseudo), np.int64)
    about = {"queries": len(texts), "mined": len(mined), "pseudo": len(pseudo), "mined_draws": a.mined_draws,
             "pseudo_filters": stats}
    if logged:
        about.update(query_log=len(from_log), log_draws=a.log_draws)
    return texts, draws, about, np.array([source.get(t, -1) for t in texts], np.int64)


def distill_asymmetric(ctx: BuildContext, out: Path) -> dict:
    """Distill the asymmetric student (:mod:`index_build.asymmetric`): alignment to the
    teacher's query vectors plus listwise KL over each training query's candidates to the
    full teacher or (``asymmetric.kl_target = "dense"``) its bi-encoder members; the
    checkpoint that retrieves the dev slice best is kept."""
    from index_build.asymmetric import (
        candidate_union,
        encode_queries,
        init_maps_by_ridge,
        member_scores,
        train_asymmetric,
    )
    from index_build.students import new_asymmetric_student, set_seed
    from index_build.teachers import BM25Teacher, cached_teacher_scores
    from models.sources import resolve_model

    a, space = ctx.cfg.asymmetric, ctx.teacher_space
    dev = ctx.load_mined()["dev"]
    texts, draws, about, sources = asymmetric_training_texts(ctx, dev)
    log.info("asymmetric student: %d training queries (%d mined, %d pseudo), %d dev; teacher space %s, dims %s",
             len(texts), about["mined"], about["pseudo"], len(dev["qids"]), space.names, space.dims)
    doc_parts = space.doc_parts()
    docs = np.hstack(doc_parts)
    q_parts = space.query_parts(texts)
    with_bm25 = any(isinstance(m, BM25Teacher) for m in ctx.teacher.members)
    pools = candidate_union(q_parts, doc_parts, ctx.bm25 if with_bm25 else None, texts, a.pool_depth)
    if a.kl_target == "dense":
        t_scores = member_scores(q_parts, doc_parts, pools, ctx.teacher_fusion["member_weights"])
    else:
        t_scores = cached_teacher_scores(ctx.teacher, ctx.cache, texts, pools, progress=ctx.progress)
    set_seed(a.seed)
    student = new_asymmetric_student(resolve_model(ctx.cfg.students.base), space.names, space.dims,
                                     head=a.head, head_hidden=a.head_hidden,
                                     max_query_len=ctx.cfg.students.max_query_len)
    head_init = init_maps_by_ridge(student, texts, q_parts, head_epochs=a.head_init_epochs, seed=a.seed,
                                   progress=ctx.progress)
    dev_eval = None
    if dev["qids"]:
        qrels = ctx.dev_qrels(dev)

        def dev_eval(model) -> float:
            s, i = exact_search(docs, encode_queries(model, dev["queries"]), 100)
            run = run_from_arrays(dev["qids"], ctx.collection.doc_ids, s, i)
            return round(float(per_query_ndcg(qrels, run, dev["qids"]).mean()), 4)

    history: list[dict[str, Any]] = []
    res = train_asymmetric(student, texts, np.hstack(q_parts), pools, t_scores, docs, a, dev_eval, history,
                           progress=ctx.progress, draws=draws, sources=sources)
    student.save(out / "student")
    return {**about, **res, "space": {"members": space.names, "dims": space.dims},
            "head": a.head, "head_init_cos": head_init,
            "mean_pool": float(np.mean([len(p) for p in pools])) if pools else 0.0, "dev_history": history}


#: training queries the hybrid head's ridge maps are fitted on, at most (evenly spaced)
HYBRID_HEAD_QUERIES = 20000


def hybrid_head_stage(ctx: BuildContext, out: Path) -> dict:
    """The asymmetric student's hybrid head, exported to ``out/onnx``: the base model's pooled
    query vector with a ridge map to each part of the teacher's space (the student's starting
    point, :func:`index_build.asymmetric.init_maps_by_ridge`, fitted on at most
    :data:`HYBRID_HEAD_QUERIES` of its training queries), and which query encoder serves the
    hybrid's dense parts (``asymmetric.hybrid_head``). The hybrid is the teacher's own fusion
    and scores the teacher's ranking exactly when fed the teacher's query vectors, so "auto"
    picks the closer copy of those on the dev slice (mean cosine per part, weighted as the
    parts are fused), which needs no judgments. The trained student is pulled away from that
    copy by its ranking loss against the full teacher (BM25 included), which makes it the
    better model alone and the worse partner for BM25 where the hybrid adds BM25 again."""
    import tempfile

    from index_build.asymmetric import init_maps_by_ridge, mean_cosine
    from index_build.export import export_student
    from index_build.students import new_asymmetric_student
    from models.encoders import DenseEncoder
    from models.sources import resolve_model

    space, choice = ctx.teacher_space, ctx.cfg.asymmetric.hybrid_head
    dev = ctx.load_mined()["dev"]
    texts, _, _, _ = asymmetric_training_texts(ctx, dev)
    texts = texts[:: max(1, -(-len(texts) // HYBRID_HEAD_QUERIES))]
    head = new_asymmetric_student(resolve_model(ctx.cfg.students.base), space.names, space.dims,
                                  max_query_len=ctx.cfg.students.max_query_len)
    fit = init_maps_by_ridge(head, texts, space.query_parts(texts), progress=ctx.progress)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        head.save(Path(tmp))
        rep = export_student(Path(tmp), out / "onnx", int8=ctx.cfg.export_int8, parity_texts=texts[:8],
                             per_channel=ctx.cfg.export_int8_per_channel,
                             int8_activations=ctx.cfg.export_int8_activations)
    record: dict[str, Any] = {"fit_queries": len(texts), "fit_cosine": fit, "parity_max_abs_diff": rep.max_abs_diff,
                              "int8_max_abs_diff": rep.int8_max_abs_diff, "choice": choice}
    serves = choice == "ridge"
    if choice == "auto":
        if dev["qids"]:
            teacher = space.query_vectors(dev["queries"])
            parts = ctx.teacher_fusion["parts"]
            encoded = {"ridge": DenseEncoder(out / "onnx", threads=ctx.cfg.threads).encode_queries(dev["queries"]),
                       "student": ctx.dense_queries(dev["queries"], "asymmetric")}
            cosine = {name: round(sum(w * mean_cosine(q[:, a:b], teacher[:, a:b]) for w, a, b in
                                      zip(parts.weights, parts.bounds, parts.bounds[1:])) / sum(parts.weights), 4)
                      for name, q in encoded.items()}
            serves = cosine["ridge"] > cosine["student"]
            record["dev_cosine"] = cosine
        record["chosen_on"] = (f"weighted mean cosine to the teacher's query vectors on {len(dev['qids'])} dev queries"
                               if dev["qids"] else "no dev queries: the trained student")
    record["serves_hybrid"] = "ridge" if serves else "student"
    log.info("hybrid head: %s serves the hybrid's dense parts (%s)", record["serves_hybrid"],
             record.get("dev_cosine", choice))
    return record


def pool_dev_score(ctx: BuildContext, dev: dict, queries: np.ndarray, doc_embeddings: np.ndarray) -> float:
    """Dev nDCG@10 of a dense model reranking each dev query's pool, from its query vectors
    and its (cached) corpus vectors: what :meth:`dev_evaluator` measures, without encoding
    the pools again."""
    doc_ids = ctx.collection.doc_ids
    run = {}
    for qid, q, pool in zip(dev["qids"], queries, dev["pools"]):
        pool = np.asarray(pool, dtype=np.int64)
        run[qid] = {doc_ids[int(d)]: float(v) for d, v in zip(pool, doc_embeddings[pool] @ q)}
    return metrics(ctx.dev_qrels(dev), run)["nDCG@10"]


def dev_evaluator(ctx: BuildContext, dev: dict, retrieval: bool = False) -> Callable | None:
    """nDCG@10 on the dev slice: reranking each dev query's candidate pool, or (dense,
    ``retrieval``) exact search over the whole corpus encoded by the student being trained."""
    if not dev["qids"]:
        return None
    qrels = ctx.dev_qrels(dev)
    doc_ids = ctx.collection.doc_ids

    def evaluate_retrieval(student) -> float:
        from tqdm import tqdm

        from models.encoders import length_sorted_batches

        texts = ctx.corpus_texts
        emb = np.zeros((len(texts), student.config.dim), np.float32)
        lengths = student.tokenizer.token_lengths(texts)
        for idx in tqdm(list(length_sorted_batches(lengths, 64)), desc="dev corpus encode", leave=False,
                        disable=not ctx.progress):
            emb[idx] = student.encode_docs([texts[i] for i in idx]).cpu().numpy()
        q = student.encode_queries(dev["queries"]).cpu().numpy()
        s, i = exact_search(emb, q, 100)
        return metrics(qrels, run_from_arrays(dev["qids"], doc_ids, s, i))["nDCG@10"]

    def evaluate(student) -> float:
        from index_build.train import pool_scores

        scores = pool_scores(student, dev["queries"], dev["pools"], ctx.corpus_texts, progress=ctx.progress)
        run = {qid: {doc_ids[int(d)]: float(v) for d, v in zip(pool, sc)}
               for qid, pool, sc in zip(dev["qids"], dev["pools"], scores)}
        return metrics(qrels, run)["nDCG@10"]

    return evaluate_retrieval if retrieval else evaluate


def export_stage(ctx: BuildContext, kind: str, out: Path) -> dict:
    """Export distilled student ``kind`` to ``out/onnx`` (fp32 and, with ``export_int8``, int8
    graphs, checked against the torch model on a few corpus texts); a dense or ColBERT
    student is first interpolated with its base model when ``wise_ft`` < 1 (WiSE-FT), and the
    interpolated model's dev score recorded."""
    import tempfile

    from index_build.export import export_student
    from index_build.students import interpolate_with_base, load_student
    from models.sources import resolve_model

    step = max(1, len(ctx.corpus_texts) // 8)
    texts = [ctx.corpus_texts[i] for i in range(0, len(ctx.corpus_texts), step)][:8]
    src = ctx.work / f"distill-{kind}" / "student"
    alpha = ctx.wise_ft(kind)
    record: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        if alpha != 1.0:
            student = interpolate_with_base(load_student(src), resolve_model(ctx.cfg.students.base), alpha)
            student.save(Path(tmp))
            src = Path(tmp)
        rep = export_student(src, out / "onnx", int8=ctx.cfg.export_int8, parity_texts=texts,
                             per_channel=ctx.cfg.export_int8_per_channel,
                             int8_activations=ctx.cfg.export_int8_activations)
        if alpha != 1.0:
            record = exported_dev_score(ctx, kind, student)
    return {"parity_max_abs_diff": rep.max_abs_diff, "int8_max_abs_diff": rep.int8_max_abs_diff,
            "int8_fp32_nodes": rep.int8_fp32_nodes,
            "wise_ft": alpha, **record}



def exported_dev_score(ctx: BuildContext, kind: str, student) -> dict[str, float]:
    """The dev-slice nDCG@10 of a WiSE-FT-interpolated, just exported student, measured like
    the training loop's model selection (so it compares with the distill stage's
    ``dev_history``). A dense student is scored through the exported graph, whose corpus
    encodings are cached for the evaluate and artifact stages (so this costs no extra pass)."""
    import torch

    tcfg = ctx.cfg.train[kind]
    dev = ctx.load_mined()["dev"]
    if not dev["qids"]:
        return {}
    if kind == "dense" and tcfg.dev_retrieval:
        return {"dev_nDCG@10": round(ctx.dense_metrics(dev["qids"], dev["queries"], ctx.dev_qrels(dev))
                                     ["nDCG@10"], 4)}
    if kind == "dense":  # the pools reranked with the exported graph's corpus encodings
        from models.encoders import DenseEncoder

        q = ctx.student_encoder(DenseEncoder, "dense").encode_queries(dev["queries"])
        return {"dev_nDCG@10": round(pool_dev_score(ctx, dev, q, ctx.dense_corpus()), 4)}
    dev_eval = dev_evaluator(ctx, dev)
    assert dev_eval is not None
    student.eval()
    with torch.inference_mode():
        return {"dev_nDCG@10": round(float(dev_eval(student)), 4)}
