"""Retrieval metrics with ``ir-measures`` and result files under ``benchmarks/results``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ir_measures
from ir_measures import RR, R, nDCG

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]


def metrics(qrels: Qrels, run: Run, *, min_rel: int = 1) -> dict[str, float]:
    """nDCG@10 (graded), RR@10 and R@100 (relevant = grade >= ``min_rel``), only over judged queries."""
    run = {q: docs for q, docs in run.items() if q in qrels}
    measures = {"nDCG@10": nDCG @ 10, "RR@10": RR(rel=min_rel) @ 10, "R@100": R(rel=min_rel) @ 100}
    agg = ir_measures.calc_aggregate(list(measures.values()), qrels, run)
    return {name: round(float(agg[m]), 4) for name, m in measures.items()}


def run_from_arrays(qids: list[str], doc_ids: list[str], scores, indices) -> Run:
    """A run from ``[n_queries, k]`` score and corpus-index arrays (index -1 = empty slot)."""
    run: Run = {}
    for r, qid in enumerate(qids):
        run[qid] = {doc_ids[int(j)]: float(s) for s, j in zip(scores[r], indices[r]) if j >= 0}
    return run


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def markdown_table(systems: dict[str, dict[str, float]], title: str) -> str:
    cols = ["nDCG@10", "RR@10", "R@100"]
    lines = [f"### {title}", "", "| system | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in systems.items():
        lines.append(f"| {name} | " + " | ".join(f"{m.get(c, float('nan')):.4f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"
