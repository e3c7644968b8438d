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
from index_build.cache import ArrayCache  # noqa: E402
from index_build.data import load_collection  # noqa: E402
from index_build.evaluate import markdown_table, metrics, one_se_choice, per_query_ndcg  # noqa: E402
from index_build.pseudo_queries import (  # noqa: E402
    KeyphraseGenerator,
    SentenceGenerator,
    TitleGenerator,
    filter_queries,
)
from index_build.teachers import BiEncoderTeacher, exact_topk  # noqa: E402
from models.fusion import normalize  # noqa: E402
from models.retrieval import Ranked, fuse_hybrid  # noqa: E402
from models.sources import cache_dir, resolve_model  # noqa: E402
from models.sparse_index import BM25Index  # noqa: E402

WEIGHT_GRID = [round(0.1 * i, 1) for i in range(11)]


# -- the teacher's space --------------------------------------------------------------------------
def teacher_query_vectors(members: list[BiEncoderTeacher], texts: list[str]) -> np.ndarray:
    """``[q_member1; q_member2; ...]``: dotted with the concatenated document vectors it gives
    the sum of the members' cosines."""
    return np.hstack([m.encode_queries(texts) for m in members]).astype(np.float32)


def ensemble_scores(parts: list[np.ndarray]) -> np.ndarray:
    """Equal-weight sum of per-query z-scores of each member's scores over one pool."""
    return np.sum([normalize(p) for p in parts], axis=0)


