"""How much of each document the dense model reads: the base MiniLM (no training) at several
document lengths on SciFact; writes ``benchmarks/results/doc-length.json`` (+ ``doc-length.md``).

    .venv/bin/python benchmarks/doc_length.py [--lengths 256,384,512]

Most of SciFact's title + abstract texts are longer than the builder's default ``max_doc_len``
of 256 word pieces (the file's ``doc_tokens``), while the BM25 teacher member reads all of them. Each row is
an exact-search run of the base model's ONNX graph over the full corpus truncated at that
length: nDCG@10 on the ``train`` queries (the split a choice of length would be made on) and,
for the record only, on ``test``; and the seconds of the corpus pass, all in one run so that
their ratios compare.
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

from index_build.data import load_collection  # noqa: E402
from index_build.export import base_dense_onnx  # noqa: E402
from index_build.metrics import markdown_table, metrics, run_from_arrays, write_json_atomic  # noqa: E402
from models.dense_index import exact_search  # noqa: E402
from models.encoders import DenseEncoder  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "doc-length.json"
DATA = Path(os.environ.get("NRS_SHARED_DATA", REPO.parent / "shared" / "data"))


def length_percentiles(encoder: DenseEncoder, texts: list[str]) -> dict[str, float]:
    lengths = np.asarray(encoder.tokenizer.token_lengths(texts))
    return {**{f"p{p}": float(np.percentile(lengths, p)) for p in (25, 50, 75, 90)},
            **{f"share_over_{n}": round(float((lengths > n).mean()), 4) for n in (256, 384, 512)}}


def main(lengths: str = typer.Option("256,384,512", help="comma-separated max_doc_len values"),
         model: str = typer.Option("packaged:minilm", help="checkpoint (a model source)")) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    coll = load_collection(DATA / "scifact", splits=["train", "test"])
    texts = [d.full_text for d in coll.docs]
    doc_ids = [d.id for d in coll.docs]
    systems: dict[str, dict[str, float]] = {}
    rows: dict[str, dict] = {}
    for n in [int(x) for x in lengths.split(",") if x.strip()]:
        directory, _ = base_dense_onnx(model, max_doc_len=n)
        encoder = DenseEncoder(directory)
        t0 = time.perf_counter()
        docs = encoder.encode_docs(texts, progress=True)
        seconds = time.perf_counter() - t0
        row: dict = {"corpus_seconds": round(seconds, 1)}
        for split in ("train", "test"):
            qids = sorted(coll.qrels[split])
            q = encoder.encode_queries([coll.queries[i] for i in qids])
            scores, idx = exact_search(docs, q, 100)
            m = metrics(coll.qrels[split], run_from_arrays(qids, doc_ids, scores, idx))
            row[split] = {k: round(v, 4) for k, v in m.items()}
            systems[f"max_doc_len={n} ({split})"] = row[split]
        rows[str(n)] = row
    first = rows[next(iter(rows))]["corpus_seconds"]
    for row in rows.values():
        row["corpus_seconds_ratio"] = round(row["corpus_seconds"] / first, 3)
    data = {"model": model, "collection": "scifact", "lengths": rows,
            "doc_tokens": length_percentiles(encoder, texts),
            "command": "python benchmarks/doc_length.py"}
    write_json_atomic(OUT, data)
    OUT.with_suffix(".md").write_text(markdown_table(systems, f"SciFact, {model} without training, exact search"))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    typer.run(main)
