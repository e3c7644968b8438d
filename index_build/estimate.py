"""Rough wall-time estimates of a build's stages from the corpus size and the config, for the
build log ("stage k/n: name: ... (estimate ~N min)") and its opening line.

The rates are seconds per unit of work on the reference machine, 2 CPU cores (the cold run
of configs/scifact.toml in benchmarks/results/build-time.json and the research build's stage
times in benchmarks/results/scifact.json), scaled linearly to the cores here. An estimate
assumes a cold cache: a rerun whose teacher encodings are cached takes less.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from index_build.config import BuildConfig

REFERENCE_CORES = 2


@dataclass(frozen=True)
class Rates:
    """Seconds per unit on the reference machine."""

    doc_small: float = 0.045        # a 256-token document through a MiniLM-sized encoder (fp32)
    # ... through an int8 base-sized one (all-mpnet-base-v2, per-token activation scales: 8% over
    # per-tensor, int8-fidelity.md)
    doc_base_int8: float = 0.137
    doc_base: float = 0.25          # ... through an fp32 base-sized one
    query_small: float = 1 / 180    # a query (pseudo-queries up to 64 word pieces)
    query_base_int8: float = 1 / 50
    query_base: float = 1 / 30
    base_export: float = 120.0      # ONNX export + int8 quantization of a base-sized teacher member
    small_export: float = 30.0
    pair_cross_encoder: float = 0.085  # one (query, 256-token document) pair through the cross-encoder
    token_index_doc: float = 0.009  # a document's tokens into the 2-bit ColBERT index
    step: tuple[tuple[str, float], ...] = (  # one optimizer step per student kind
        ("asymmetric", 1.16), ("dense", 1.9), ("colbert", 2.9), ("cross-encoder", 3.1))
    export: float = 10.0            # a student's ONNX export + parity check
    fixed: float = 30.0             # loading data, BM25, writing records


RATES = Rates()


def _scale() -> float:
    return REFERENCE_CORES / max(1, min(os.cpu_count() or REFERENCE_CORES, 32))


def _member_cost(spec: dict) -> tuple[float, float, float]:
    """(per document, per query, export) seconds of a bi-encoder teacher member: MiniLM-sized
    when its reference names MiniLM, else base-sized (int8 or fp32)."""
    ref = str(spec.get("model", "")).lower()
    if "minilm" in ref:
        return RATES.doc_small, RATES.query_small, RATES.small_export
    if spec.get("int8"):
        return RATES.doc_base_int8, RATES.query_base_int8, RATES.base_export
    return RATES.doc_base, RATES.query_base, RATES.base_export


def _bi_members(cfg: BuildConfig) -> list[dict]:
    return [m for m in cfg.teacher.members if m.get("kind") == "bi-encoder"]


def _steps(n: int, epochs: float, batch: int) -> int:
    return math.ceil(max(n, 0) * epochs / max(batch, 1))


def _step_rate(kind: str) -> float:
    return dict(RATES.step).get(kind, 2.0)


@dataclass
class Workload:
    """The counts an estimate needs: documents, and queries of each kind."""

    n_docs: int
    train_queries: int      # labelled training queries, or the label-free pseudo-query budget
    test_queries: int
    label_free: bool


def stage_estimates(cfg: BuildConfig, w: Workload) -> dict[str, float]:
    """Estimated seconds per stage of ``cfg``'s build (the stage names of the build log)."""
    from index_build.distill import HYBRID_HEAD_QUERIES

    members = _bi_members(cfg)
    doc_rate = sum(_member_cost(m)[0] for m in members)
    query_rate = sum(_member_cost(m)[1] for m in members)
    base_in_teacher = any(m.get("model") == cfg.students.base for m in members)
    mined = w.train_queries * (1.5 if w.label_free else 1.0)  # label-free: over-generated, then filtered
    mine = (RATES.fixed + sum(_member_cost(m)[2] for m in members)
            + w.n_docs * (doc_rate + (0 if base_in_teacher else RATES.doc_small))
            + mined * (query_rate + RATES.query_small))
    out = {"mine": mine}
    kinds = cfg.students.kinds
    for kind in kinds:
        if kind == "asymmetric":
            a = cfg.asymmetric
            pool = w.train_queries + a.pseudo_per_doc * w.n_docs
            n = min(pool, a.max_queries) if a.max_queries else pool
            out["distill-asymmetric"] = n * query_rate + _steps(n, a.epochs, a.batch) * _step_rate(kind)
            # the hybrid head: the base model's pass over (a sample of) those queries, then its export
            out["head-asymmetric"] = min(n, HYBRID_HEAD_QUERIES) * RATES.query_small + RATES.export
        else:
            t = cfg.train.get(kind)
            epochs, batch, negatives = (t.epochs, t.batch_queries, t.negatives) if t else (1.0, 4, 7)
            # a step's cost is about linear in the documents it reads (the rates: 7 negatives)
            per_step = _step_rate(kind) * (1 + negatives) / 8
            out[f"distill-{kind}"] = 60 + _steps(w.train_queries, epochs, batch) * per_step
        out[f"export-{kind}"] = RATES.export
    ev = RATES.fixed + w.test_queries * (query_rate + RATES.query_small)
    # a pool evaluation (rerank mode) encodes only the test queries' candidates
    eval_docs = min(w.n_docs, w.test_queries * cfg.evaluate.rerank_depth) if cfg.evaluate.mode == "rerank" else w.n_docs
    for kind in kinds:
        if kind in ("dense", "colbert"):  # a corpus pass of the student
            ev += eval_docs * RATES.doc_small * (2 if cfg.export_int8 and cfg.evaluate.int8_corpus else 1)
        elif kind == "cross-encoder":  # fp32 and int8 graphs, at the served depth
            ev += 2 * w.test_queries * cfg.evaluate.served_cross_encoder_depth * RATES.pair_cross_encoder
    out["evaluate"] = ev
    if cfg.build_artifact:
        out["artifact"] = RATES.fixed + (w.n_docs * RATES.token_index_doc if "colbert" in kinds else 0.0)
    return {k: v * _scale() for k, v in out.items()}


def fmt_minutes(seconds: float) -> str:
    """``~N min`` (one decimal below 10 minutes)."""
    m = seconds / 60
    return f"~{m:.1f} min" if m < 10 else f"~{m:.0f} min"
