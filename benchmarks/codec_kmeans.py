"""How many k-means iterations the ColBERT token codec needs: the residual codec of the
token index (:class:`models.token_index.ResidualCodec`) trained with each iteration count on
the same token sample; writes ``benchmarks/results/codec-kmeans.json`` (+ ``codec-kmeans.md``).

    .venv/bin/python benchmarks/codec_kmeans.py [--config configs/labelfree-scifact.toml] [--niters 4,20]

The tokens are the build's ColBERT student's (its corpus encodings, cached by the build; encoded
here when missing), with the build's centroid count (:func:`models.token_index.default_n_centroids`)
and 2-bit residuals, as the artifact stage trains them. Per iteration count, measured in one run:
the seconds of training (k-means plus the residual quantiles); the cosine between held-out
tokens (not in the sample) and their decoded codes (mean and 1st percentile); and, on the
build's dev slice (its pseudo-queries or held-out train queries with their candidate pools:
no test judgments), how many of the exact-token MaxSim top-10 of each pool the decoded tokens
keep, and the dev nDCG@10 of both.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import typer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from index_build.config import load_config  # noqa: E402
from index_build.metrics import metrics, write_json_atomic  # noqa: E402
from index_build.stages import Pipeline  # noqa: E402
from models.encoders import ColbertEncoder, maxsim  # noqa: E402
from models.token_index import ResidualCodec, default_n_centroids  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "codec-kmeans.json"


def pool_rankings(queries: np.ndarray, pools: list[np.ndarray], tokens: dict[int, np.ndarray]) -> list[np.ndarray]:
    """Each pool's documents sorted by MaxSim against its query (best first)."""
    out = []
    for q, pool in zip(queries, pools):
        docs = [tokens[int(d)] for d in pool]
        offsets = np.zeros(len(docs) + 1, np.int64)
        np.cumsum([len(d) for d in docs], out=offsets[1:])
        scores = maxsim(q, np.concatenate(docs), offsets)
        out.append(np.asarray(pool)[np.argsort(-scores, kind="stable")])
    return out


def main(config: Path = typer.Option(REPO / "configs" / "labelfree-scifact.toml", help="build config"),
         niters: str = typer.Option("4,20", help="comma-separated k-means iteration counts"),
         sample: int = typer.Option(200_000, help="training tokens (the artifact stage's sample_tokens)"),
         held_out: int = typer.Option(100_000, help="held-out tokens for the cosine"),
         bits: int = typer.Option(2, help="residual bits per dimension")) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = Pipeline(load_config(config))
    toks = p.colbert_corpus()
    flat = np.concatenate([toks[i] for i in range(len(toks))]).astype(np.float32)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(flat))
    train_rows, held_rows = np.sort(order[:sample]), np.sort(order[sample : sample + held_out])
    k = min(default_n_centroids(len(flat)), sample)
    dev = p.load_mined()["dev"]
    q = ColbertEncoder(p.onnx_dir("colbert"), threads=p.cfg.threads).encode_queries(dev["queries"])
    pools = [np.asarray(x, np.int64) for x in dev["pools"]]
    exact = pool_rankings(q, pools, toks)
    doc_ids = p.collection.doc_ids
    qrels = p.dev_qrels(dev)

    def dev_ndcg(rankings: list[np.ndarray]) -> float:
        run = {qid: {doc_ids[int(d)]: float(len(r) - j) for j, d in enumerate(r)}
               for qid, r in zip(dev["qids"], rankings)}
        return round(metrics(qrels, run)["nDCG@10"], 4)

    pool_docs = sorted({int(d) for pool in pools for d in pool})
    rows: dict[str, dict] = {}
    for n in [int(x) for x in niters.split(",") if x.strip()]:
        t0 = time.perf_counter()
        codec = ResidualCodec.train(flat[train_rows], k, bits, seed=0, niter=n)
        seconds = time.perf_counter() - t0
        held = flat[held_rows]
        decoded = codec.decompress(*codec.compress(held))
        cos = (decoded * held).sum(1) / np.maximum(np.linalg.norm(held, axis=1), 1e-12)
        dec_toks = {d: codec.decompress(*codec.compress(toks[d])) for d in pool_docs}
        approx = pool_rankings(q, pools, dec_toks)
        overlap = [len(set(a[:10].tolist()) & set(e[:10].tolist())) / min(10, len(e)) for a, e in zip(approx, exact)]
        rows[str(n)] = {"train_seconds": round(seconds, 1), "cos_mean": round(float(cos.mean()), 5),
                        "cos_p1": round(float(np.percentile(cos, 1)), 4),
                        "dev_top10_overlap": round(float(np.mean(overlap)), 4),
                        "dev_nDCG@10_decoded": dev_ndcg(approx)}
        logging.info("niter %d: %s", n, rows[str(n)])
    first = rows[next(iter(rows))]["train_seconds"]
    for row in rows.values():
        row["train_seconds_ratio"] = round(row["train_seconds"] / first, 3)
    data = {"config": str(config.relative_to(REPO) if config.is_relative_to(REPO) else config),
            "n_tokens": int(len(flat)), "n_centroids": int(k), "sample_tokens": int(len(train_rows)),
            "held_out_tokens": int(len(held_rows)), "bits": bits, "dev_queries": len(dev["qids"]),
            "dev_nDCG@10_exact": dev_ndcg(exact), "niter": rows,
            "command": "python benchmarks/codec_kmeans.py"}
    write_json_atomic(OUT, data)
    cols = ["train_seconds", "train_seconds_ratio", "cos_mean", "cos_p1", "dev_top10_overlap", "dev_nDCG@10_decoded"]
    lines = [f"### ColBERT token codec: k-means iterations ({data['config']}, {k} centroids, {bits}-bit)", "",
             f"dev nDCG@10 with exact tokens: {data['dev_nDCG@10_exact']}", "",
             "| niter | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(str(r[c]) for c in cols) + " |" for n, r in rows.items()]
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(json.dumps(data, indent=2))


if __name__ == "__main__":
    typer.run(main)
