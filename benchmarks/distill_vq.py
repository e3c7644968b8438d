"""Distill-VQ benchmark: FAISS IVF-PQ, FAISS IVF-OPQ and the distilled index at equal size.

Run from the repository root, after ``index-build all --config configs/scifact-full.toml``::

    .venv/bin/python benchmarks/distill_vq.py --config configs/scifact-full.toml

For each size (bytes per vector = PQ sub-quantizers at 8 bits; default 8, 16 and 32) on the
dense student's SciFact corpus vectors, with the same ``nlist`` and ``nprobe`` everywhere:

``faiss-ivfpq``
    ``IVF{nlist},PQ{M}x8`` trained by FAISS (k-means; reconstruction error).
``faiss-ivfopq``
    ``OPQ{M}_{dim},IVF{nlist},PQ{M}x8``: the same plus FAISS's learned rotation.
``distill-vq``
    The OPQ index above with its IVF centroids and PQ codebooks re-learned by
    :func:`index_build.distill_vq.distill` (exact dense scores as the teacher), twice:
    ``labels: true`` learns from the training queries only (train and dev slices, as the
    builder's ``queries = "auto"``); ``labels: false`` from pseudo-queries made of document
    titles and sentences (``queries = "pseudo"``), so no query or judgment is used at all.

The FAISS rows use no queries; they are listed under both ``labels`` values so that each
value is a complete comparison. Test queries are only measured: recall@10 / @100 of the
index's top-100 against exact search over the same vectors, and nDCG@10 of that top-100.

Writes ``benchmarks/results/distill-vq.json`` (a list of rows; the name and row keys are
read by tooling) and ``distill-vq.md`` (table, the issue's checks, command, machine).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.indexes import DEFAULT_CONFIG, RESULTS_DIR, SciFactInputs, cpu_threads, environment  # noqa: E402

log = logging.getLogger("benchmarks.distill_vq")

JSON_NAME = "distill-vq.json"
MD_NAME = "distill-vq.md"
K = 100
SIZES = (8, 16, 32)
FAISS_METHODS = ("faiss-ivfpq", "faiss-ivfopq")


def factories(size: int, dim: int, nlist: int) -> dict[str, str]:
    """``{method: FAISS factory}`` at ``size`` bytes per vector.

    >>> factories(16, 384, 128)
    {'faiss-ivfpq': 'IVF128,PQ16x8', 'faiss-ivfopq': 'OPQ16_384,IVF128,PQ16x8'}
    """
    return {"faiss-ivfpq": f"IVF{nlist},PQ{size}x8", "faiss-ivfopq": f"OPQ{size}_{dim},IVF{nlist},PQ{size}x8"}


def measure(index, queries: np.ndarray, exact: np.ndarray, judged, nprobe: int, nlist: int) -> dict[str, Any]:
    """Recall@10 / @100 against ``exact`` (the exact top-100 ids) and nDCG@10 at ``nprobe``;
    recall@100 also with every list probed."""
    import faiss

    from models.dense_index import recall_at_k

    ivf = faiss.extract_index_ivf(index)
    out: dict[str, Any] = {}
    for probe, suffix in ((nprobe, ""), (nlist, "_all_lists")):
        ivf.nprobe = probe
        scores, ids = index.search(queries, K)
        out[f"R@100_vs_exact{suffix}"] = round(recall_at_k(ids, exact, K), 4)
        if not suffix:
            out["R@10_vs_exact"] = round(recall_at_k(ids[:, :10], exact[:, :10], 10), 4)
            out["nDCG@10"] = round(judged.score(scores, ids)["nDCG@10"], 4)
    return out


def build(vectors: np.ndarray, factory: str, seed: int):
    from models.dense_index import DenseIndex

    return DenseIndex.build(vectors, factory, seed=seed).index


def checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per ``labels`` value: the distilled index beats the better FAISS training on
    recall@100 at every size, with the largest gain at the smallest size."""
    out = []
    for labels in sorted({r["labels"] for r in rows}, reverse=True):
        gains = {}
        for size in sorted({r["bytes_per_vector"] for r in rows}):
            at = {r["method"]: r for r in rows if r["labels"] == labels and r["bytes_per_vector"] == size}
            if "distill-vq" not in at:
                continue
            best_faiss = max(at[m]["R@100_vs_exact"] for m in FAISS_METHODS if m in at)
            gains[size] = round(at["distill-vq"]["R@100_vs_exact"] - best_faiss, 4)
        if not gains:
            continue
        smallest = min(gains)
        out.append({
            "labels": labels,
            "gain_R@100_over_best_faiss": gains,
            "beats_faiss_at_every_size": all(g > 0 for g in gains.values()),
            "largest_gain_at_smallest_size": gains[smallest] == max(gains.values()),
        })
    return out


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# Distill-VQ vs FAISS training", "", f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine'].get('cpu', '?')}, {meta['machine'].get('cpu_count', '?')} CPUs. "
             f"Wall time: {meta['seconds']} s. Date: {meta['date']}.", "",
             f"SciFact test queries ({meta['n_test_queries']}), dense student vectors ({meta['n_docs']} docs, "
             f"{meta['dim']}-d). nlist {meta['nlist']}, nprobe {meta['nprobe']} (R@100 all lists: every list "
             "probed). Recall is against exact search over the same vectors; nDCG@10 of the index's top-100.", "",
             "| bytes/vec | labels | method | queries used | R@10 vs exact | R@100 vs exact | R@100 all lists "
             "| nDCG@10 | train s |",
             "|---:|:---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['bytes_per_vector']} | {str(r['labels']).lower()} | {r['method']} | {r['queries']} "
                     f"| {r['R@10_vs_exact']:.4f} | {r['R@100_vs_exact']:.4f} | {r['R@100_vs_exact_all_lists']:.4f} "
                     f"| {r['nDCG@10']:.4f} | {r['train_seconds']} |")
    lines += ["", f"Exact search nDCG@10: {meta['exact_nDCG@10']:.4f}.", "", "## Checks", ""]
    for c in meta["checks"]:
        lines.append(f"- labels={str(c['labels']).lower()}: R@100 gain over the better FAISS index per size "
                     f"{c['gain_R@100_over_best_faiss']}; beats FAISS at every size: "
                     f"{'yes' if c['beats_faiss_at_every_size'] else 'NO'}; largest gain at the smallest size: "
                     f"{'yes' if c['largest_gain_at_smallest_size'] else 'NO'}.")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    from index_build.metrics import write_json_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / JSON_NAME, rows)
    md = out_dir / MD_NAME
    tmp = md.with_name(md.name + f".tmp-{os.getpid()}")
    tmp.write_text(markdown(rows, meta))
    tmp.replace(md)


