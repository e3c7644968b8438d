"""Teacher candidates on the evaluation collections; writes ``benchmarks/results/teachers.json``
(+ ``teachers.md``).

    .venv/bin/python benchmarks/teachers.py [--collections scifact,dl19,dl20] [--scifact-fp32-mpnet]

Each teacher scores candidate lists exactly as the builder's teacher does (members z-scored per
query, equal weights): on SciFact the union of the BM25 and base MiniLM top-100 of each test
query, on TREC DL the top-100 of ``runs/BM25.trec``. On TREC DL it also compares the precision
of all-mpnet-base-v2's graph: fp32, int8 with one scale per weight matrix ("per tensor") and int8
with one scale per output column ("per channel", what an ``int8 = true`` member runs).

A fresh array cache is used: a row's seconds include encoding the documents of members no earlier row used
(SciFact: the corpus; TREC DL: the candidates only). SciFact's fp32 mpnet pass takes about 15 min
on 2 cores, so it runs only with ``--scifact-fp32-mpnet``.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import typer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from index_build.cache import ArrayCache  # noqa: E402
from index_build.config import load_config  # noqa: E402
from index_build.data import load_collection, load_trec_run  # noqa: E402
from index_build.metrics import markdown_table, metrics, write_json_atomic  # noqa: E402
from index_build.stages import Pipeline  # noqa: E402
from index_build.teachers import TeacherSpec, build_teacher, cached_teacher_scores  # noqa: E402

BM25 = {"kind": "bm25"}
MINILM = {"kind": "bi-encoder", "model": "packaged:minilm"}
MPNET8 = {"kind": "bi-encoder", "model": "packaged:mpnet", "int8": True}
MPNET = {"kind": "bi-encoder", "model": "packaged:mpnet"}
TEACHERS: dict[str, list[dict]] = {
    "bm25": [BM25], "minilm": [MINILM], "mpnet-int8": [MPNET8],
    "bm25+minilm": [BM25, MINILM], "minilm+mpnet-int8": [MINILM, MPNET8],
    "bm25+minilm+mpnet-int8": [BM25, MINILM, MPNET8],
}
FP32 = {"mpnet": [MPNET], "bm25+minilm+mpnet": [BM25, MINILM, MPNET]}


def score_rows(texts: list[str], cands: list[np.ndarray], doc_texts: list[str], checksum: str, cache: ArrayCache,
               teachers: dict[str, list[dict]], to_run) -> tuple[dict, dict]:
    systems, seconds = {}, {}
    for name, members in teachers.items():
        t0 = time.perf_counter()
        teacher = build_teacher(TeacherSpec.from_dict({"kind": "ensemble", "members": members}), doc_texts,
                                checksum, cache)
        scores = cached_teacher_scores(teacher, cache, texts, cands, progress=False)
        systems[name] = to_run(scores)
        seconds[name] = round(time.perf_counter() - t0, 1)
        logging.info("%s: %s (%.1f s)", name, systems[name], seconds[name])
    return systems, seconds


def scifact(cache: ArrayCache, fp32: bool) -> dict:
    cfg = load_config(REPO / "configs" / "scifact-full.toml", ['work_dir="/tmp/teachers-benchmark"'])
    p = Pipeline(cfg, progress=False)
    col = p.collection
    tq = col.split_queries(cfg.data.test_split)
    qids, texts = list(tq), list(tq.values())
    pools, _ = p.candidate_pools(texts, cfg.teacher.pool_depth)
    qrels = col.qrels[cfg.data.test_split]

    def to_run(scores):
        return metrics(qrels, {q: {col.doc_ids[int(d)]: float(s) for d, s in zip(pool, sc)}
                               for q, pool, sc in zip(qids, pools, scores)})

    teachers = {**TEACHERS, **(FP32 if fp32 else {})}
    systems, seconds = score_rows(texts, pools, p.corpus_texts, col.checksum(), cache, teachers, to_run)
    return {"systems": systems, "seconds": seconds,
            "protocol": "test queries; candidates: union of BM25 and base MiniLM top-100"}


def trec(name: str, cache: ArrayCache) -> dict:
    from index_build.export import INT8_NAME, ONNX_NAME, base_dense_onnx, quantize_int8
    from models.encoders import DenseEncoder

    path = REPO.parent / "shared" / "data" / "trec-dl" / name
    col = load_collection(path, unknown_docs="keep")
    qrels = col.qrels[next(iter(col.qrels))]
    run_in = load_trec_run(path / "runs" / "BM25.trec", depth=100)
    qids = [q for q in col.queries if q in qrels and q in run_in]
    texts = [col.queries[q] for q in qids]
    cands = [np.array([col.doc_index[d] for d, _ in run_in[q]], np.int64) for q in qids]
    doc_texts = col.doc_texts()

    def to_run(scores):
        return metrics(qrels, {q: {col.doc_ids[int(d)]: float(s) for d, s in zip(c, sc)}
                               for q, c, sc in zip(qids, cands, scores)}, min_rel=2)

    systems, seconds = score_rows(texts, cands, doc_texts, col.checksum(), cache, {**TEACHERS, **FP32}, to_run)
    # all-mpnet-base-v2 alone in three precisions (graphs side by side in one temp dir)
    onnx_dir, _ = base_dense_onnx("packaged:mpnet")
    precision = {}
    with tempfile.TemporaryDirectory() as tmp:
        per_tensor = Path(tmp) / "per-tensor.onnx"
        quantize_int8(onnx_dir / ONNX_NAME, per_tensor, per_channel=False)
        for label, graph in [("fp32", onnx_dir / ONNX_NAME), ("int8-per-tensor", per_tensor),
                             ("int8-per-channel", onnx_dir / INT8_NAME)]:
            enc = DenseEncoder(onnx_dir, onnx_file=str(graph))
            t0 = time.perf_counter()
            q = enc.encode_queries(texts)
            scores = [enc.encode_docs([doc_texts[int(d)] for d in c]) @ q[i] for i, c in enumerate(cands)]
            precision[label] = {**to_run(scores), "seconds": round(time.perf_counter() - t0, 1)}
            logging.info("mpnet %s: %s", label, precision[label])
    return {"systems": systems, "seconds": seconds, "mpnet_precision": precision,
            "protocol": "rerank runs/BM25.trec top-100; relevant = grade >= 2"}


def main(collections: str = typer.Option("scifact,dl19,dl20", help="comma-separated: scifact, dl19, dl20"),
         scifact_fp32_mpnet: bool = typer.Option(False, help="also the fp32 mpnet teachers on SciFact (~15 min)")
         ) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = REPO / "benchmarks" / "results" / "teachers.json"
    data = json.loads(out.read_text()) if out.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = ArrayCache(Path(tmp) / "arrays.sqlite")
        for name in [c.strip() for c in collections.split(",") if c.strip()]:
            if name == "scifact":
                data[name] = scifact(cache, scifact_fp32_mpnet)
            elif name in ("dl19", "dl20"):
                data[name] = trec(name, cache)
            else:
                raise typer.BadParameter(f"unknown collection {name!r}")
            data["command"] = "python benchmarks/teachers.py"
            write_json_atomic(out, data)
            write_markdown(out.with_suffix(".md"), data)


def write_markdown(path: Path, data: dict) -> None:
    md = "".join(markdown_table(v["systems"], f"teachers on {k}") + "\n"
                 for k, v in data.items() if isinstance(v, dict) and "systems" in v)
    md += "".join(markdown_table(v["mpnet_precision"], f"all-mpnet-base-v2 precision on {k}") + "\n"
                  for k, v in data.items() if isinstance(v, dict) and "mpnet_precision" in v)
    path.write_text(md)


if __name__ == "__main__":
    typer.run(main)
