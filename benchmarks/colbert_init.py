"""Where a ColBERT student built from the base checkpoint starts on TREC DL: MaxSim over
all-MiniLM-L6-v2's token states under each way of initializing the projection, next to the
same checkpoint's mean-pooled (dense) score, all reranking the BM25 run's top-100 of each
pool; writes ``benchmarks/results/colbert-init.json`` (+ ``colbert-init.md``).

    .venv/bin/python benchmarks/colbert_init.py [--pools dl19,dl20]

Every row uses the builder's ColBERT inputs (``[Q]`` queries padded with ``[MASK]`` to 32
tokens, ``[D]`` documents truncated at 256 word pieces, punctuation skiplist) and its
evaluation (nDCG@10 with grade >= 2 relevant, as ``index-build evaluate`` scores TREC DL).
Projections (token states ``[*, 384]`` -> L2-normalized vectors):

- ``identity-384``: none (MaxSim over the normalized token states themselves)
- ``pca-128``: the top 128 principal directions of the pool's document token states
- ``orthogonal-128``: a random orthonormal projection (seed 0)
- ``student-init-128``: the ColBERT student's own initialization (``nn.Linear``'s, seeded
  as the builder seeds it)

No training and no judgments are involved in any projection: the file says how much late
interaction the checkpoint offers before distillation, against its dense score on the same
candidates (the ``base-dense`` row of ``trec-dl.json``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import typer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from index_build.metrics import markdown_table, metrics, write_json_atomic  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "colbert-init.json"
DATA = Path(os.environ.get("NRS_SHARED_DATA", REPO.parent / "shared" / "data"))
PCA_SAMPLE_TOKENS = 200_000  # document token states the PCA is fitted on (the first, in pool order)


def projections(doc_states: np.ndarray, student_init: np.ndarray, dim: int = 128,
                seed: int = 0) -> dict[str, np.ndarray]:
    """Each projection as a ``[out, hidden]`` matrix (see the module docstring).

    >>> p = projections(np.random.default_rng(0).normal(size=(300, 8)), np.ones((4, 8)), dim=4)
    >>> {k: v.shape for k, v in p.items()}
    {'identity-8': (8, 8), 'pca-4': (4, 8), 'orthogonal-4': (4, 8), 'student-init-4': (4, 8)}
    """
    import torch

    from index_build.students import principal_directions

    hidden = doc_states.shape[1]
    reduced = min(dim, hidden)  # a reduction to at most the states' own width
    pca, _ = principal_directions(torch.from_numpy(np.asarray(doc_states[:PCA_SAMPLE_TOKENS])), reduced)
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(hidden, reduced)))
    student_init = np.asarray(student_init, dtype=np.float32)
    return {f"identity-{hidden}": np.eye(hidden, dtype=np.float32),
            f"pca-{reduced}": pca.numpy().astype(np.float32),
            f"orthogonal-{reduced}": np.ascontiguousarray(q.T, dtype=np.float32),
            f"student-init-{student_init.shape[0]}": student_init}


def maxsim_run(query_states: dict[str, np.ndarray], doc_states: dict[str, np.ndarray],
               candidates: dict[str, list[str]], projection: np.ndarray) -> dict[str, dict[str, float]]:
    """MaxSim of each query's projected, normalized token vectors against its candidates'."""
    def project(x: np.ndarray) -> np.ndarray:
        y = x @ projection.T
        return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)

    docs = {d: project(v) for d, v in doc_states.items()}
    run = {}
    for qid, cands in candidates.items():
        qv = project(query_states[qid])
        run[qid] = {d: float((qv @ docs[d].T).max(axis=1).sum()) for d in cands}
    return run


def evaluate_pool(path: Path, model: str, seed: int) -> dict:
    from index_build.data import load_collection, load_trec_run
    from index_build.export import base_dense_onnx
    from index_build.students import ColbertStudent, new_student, set_seed
    from models.encoders import DenseEncoder
    from models.sources import resolve_model

    col = load_collection(path, unknown_docs="keep")
    qrels = col.qrels[next(iter(col.qrels))]
    run_in = load_trec_run(path / "runs" / "BM25.trec", depth=100)
    qids = [q for q in col.queries if q in qrels and q in run_in]
    candidates = {q: [d for d, _ in run_in[q]] for q in qids}
    texts = {d.id: d.full_text for d in col.docs}
    uniq = sorted({d for q in qids for d in candidates[q]})

    dense = DenseEncoder(base_dense_onnx(model)[0])
    t0 = time.perf_counter()
    q_emb = dense.encode_queries([col.queries[q] for q in qids])
    d_emb = dict(zip(uniq, dense.encode_docs([texts[d] for d in uniq])))  # each pooled document once
    dense_run = {q: {d: float(d_emb[d] @ q_emb[r]) for d in candidates[q]} for r, q in enumerate(qids)}
    dense_s = time.perf_counter() - t0

    set_seed(seed)  # as the builder seeds a student's new head (Pipeline.distill)
    student = new_student("colbert", resolve_model(model)).eval()
    assert isinstance(student, ColbertStudent)
    t0 = time.perf_counter()
    doc_states = {d: t.numpy() for d, t in zip(uniq, student.token_states([texts[d] for d in uniq], batch_size=32))}
    query_states = {q: t.numpy() for q, t in
                    zip(qids, student.token_states([col.queries[q] for q in qids], queries=True, batch_size=32))}
    encode_s = time.perf_counter() - t0

    systems = {"base-dense (mean pooling)": metrics(qrels, dense_run, min_rel=2)}
    for name, proj in projections(np.concatenate([doc_states[d] for d in uniq]),
                                  student.proj.weight.detach().numpy(), student.config.dim, seed).items():
        systems[f"maxsim {name}"] = metrics(qrels, maxsim_run(query_states, doc_states, candidates, proj), min_rel=2)
    return {"queries": len(qids), "documents": len(uniq),
            "systems": {k: {m: round(v, 4) for m, v in s.items()} for k, s in systems.items()},
            "seconds": {"dense": round(dense_s, 1), "token_states": round(encode_s, 1)}}


def main(pools: str = typer.Option("dl19,dl20", help="comma-separated TREC DL pools under shared data"),
         model: str = typer.Option("packaged:minilm", help="checkpoint (a model source)"),
         seed: int = typer.Option(13, help="torch seed before the student is built (the builder's default)")) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    results = {}
    for pool in [p.strip() for p in pools.split(",") if p.strip()]:
        results[pool] = evaluate_pool(DATA / "trec-dl" / pool, model, seed)
        logging.info("%s: %s", pool, json.dumps(results[pool]["systems"]))
    data = {"model": model, "seed": seed, "pools": results, "command": "python benchmarks/colbert_init.py"}
    write_json_atomic(OUT, data)
    OUT.with_suffix(".md").write_text("\n".join(
        markdown_table(r["systems"], f"TREC {pool.upper()}, rerank of BM25 top-100, {model} without training")
        for pool, r in results.items()) + f"\n`{data['command']}`\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    typer.run(main)