def pools_and_teacher(q_members: list[np.ndarray], member_docs: list[np.ndarray], bm25: BM25Index,
                      texts: list[str], depth: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per query, the union of the three members' top-``depth`` and the ensemble's scores on it."""
    tops = [exact_topk(d, q, depth)[1] for q, d in zip(q_members, member_docs)]
    _, bm_top = bm25.search(texts, depth)
    pools, scores = [], []
    for r, text in enumerate(texts):
        pool = np.unique(np.concatenate([t[r] for t in tops] + [bm_top[r][bm_top[r] >= 0]])).astype(np.int64)
        parts = [d[pool] @ q[r] for q, d in zip(q_members, member_docs)] + [bm25.scores(text)[pool]]
        pools.append(pool)
        scores.append(ensemble_scores(parts).astype(np.float32))
    return pools, scores


def ridge_map(x: np.ndarray, y: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """``W`` minimizing ``|x W - y|^2 + alpha |W|^2`` (``[dim_x, dim_y]``)."""
    return np.linalg.solve(x.T @ x + alpha * np.eye(x.shape[1]), x.T @ y).astype(np.float32)


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# -- evaluation -----------------------------------------------------------------------------------
def dense_run(qids: list[str], doc_ids: list[str], q: np.ndarray, docs: np.ndarray, depth: int = 100):
    s, i = exact_topk(docs, q, depth)
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


# -- the student ----------------------------------------------------------------------------------
def make_student(w_init: np.ndarray, max_query_len: int):
    import torch
    from torch import nn

    from index_build.students import DenseStudent
    from models.encoders import EncoderConfig

    class AsymmetricQueryStudent(nn.Module):
        """MiniLM's normalized pooled query state, and a linear map of it to the second
        member's space, normalized: ``[u; normalize(W u)]``."""

        def __init__(self) -> None:
            super().__init__()
            self.base = DenseStudent(resolve_model("packaged:minilm"),
                                     EncoderConfig(kind="dense", max_query_len=max_query_len))
            self.proj = nn.Linear(w_init.shape[0], w_init.shape[1], bias=False)
            with torch.no_grad():
                self.proj.weight.copy_(torch.from_numpy(w_init.T.copy()))

        def forward(self, texts: list[str]) -> torch.Tensor:
            u = self.base.encode_queries(texts)
            return torch.cat([u, torch.nn.functional.normalize(self.proj(u), dim=-1)], dim=-1)

    return AsymmetricQueryStudent()


def encode_student(student, texts: list[str], batch: int = 128) -> np.ndarray:
    import torch

    student.eval()
    out = []
    with torch.no_grad():
        order = np.argsort([len(t) for t in texts])
        for start in range(0, len(texts), batch):
            idx = order[start : start + batch]
            out.append((idx, student([texts[i] for i in idx]).numpy()))
    vecs = np.zeros((len(texts), out[0][1].shape[1]), np.float32)
    for idx, v in out:
        vecs[idx] = v
    return vecs


def train_student(student, texts: list[str], q_teacher: np.ndarray, pools: list[np.ndarray],
                  t_scores: list[np.ndarray], docs: np.ndarray, *, epochs: float, batch: int, lr: float,
                  kl_weight: float, pool_size: int, scale: float, dev_eval, eval_every: int, seed: int,
                  log: list[dict[str, Any]]) -> dict[str, Any]:
    """Alignment MSE to the teacher's query vectors plus listwise KL over each query's pool;
    keeps the parameters that scored best on the dev slice."""
    import copy

    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    docs_t = torch.from_numpy(docs)
    opt = torch.optim.AdamW([
        {"params": student.base.parameters(), "lr": lr},
        {"params": student.proj.parameters(), "lr": lr * 10},
    ], weight_decay=0.01)
    steps = int(epochs * len(texts) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10))
                                              * max(0.0, (steps - s) / steps))
    best = {"dev": dev_eval(student), "step": 0, "state": copy.deepcopy(student.state_dict())}
    log.append({"step": 0, "dev_nDCG@10": best["dev"]})
    started = time.perf_counter()
    order = rng.permutation(len(texts))
    pos = 0
    for step in range(1, steps + 1):
        if pos + batch > len(order):
            order, pos = rng.permutation(len(texts)), 0
        idx = order[pos : pos + batch]
        pos += batch
        student.train()
        q = student([texts[i] for i in idx])
        target = torch.from_numpy(q_teacher[idx])
        loss = F.mse_loss(q, target, reduction="sum") / len(idx)
        if kl_weight > 0:
            kl = torch.zeros(())
            for row, i in enumerate(idx):
                pool, ts = pools[i], t_scores[i]
                if len(pool) > pool_size:  # the teacher's top half of the sample, the rest at random
                    top = np.argsort(-ts)[: pool_size // 2]
                    rest = rng.choice(np.setdiff1d(np.arange(len(pool)), top), pool_size - len(top), replace=False)
                    keep = np.concatenate([top, rest])
                    pool, ts = pool[keep], ts[keep]
                s = scale * (docs_t[torch.from_numpy(pool)] @ q[row])
                kl = kl + F.kl_div(F.log_softmax(s, -1), F.log_softmax(torch.from_numpy(ts), -1),
                                   log_target=True, reduction="sum")
            loss = loss + kl_weight * kl / len(idx)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            dev = dev_eval(student)
            log.append({"step": step, "loss": round(float(loss), 4), "dev_nDCG@10": dev,
                        "seconds": round(time.perf_counter() - started, 1)})
            print(log[-1], flush=True)
            if dev > best["dev"]:
                best = {"dev": dev, "step": step, "state": copy.deepcopy(student.state_dict())}
    student.load_state_dict(best["state"])
    return {"steps": steps, "best_step": best["step"], "best_dev_nDCG@10": best["dev"],
            "train_seconds": round(time.perf_counter() - started, 1)}


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
    members = [BiEncoderTeacher("packaged:minilm", texts, cache),
               BiEncoderTeacher("packaged:mpnet", texts, cache, int8=True)]
    t = time.perf_counter()
    member_docs = [m.doc_embeddings.astype(np.float32) for m in members]
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

    q_fit = [m.encode_queries(fit_texts) for m in members]
    q_teacher = np.hstack(q_fit).astype(np.float32)
    t = lap("teacher query vectors (training queries)", t)
    pools, t_scores = pools_and_teacher(q_fit, member_docs, bm25, fit_texts, pool_depth)
    t = lap("training pools and teacher scores", t)

    systems: dict[str, dict[str, float]] = {}
    weights: dict[str, Any] = {}
    bm_test, bm_dev = bm25.search(test_texts, 100), bm25.search(dev_texts, 100)
    from index_build.evaluate import run_from_arrays

    systems["bm25"] = metrics(qrels, run_from_arrays(test_qids, doc_ids, *bm_test))
    q_test = [m.encode_queries(test_texts) for m in members]
    q_dev = [m.encode_queries(dev_texts) for m in members]
    run, _ = dense_run(test_qids, doc_ids, q_test[0], member_docs[0])
    systems["base-dense"] = metrics(qrels, run)
    t_pools, t_test = pools_and_teacher(q_test, member_docs, bm25, test_texts, 100)
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

    student = make_student(w_ridge, max_query_len)

    def dev_eval(model) -> float:
        vecs = encode_student(model, dev_texts)
        run, _ = dense_run(dev_qids, doc_ids, vecs, docs)
        return round(float(per_query_ndcg(dev_qrels, run, dev_qids).mean()), 4)

    history: list[dict[str, Any]] = []
    training = train_student(student, fit_texts, q_teacher, pools, t_scores, docs, epochs=epochs, batch=batch,
                             lr=lr, kl_weight=kl_weight, pool_size=pool_size, scale=scale, dev_eval=dev_eval,
                             eval_every=eval_every, seed=seed, log=history)
    t = lap("student training", t)
    add_dense_rows("asym-dense", encode_student(student, test_texts), encode_student(student, dev_texts))
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
