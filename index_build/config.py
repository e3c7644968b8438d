"""Typed build configuration, read from a TOML (or YAML) file plus command-line overrides."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import tomllib

from index_build.distill_vq import DistillVQConfig
from index_build.export import INT8_ACTIVATIONS
from index_build.train import PRECISIONS, PROJ_INITS, TrainConfig, resolve_device
from models.token_index import KMEANS_NITER


@dataclass
class DataConfig:
    path: str = "../shared/data/scifact"
    train_split: str = "train"
    test_split: str = "test"
    dev_fraction: float = 0.1
    label_free: bool = False     # ignore queries/qrels even when present


@dataclass
class LabelFreeConfig:
    """Pseudo-queries for corpora without training queries/qrels."""

    generators: list[dict] = field(default_factory=lambda: [
        {"kind": "title"}, {"kind": "sentence", "per_doc": 2}, {"kind": "keyphrase", "n_terms": 5},
    ])
    per_doc: int = 2
    budget: int | None = None    # None: default_budget(n_docs)
    round_trip_top_k: int = 3    # keep a query if its source doc is in the teacher's top-k
    min_words: int = 2
    max_words: int = 48
    dev_queries: int = 200       # held-out pseudo-queries for model selection and hybrid tuning


@dataclass
class TeacherConfig:
    members: list[dict] = field(default_factory=lambda: [
        {"kind": "bm25", "weight": 1.0},
        {"kind": "bi-encoder", "model": "packaged:minilm", "weight": 1.0},
    ])
    norm: str = "zscore"
    pool_depth: int = 100        # per miner: candidates pooled per query, and normalization set


@dataclass
class StudentConfig:
    base: str = "packaged:minilm"
    kinds: list[str] = field(default_factory=lambda: ["dense", "colbert", "cross-encoder"])
    max_query_len: int = 64
    max_doc_len: int = 256
    colbert_dim: int = 128
    colbert_query_len: int = 32
    neg_depth: int = 50
    dev_pool_depth: int = 20


@dataclass
class EvalConfig:
    rerank_depth: int = 100
    mode: str = "retrieval"      # retrieval: full-corpus first stages on the test split; rerank: TREC DL run
    trec_dl: list[str] = field(default_factory=lambda: ["../shared/data/trec-dl/dl19", "../shared/data/trec-dl/dl20"])
    results_dir: str = "benchmarks/results"
    name: str = ""               # results file stem (default: the collection folder name)
    # with int8 export: also the rows of int8 graphs encoding the corpus (dense-int8,
    # dense+colbert-int8), a corpus pass per student. The service encodes queries only at run
    # time (its corpus vectors are fp32), so the *-int8-query rows, which stay, are what it serves
    int8_corpus: bool = True


@dataclass
class IndexConfig:
    factory: str | None = None   # FAISS factory string; None = chosen from corpus size
    colbert_bits: int = 2
    colbert_kmeans_niter: int = KMEANS_NITER  # k-means iterations of the token codec
    nprobe: int | None = None
    distill_vq: DistillVQConfig = field(default_factory=DistillVQConfig)  # optional learned IVF-PQ


@dataclass
class BuildConfig:
    work_dir: str = "work/scifact"
    cache_path: str = ""         # content-keyed array cache; "" = <user cache dir>/arrays.sqlite
    artifact_dir: str = "artifacts/scifact"
    build_artifact: bool = True  # false: stop after evaluate (benchmark-only builds)
    threads: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    label_free: LabelFreeConfig = field(default_factory=LabelFreeConfig)
    students: StudentConfig = field(default_factory=StudentConfig)
    train: dict[str, TrainConfig] = field(default_factory=lambda: {
        "dense": TrainConfig(),
        "colbert": TrainConfig(head_lr=1e-3),
        "cross-encoder": TrainConfig(lr=3e-5, head_lr=1e-3),
    })
    export_int8: bool = True
    # int8 graphs with one scale per output column of each weight matrix instead of one per
    # matrix (what int8 teacher members use); same speed. On by default since the weights take
    # 7 bits (export.INT8_WEIGHT_BITS): one scale per matrix then cost all-MiniLM-L6-v2 a mean
    # query cosine to fp32 of 0.8399, per column 0.992 (benchmarks/results/int8-fidelity.md)
    export_int8_per_channel: bool = True
    # "token": each row of a MatMul input gets its own int8 scale, so a query's int8 embedding
    # no longer depends on what the service batched it with (ONNX Runtime's dynamic quantization,
    # "tensor", takes one scale per batch); closer to fp32, slower than "tensor", faster than
    # fp32 (benchmarks/results/int8-fidelity.md)
    export_int8_activations: str = "tensor"
    index: IndexConfig = field(default_factory=IndexConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    source: str = ""             # the config file it was read from (set by load_config; for records)
    overrides: list[str] = field(default_factory=list)  # the key=value overrides applied after it (likewise)

    def section_hash(self, *names: str) -> str:
        data = asdict(self)
        payload = json.dumps({n: data[n] for n in names}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _merge(obj: Any, data: dict, where: str) -> Any:
    known = {f.name: f for f in fields(obj)}
    for key, value in data.items():
        if key not in known:
            raise ValueError(f"config: unknown key {where}{key!r}; known: {', '.join(sorted(known))}")
        current = getattr(obj, key)
        if key == "train" and isinstance(value, dict):
            for kind, sub in value.items():
                base = current.get(kind, TrainConfig())
                current[kind] = _merge(base, sub, f"{where}train.{kind}.")
        elif is_dataclass(current) and isinstance(value, dict):
            _merge(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, value)
    return obj


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> BuildConfig:
    """Defaults, then the file (TOML or YAML), then ``key.sub=value`` overrides (JSON values)."""
    cfg = BuildConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} not found")
        if p.suffix in {".yaml", ".yml"}:
            import yaml

            data = yaml.safe_load(p.read_text()) or {}
        else:
            data = tomllib.loads(p.read_text())
        _merge(cfg, data, "")
        cfg.source = str(path)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        nested: dict = {}
        cursor = nested
        parts = key.split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        _merge(cfg, nested, "")
    cfg.overrides = list(overrides or [])
    cfg.index.distill_vq.validate()
    if cfg.export_int8_activations not in INT8_ACTIVATIONS:
        raise ValueError(f"config: export_int8_activations must be one of {', '.join(INT8_ACTIVATIONS)}, "
                         f"got {cfg.export_int8_activations!r}")
    if int(cfg.index.colbert_kmeans_niter) < 1:
        raise ValueError(f"config: index.colbert_kmeans_niter must be at least 1, got {cfg.index.colbert_kmeans_niter}")
    for kind, tcfg in cfg.train.items():
        if tcfg.wise_ft is not None and not 0.0 <= float(tcfg.wise_ft) <= 1.0:
            raise ValueError(f"config: train.{kind}.wise_ft must be in [0, 1], got {tcfg.wise_ft}")
        if tcfg.proj_init not in PROJ_INITS:
            raise ValueError(f"config: train.{kind}.proj_init must be one of {', '.join(PROJ_INITS)}, "
                             f"got {tcfg.proj_init!r}")
        if tcfg.proj_init != "random" and kind != "colbert":
            raise ValueError(f"config: train.{kind}.proj_init applies to the ColBERT student only")
        if tcfg.precision not in PRECISIONS:
            raise ValueError(f"config: train.{kind}.precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {tcfg.precision!r}")
        try:
            resolve_device(str(tcfg.device))
        except ValueError as e:
            raise ValueError(f"config: train.{kind}.device: {e}") from None
    return cfg
