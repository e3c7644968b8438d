"""Asymmetric distillation on SciFact: a query-only student in the teacher's document space.

Documents are encoded once by the teacher's two dense members (all-MiniLM-L6-v2 in fp32,
all-mpnet-base-v2 as the builder's int8 graph) and concatenated, ``D = [d_minilm; d_mpnet]``
(each part L2-normalized), so the teacher's own query vector ``[q_minilm; q_mpnet]`` scores
``cos_minilm + cos_mpnet``. The student encodes queries only: all-MiniLM-L6-v2 whose pooled
state gives the MiniLM part, plus a linear map (initialized by ridge regression) to the
mpnet part, each normalized. Since documents are fixed vectors, a training step pushes only
queries (a few dozen tokens) through the network, so the student sees every training and
pseudo-query the corpus yields.

Rows (SciFact test, nDCG@10 / RR@10 / R@100; the test queries are never trained or tuned on):

- ``bm25``, ``base-dense`` (all-MiniLM-L6-v2 alone);
- ``teacher``: the three-member ensemble (BM25 + MiniLM + mpnet, per-query z-scores, equal
  weights) over the union of the members' top-100;
- ``teacher-concat``: the teacher's own query vector against ``D`` (its two dense members, summed);
- ``asym-ridge``: MiniLM's query embedding plus its ridge map to mpnet's space, no training;
- ``asym-dense``: the trained student (alignment MSE to the teacher's query vector plus
  listwise KL to the three-member teacher over each training query's pool);
- ``*-hybrid``: fused with BM25 by :func:`models.retrieval.fuse_hybrid`, the weight chosen
  on the dev slice (10% of the train queries) by the one-standard-error rule.

Writes ``benchmarks/results/asymmetric.json`` and ``.md``::

    .venv/bin/python benchmarks/asymmetric.py            # about 30 min cold on 2 cores
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import typer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.latency import command_line, machine_info, write_json_atomic  # noqa: E402
from index_build.asymmetric import (  # noqa: E402
    TeacherSpace,
    encode_queries,
    init_maps_by_ridge,
    teacher_pools,
    train_asymmetric,
)
from index_build.cache import ArrayCache  # noqa: E402
from index_build.config import AsymmetricConfig  # noqa: E402
from index_build.data import load_collection  # noqa: E402
from index_build.metrics import markdown_table, metrics, one_se_choice, per_query_ndcg  # noqa: E402
from index_build.pseudo_queries import (  # noqa: E402
    KeyphraseGenerator,
    SentenceGenerator,
    TitleGenerator,
    filter_queries,
)
from index_build.students import new_asymmetric_student, ridge_map  # noqa: E402
from index_build.teachers import BiEncoderTeacher  # noqa: E402
from models.dense_index import exact_search  # noqa: E402
from models.retrieval import Ranked, fuse_hybrid  # noqa: E402
from models.sources import cache_dir, resolve_model  # noqa: E402
from models.sparse_index import BM25Index  # noqa: E402

WEIGHT_GRID = [round(0.1 * i, 1) for i in range(11)]


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# -- evaluation -----------------------------------------------------------------------------------
def dense_run(qids: list[str], doc_ids: list[str], q: np.ndarray, docs: np.ndarray, depth: int = 100):
    s, i = exact_search(docs, q, depth)
    return {qid: {doc_ids[int(j)]: float(x) for j, x in zip(i[r], s[r])} for r, qid in enumerate(qids)}, (s, i)


def hybrid_run(qids: list[str], doc_ids: list[str], dense: tuple[np.ndarray, np.ndarray],
               bm: tuple[np.ndarray, np.ndarray], weight: float, depth: int = 100):
    run = {}
    for r, qid in enumerate(qids):
        d = Ranked(dense[1][r].astype(np.int64), dense[0][r])
        keep = bm[1][r] >= 0
        b = Ranked(bm[1][r][keep].astype(np.int64), bm[0][r][keep])
        fused = fuse_hybrid(d, b, (weight, 1.0 - weight), depth)
        run[qid] = {doc_ids[int(j)]: float(x) for j, x in zip(*fused)}
    return run


def tune_hybrid(dev_qids, doc_ids, dev_qrels, dense, bm) -> tuple[float, dict[str, float]]:
    per_query = {w: per_query_ndcg(dev_qrels, hybrid_run(dev_qids, doc_ids, dense, bm, w), dev_qids)
                 for w in WEIGHT_GRID}
    return one_se_choice(per_query, prior=0.5), {str(w): round(float(v.mean()), 4) for w, v in per_query.items()}


# -- the run --------------------------------------------------------------------------------------
def main(
    data: Path = typer.Option(REPO.parent / "shared" / "data" / "scifact", help="BEIR folder with train and test"),
    out: Path = typer.Option(REPO / "benchmarks" / "results" / "asymmetric", help="output path without suffix"),
    epochs: float = typer.Option(2.0), batch: int = typer.Option(32), lr: float = typer.Option(2e-5),
    kl_weight: float = typer.Option(1.0), pool_size: int = typer.Option(64), scale: float = typer.Option(20.0),
    pool_depth: int = typer.Option(50, help="each member's top-k in a training query's pool"),
    max_query_len: int = typer.Option(64), eval_every: int = typer.Option(200), seed: int = typer.Option(13),
) -> None:
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.perf_counter() - since, 1)
        print(f"{name}: {timings[name]} s", flush=True)
        return time.perf_counter()

    col = load_collection(data)
    doc_ids, texts = col.doc_ids, col.doc_texts()
    cache = ArrayCache(cache_dir() / "arrays.sqlite")
    space = TeacherSpace([BiEncoderTeacher("packaged:minilm", texts, cache),
                          BiEncoderTeacher("packaged:mpnet", texts, cache, int8=True)])
    t = time.perf_counter()
    member_docs = space.doc_parts()
    docs = np.hstack(member_docs)
    bm25 = BM25Index.build(texts)
    t = lap("corpus (cached teacher encodings, BM25)", t)

    # queries: the train split minus a 10% dev slice, plus the corpus's pseudo-queries; test apart
    train_q = col.split_queries("train")
    qids = sorted(train_q)
    random.Random(seed).shuffle(qids)
    n_dev = max(1, len(qids) // 10)
    dev_qids, fit_qids = qids[:n_dev], qids[n_dev:]
    pseudo = []
    for gen in (TitleGenerator(), SentenceGenerator(per_doc=2), KeyphraseGenerator()):
        pseudo += gen.generate(col.docs)
    pseudo, pseudo_stats = filter_queries(pseudo, col.docs, per_doc=5)
    fit_texts = list(dict.fromkeys([train_q[q] for q in fit_qids] + [p.text for p in pseudo]))
    test_q = col.split_queries("test")
    test_qids, test_texts = list(test_q), list(test_q.values())
    dev_texts = [train_q[q] for q in dev_qids]
    dev_qrels = {q: col.qrels["train"][q] for q in dev_qids}
    qrels = col.qrels["test"]
    print(f"{len(fit_texts)} training queries ({len(fit_qids)} labelled + pseudo), {len(dev_qids)} dev", flush=True)

    q_fit = space.query_parts(fit_texts)
    q_teacher = np.hstack(q_fit)
    t = lap("teacher query vectors (training queries)", t)
    pools, t_scores = teacher_pools(q_fit, member_docs, bm25, fit_texts, pool_depth)
    t = lap("training pools and teacher scores", t)

    systems: dict[str, dict[str, float]] = {}
    weights: dict[str, Any] = {}
    bm_test, bm_dev = bm25.search(test_texts, 100), bm25.search(dev_texts, 100)
    from index_build.metrics import run_from_arrays

    systems["bm25"] = metrics(qrels, run_from_arrays(test_qids, doc_ids, *bm_test))
    q_test = space.query_parts(test_texts)
    q_dev = space.query_parts(dev_texts)
    run, _ = dense_run(test_qids, doc_ids, q_test[0], member_docs[0])
    systems["base-dense"] = metrics(qrels, run)
    t_pools, t_test = teacher_pools(q_test, member_docs, bm25, test_texts, 100)
    systems["teacher"] = metrics(qrels, {qid: {doc_ids[int(j)]: float(x) for j, x in zip(p, s)}
                                         for qid, p, s in zip(test_qids, t_pools, t_test)})

    def add_dense_rows(name: str, test_vecs: np.ndarray, dev_vecs: np.ndarray) -> None:
        run, arrays = dense_run(test_qids, doc_ids, test_vecs, docs)
        systems[name] = metrics(qrels, run)
        _, dev_arrays = dense_run(dev_qids, doc_ids, dev_vecs, docs)
        w, curve = tune_hybrid(dev_qids, doc_ids, dev_qrels, dev_arrays, bm_dev)
        weights[f"{name}-hybrid"] = {"dense_weight": w, "dev_nDCG@10": curve}
        systems[f"{name}-hybrid"] = metrics(qrels, hybrid_run(test_qids, doc_ids, arrays, bm_test, w))

    add_dense_rows("teacher-concat", np.hstack(q_test), np.hstack(q_dev))
    w_ridge = ridge_map(q_fit[0], q_fit[1])
    add_dense_rows("asym-ridge", np.hstack([q_test[0], l2(q_test[0] @ w_ridge)]),
                   np.hstack([q_dev[0], l2(q_dev[0] @ w_ridge)]))
    t = lap("reference rows", t)

    # the student: MiniLM's pooled query state mapped to each member's part (ridge fits on
    # the training queries to start), trained by alignment and listwise KL
    student = new_asymmetric_student(resolve_model("packaged:minilm"), space.names, space.dims,
                                     max_query_len=max_query_len)
    init_maps_by_ridge(student, fit_texts, q_fit)

    def dev_eval(model) -> float:
        run, _ = dense_run(dev_qids, doc_ids, encode_queries(model, dev_texts), docs)
        return round(float(per_query_ndcg(dev_qrels, run, dev_qids).mean()), 4)

    history: list[dict[str, Any]] = []
    train_cfg = AsymmetricConfig(epochs=epochs, batch=batch, lr=lr, kl_weight=kl_weight, pool_size=pool_size,
                                      scale=scale, eval_every=eval_every, seed=seed)
    training = train_asymmetric(student, fit_texts, q_teacher, pools, t_scores, docs, train_cfg, dev_eval, history)
    t = lap("student training", t)
    add_dense_rows("asym-dense", encode_queries(student, test_texts), encode_queries(student, dev_texts))
    lap("student evaluation", t)

    result = {
        "collection": data.name, "split": "test", "systems": systems, "hybrid_weights": weights,
        "training": {**training, "queries": len(fit_texts), "labelled": len(fit_qids), "dev": len(dev_qids),
                     "pseudo": pseudo_stats, "history": history,
                     "config": {"epochs": epochs, "batch": batch, "lr": lr, "kl_weight": kl_weight,
                                "pool_size": pool_size, "pool_depth": pool_depth, "scale": scale,
                                "max_query_len": max_query_len, "seed": seed}},
        "space": {"members": ["packaged:minilm (fp32)", "packaged:mpnet (int8 graph)"], "dim": int(docs.shape[1]),
                  "bytes_per_doc_fp32": int(docs.shape[1] * 4)},
        "seconds": {**timings, "total": round(time.perf_counter() - started, 1)},
        "machine": machine_info(), "command": command_line(__file__),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out.with_suffix(".json"), result)
    out.with_suffix(".md").write_text(markdown_table(systems, f"{data.name} (test), asymmetric distillation"))
    print(json.dumps({k: v["nDCG@10"] for k, v in systems.items()}, indent=2))


if __name__ == "__main__":
    typer.run(main)