def main(
    config: Annotated[Path, typer.Option("--config", "-c", help="build config (TOML/YAML)")] = DEFAULT_CONFIG,
    sizes: Annotated[str, typer.Option(help="bytes per vector, comma-separated")] = ",".join(map(str, SIZES)),
    nprobe: Annotated[int, typer.Option(help="lists probed per query (the same for every method)")] = 32,
    steps: Annotated[int, typer.Option(help="Distill-VQ training steps")] = 0,
    out_dir: Annotated[Path, typer.Option(help="results folder")] = RESULTS_DIR,
    threads: Annotated[int, typer.Option(help="FAISS / torch threads")] = os.cpu_count() or 1,
    seed: Annotated[int, typer.Option(help="FAISS training seed")] = 0,
    progress: Annotated[bool, typer.Option(help="progress bars")] = True,
) -> None:
    """Compare FAISS IVF-PQ, FAISS IVF-OPQ and Distill-VQ; write benchmarks/results/distill-vq.json."""
    import faiss
    import torch

    from index_build.distill_vq import distill
    from index_build.package import distill_vq_queries
    from models.dense_index import default_nlist, exact_search

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    inputs = SciFactInputs(config, progress=progress)
    dvq_cfg = inputs.cfg.index.distill_vq
    if steps:
        dvq_cfg.steps = steps
    x, q = inputs.dense_corpus, inputs.dense_queries
    n, dim = x.shape
    nlist = default_nlist(n)
    if not 0 < nprobe <= nlist:
        raise typer.BadParameter(f"--nprobe must be in [1, {nlist}]")
    size_list = [int(s) for s in sizes.split(",") if s.strip()]
    with cpu_threads(threads):
        exact_s, exact_i = exact_search(x, q, K)
    exact_ndcg = inputs.judged.score(exact_s, exact_i)["nDCG@10"]
    training = {labels: distill_vq_queries(inputs.pipeline, source, dvq_cfg.max_queries)
                for labels, source in ((True, "auto"), (False, "pseudo"))}
    rows: list[dict[str, Any]] = []
    for size in size_list:
        built: dict[str, Any] = {}
        factory_of = factories(size, dim, nlist)
        for method, factory in factory_of.items():
            t0 = time.perf_counter()
            with cpu_threads(threads):
                built[method] = build(x, factory, seed)
            seconds = round(time.perf_counter() - t0, 1)
            with cpu_threads(threads):
                m = measure(built[method], q, exact_i, inputs.judged, nprobe, nlist)
            log.info("%s %d B: %s (%.1f s)", method, size, m, seconds)
            for labels in (True, False):
                rows.append({"method": method, "bytes_per_vector": size, "labels": labels, **m,
                             "factory": factory, "nprobe": nprobe, "nlist": nlist, "queries": "none",
                             "train_seconds": seconds})
        for labels, (vectors, about) in training.items():
            index = faiss.clone_index(built["faiss-ivfopq"])
            with cpu_threads(threads):
                info = distill(index, x, vectors, dvq_cfg, progress=progress)
                m = measure(index, q, exact_i, inputs.judged, nprobe, nlist)
            log.info("distill-vq %d B labels=%s: %s (%.1f s)", size, labels, m, info["seconds"])
            rows.append({"method": "distill-vq", "bytes_per_vector": size, "labels": labels, **m,
                         "factory": factory_of["faiss-ivfopq"], "nprobe": nprobe, "nlist": nlist,
                         "init": "faiss-ivfopq", "queries": f"{about['n_queries']} {about['origin']}",
                         "train_seconds": info["seconds"], "loss_start": round(info["loss_start"], 4),
                         "loss_end": round(info["loss_end"], 4), "settings": info["settings"]})
    rows.sort(key=lambda r: (r["bytes_per_vector"], not r["labels"]))
    meta = {"command": ".venv/bin/python " + shlex.join(["benchmarks/distill_vq.py", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "seconds": round(time.perf_counter() - t_start, 1),
            "n_docs": n, "dim": dim, "nlist": nlist, "nprobe": nprobe, "n_test_queries": len(q),
            "exact_nDCG@10": exact_ndcg, "checks": checks(rows), **environment()}
    write_outputs(Path(out_dir), rows, meta)
    for c in meta["checks"]:
        log.info("check: %s", json.dumps(c))
    log.info("wrote %s and %s", Path(out_dir) / JSON_NAME, Path(out_dir) / MD_NAME)


if __name__ == "__main__":
    typer.run(main)
