"""Typed build configuration, read from a TOML (or YAML) file plus command-line overrides."""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomllib

from index_build.distill_vq import DistillVQConfig
from index_build.export import INT8_ACTIVATIONS
from models.token_index import KMEANS_NITER

if TYPE_CHECKING:
    import torch


class ConfigError(ValueError):
    """A build configuration that cannot be used; the message names the file or key."""


#: metadata of a field whose default keeps what builds did before the field existed: at its
#: default it is left out of its section's hash (:func:`hashed_section`), so adding it leaves
#: every stage cached before it valid
UNHASHED_AT_DEFAULT = {"hashed_at_default": False}
#: metadata of a field that only a later stage reads, whose key names it itself: it is never
#: part of its section's hash, so changing it reruns that stage and nothing before it
KEYED_BY_ITS_STAGE = {"hashed": False}


def hashed_section(section: Any) -> dict[str, Any]:
    """A config section as stage keys hash it: every field, except the
    :data:`UNHASHED_AT_DEFAULT` ones that hold their default and the
    :data:`KEYED_BY_ITS_STAGE` ones."""
    data = asdict(section)
    for f in fields(section):
        if f.metadata.get("hashed") is False or (
                f.metadata.get("hashed_at_default") is False and getattr(section, f.name) == f.default):
            data.pop(f.name)
    return data


@dataclass
class TrainConfig:
    """How one student is distilled (the ``[train]`` section and its per-student overrides)."""

    epochs: float = 1.0
    batch_queries: int = 4
    negatives: int = 7
    lr: float = 2e-5
    head_lr: float = 1e-3
    warmup: float = 0.1
    weight_decay: float = 0.01
    seed: int = 13
    score_scale: float | None = None   # student score multiplier (None: 20 for dense cos, else 1)
    in_batch_weight: float = 0.0       # dense only: add in-batch-negatives loss with this weight
    # ColBERT only: how the new projection starts. "random": nn.Linear's init (seeded); "pca":
    # the top principal directions of the base checkpoint's token states over a sample of the
    # corpus (ColbertStudent.init_projection_pca); its effect: benchmarks/results/colbert-proj-init/
    proj_init: str = "random"
    # Teacher score multiplier. "auto": match the spread (std) of the teacher's margins to the
    # initial student's on a few batches, so Margin-MSE does not demand margins the student's
    # score range cannot express (a z-score ensemble's margins are ~5 for a cosine student's ~1).
    teacher_scale: float | str = 1.0
    calibration_batches: int = 16
    tas_balanced: bool = False
    tas_clusters: int = 32
    eval_every: int = 0                # steps between dev evaluations (0: end of each epoch)
    checkpoint_every: int = 50
    max_grad_norm: float = 1.0
    dropout: bool = False              # dropout during distillation (off: ~2x faster on CPU, no loss seen)
    pseudo_queries: int = 0            # labelled path: add this many corpus pseudo-query examples (GPL-style)
    dev_retrieval: bool = False        # dense: select on full-corpus retrieval of the dev queries
    # Inverse cloze (Lee et al. 2019): with this probability, a training positive that contains the
    # query verbatim (an extracted pseudo-query: a sentence or title of that document) is shown to
    # the student with that copy cut out, so it learns the context rather than string overlap.
    ict_remove: float = 0.0
    # After training, interpolate the transformer with the base model (WiSE-FT): weights =
    # base + wise_ft * (trained - base). None: 1.0 (no interpolation) on labelled builds,
    # LABEL_FREE_WISE_FT for the dense student of a label-free build. Applied at export.
    wise_ft: float | None = None
    threads: int = 0
    # torch device to train on: "auto" (CUDA when torch sees a GPU, else CPU), "cpu", "cuda",
    # "cuda:N". Not part of the stage keys: the recipe is the same wherever it runs.
    device: str = "auto"
    # Numerics of the transformer's forward and backward passes: "fp32", "bf16" (autocast to
    # bfloat16; weights, optimizer state, heads and scores stay fp32) or "auto" (bf16 where the
    # device computes it natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16/AMX; else fp32).
    # Part of the stage keys (as resolved on this machine): it changes what is trained.
    precision: str = "fp32"


PRECISIONS = ("fp32", "bf16", "auto")
#: the students a build can distill: full-tower dense, ColBERT and cross-encoder students
#: (Margin-MSE, :mod:`index_build.train`) and the asymmetric query encoder
STUDENT_KINDS = ("dense", "asymmetric", "colbert", "cross-encoder")
PROJ_INITS = ("random", "pca")
#: what the asymmetric student's listwise KL is taken against: the full teacher ("teacher",
#: BM25 included) or its bi-encoder members alone ("dense": the teacher's scores without its
#: BM25 term, which the per-part hybrid adds at serving time)
KL_TARGETS = ("teacher", "dense")
#: the asymmetric student's heads: "linear", one linear map per member part from the pooled
#: last layer; "layers-mlp", that plus a residual MLP per part from every layer's pooled states
ASYM_HEADS = ("linear", "layers-mlp")
HYBRID_HEADS = ("auto", "ridge", "student")
#: the KL pool of a pseudo-query cut from a document: "full", every candidate; "without-source",
#: the source document left out, so the KL teaches the teacher's ranking of the other candidates
#: (with it, the teacher puts nearly all its softmax mass on the source: benchmarks/kl_targets.py)
PSEUDO_KL_POOLS = ("full", "without-source")
CHECKPOINTS = ("best", "average")
#: corpus documents whose token states a "pca" projection is fitted on
PROJ_INIT_DOCS = 256


@dataclass
class AsymmetricConfig:
    """How the asymmetric student (``students.kinds`` includes ``"asymmetric"``) is distilled:
    a query encoder into the teacher's document space (:mod:`index_build.asymmetric`)."""

    epochs: float = 2.0
    batch: int = 32
    lr: float = 2e-5
    map_lr_factor: float = 10.0     # the maps learn this many times faster than the transformer
    kl_weight: float = 1.0          # weight of the listwise KL (0: alignment only)
    kl_target: str = "teacher"      # one of KL_TARGETS
    # one of PSEUDO_KL_POOLS: the KL pool of a pseudo-query whose source document is known
    pseudo_kl_pool: str = field(default="full", metadata=UNHASHED_AT_DEFAULT)
    # the teacher's scores of such a pseudo-query are divided by this in the KL (> 1 flattens
    # its softmax, which puts most of the mass on the source document)
    pseudo_kl_temperature: float = field(default=1.0, metadata=UNHASHED_AT_DEFAULT)
    pool_size: int = 64             # candidates per query in the KL: the teacher's top half, the rest sampled
    pool_depth: int = 50            # each teacher member's top-k pooled per training query
    scale: float = 20.0             # student score multiplier in the KL
    eval_every: int = 200           # steps between dev evaluations (full-corpus retrieval)
    # one of CHECKPOINTS: the parameters kept. "best": those that scored best on the dev slice;
    # "average": the uniform average of those at the checks (every eval_every steps and the
    # last) in the second half of training (SWA-style, Izmailov et al. 2018), for a dev slice
    # that cannot tell checkpoints apart (pseudo-queries judged by their source document)
    checkpoint: str = field(default="best", metadata=UNHASHED_AT_DEFAULT)
    seed: int = 13
    # pseudo-queries from every document (its title, its most informative sentences, key-phrase
    # queries) added to the training queries; at most this many per document (0: none)
    pseudo_per_doc: int = 5
    sentences_per_doc: int = 2      # sentence queries per document, the highest mean IDF first
    keyphrases_per_doc: int = 1     # key-phrase queries per document (the top terms, then samples of the top 2n)
    spans_per_doc: int = 0          # random spans of 4-12 words per document (distinct queries beyond the above)
    # statements per document: the clause a reporting verb introduces ("... suggest that <statement>"),
    # the corpus's own claims in the form of a fact-checking query
    statements_per_doc: int = field(default=0, metadata=UNHASHED_AT_DEFAULT)
    # cap on training queries (0: all): every mined query is kept, pseudo-queries fill up to it
    max_queries: int = 0
    # times each mined query (a real training query, or a label-free generator's round-trip
    # checked pseudo-query) is drawn per pass: the queries most like the users' get that weight
    # against the document pseudo-queries that outnumber them
    mined_draws: int = 1
    # times each query of a label-free build's query log (label_free.query_log: real queries,
    # unjudged) is drawn per pass, as the labelled build draws its training queries
    log_draws: int = field(default=3, metadata=UNHASHED_AT_DEFAULT)
    # one of ASYM_HEADS. "layers-mlp": the residual MLPs (head_hidden units, output layer zero at
    # start) are first fitted for head_init_epochs passes on the frozen base model's states
    # (seconds), then trained with the rest (linear probing, then fine-tuning)
    head: str = field(default="linear", metadata=UNHASHED_AT_DEFAULT)
    head_hidden: int = field(default=1536, metadata=UNHASHED_AT_DEFAULT)
    head_init_epochs: int = field(default=8, metadata=UNHASHED_AT_DEFAULT)
    # one of HYBRID_HEADS: the query encoder of the hybrid first stage's dense parts. "ridge":
    # the base model's pooled query vector with ridge maps to each part (the student's starting
    # point, the closest linear copy of the teacher's query vectors); "student": the trained
    # student; "auto": whichever is the closer copy of the teacher's query vectors on the dev
    # slice (the hybrid is the teacher's own fusion, so the closer copy serves the closer ranking)
    hybrid_head: str = field(default="auto", metadata=KEYED_BY_ITS_STAGE)  # (the head stage's key)


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
    # a log of the users' queries without judgments ("": none): a BEIR queries.jsonl, a .tsv of
    # id<TAB>text lines, or plain text, one query a line. The teacher labels each query's
    # candidates and every student trains on them beside the pseudo-queries; queries of the
    # collection's test split are dropped
    query_log: str = field(default="", metadata=UNHASHED_AT_DEFAULT)
    # logged queries held out as the dev slice that chooses checkpoints, weights and the served
    # default, judged by the teacher's ranking of each one's pool; they replace the pseudo-query
    # dev slice (0: keep it; on SciFact the pseudo-query slice chose the better student,
    # benchmarks/results/README.md)
    log_dev_queries: int = field(default=0, metadata=UNHASHED_AT_DEFAULT)


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


#: who judges a label-free build's dev slice for its tuning (:attr:`EvalConfig.dev_judge`)
DEV_JUDGES = ("source", "teacher")


@dataclass
class EvalConfig:
    rerank_depth: int = 100
    mode: str = "retrieval"      # retrieval: full-corpus first stages on the test split; rerank: TREC DL run
    trec_dl: list[str] = field(default_factory=lambda: ["../shared/data/trec-dl/dl19", "../shared/data/trec-dl/dl20"])
    results_dir: str = ""        # where the results files go ("": <work_dir>/results)
    name: str = ""               # results file stem (default: the collection folder name)
    # with int8 export: also the rows of int8 graphs encoding the corpus (dense-int8,
    # dense+colbert-int8), a corpus pass per student. The service encodes queries only at run
    # time (its corpus vectors are fp32), so the *-int8-query rows, which stay, are what it serves
    int8_corpus: bool = True
    # what judges the dev slice of a label-free build when the hybrid weight, the rerank
    # weights and the served default are chosen (distillation always keeps the source):
    # "source" (the document each pseudo-query was made from) or "teacher" (the teacher's
    # top 10 of the query's dev pool, graded by rank, the source on top)
    dev_judge: str = "source"
    # the cross-encoder as served: it rescores the first stage's top cross_encoder_depth
    # candidates (the service's default for rerank=cross-encoder), each (query, document) pair
    # cut to cross_encoder_max_len word pieces (0: the length it was trained at); its rows,
    # its dev-tuned weight and the artifact use the same
    cross_encoder_depth: int = 20
    cross_encoder_max_len: int = 128
    # judged splits besides data.test_split that a label-free build reports on too (its results'
    # "splits"): it reads none of their judgments, so they are unseen test queries as well, and
    # more of them narrow each row's confidence interval (benchmarks/significance.py). A query
    # log's queries are left out of them (counts in the evaluate stage's "splits_logged"). A
    # build that trains on judgments cannot use them
    extra_splits: list[str] = field(default_factory=list, metadata=UNHASHED_AT_DEFAULT)

    @property
    def served_cross_encoder_depth(self) -> int:
        """The cross-encoder's depth, within the rerank depth."""
        return min(int(self.cross_encoder_depth), int(self.rerank_depth))


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
    asymmetric: AsymmetricConfig = field(default_factory=AsymmetricConfig)
    train: dict[str, TrainConfig] = field(default_factory=lambda: {
        "dense": TrainConfig(),
        "colbert": TrainConfig(head_lr=1e-3),
        "cross-encoder": TrainConfig(lr=3e-5, head_lr=1e-3),
    })
    export_int8: bool = True
    # int8 graphs with one scale per output column of each weight matrix instead of one per
    # matrix (what int8 teacher members use); same speed, much closer to fp32 with 7-bit weights
    # (export.INT8_WEIGHT_BITS; benchmarks/results/int8-fidelity.md)
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
        payload = json.dumps({n: hashed_section(getattr(self, n)) for n in names}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def results_path(self) -> Path:
        """Where this build writes its results files: ``evaluate.results_dir``, by default
        ``<work_dir>/results`` (a build never writes into the repository's benchmarks/results;
        ``benchmarks/publish_build.py`` copies a build's results there)."""
        return Path(self.evaluate.results_dir or Path(self.work_dir) / "results")


def _merge(obj: Any, data: dict, where: str) -> Any:
    known = {f.name: f for f in fields(obj)}
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"did you mean '{where}{close[0]}'? " if close else ""
            raise ConfigError(f"config: unknown key '{where}{key}'; {hint}known: {', '.join(sorted(known))}")
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
            raise ConfigError(f"config file {p} not found")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
        if p.suffix in {".yaml", ".yml"}:
            import yaml

            try:
                data = yaml.safe_load(text) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{p}: invalid YAML: {' '.join(str(e).split())}") from None
        else:
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{p}: invalid TOML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a table of settings at the top level")
        _merge(cfg, data, "")
        cfg.source = str(path)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
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
    try:
        cfg.index.distill_vq.validate()
    except ValueError as e:
        raise ConfigError(f"config: index.distill_vq: {e}") from None
    if cfg.export_int8_activations not in INT8_ACTIVATIONS:
        raise ConfigError(f"config: export_int8_activations must be one of {', '.join(INT8_ACTIVATIONS)}, "
                         f"got {cfg.export_int8_activations!r}")
    if int(cfg.label_free.log_dev_queries) < 0:
        raise ConfigError(f"config: label_free.log_dev_queries must be 0 or more, got {cfg.label_free.log_dev_queries}")
    if int(cfg.label_free.log_dev_queries) > 0 and not cfg.label_free.query_log:
        raise ConfigError("config: label_free.log_dev_queries holds out logged queries, but label_free.query_log "
                          "names no log")
    if cfg.evaluate.extra_splits and (cfg.data.test_split in cfg.evaluate.extra_splits
                                      or len(set(cfg.evaluate.extra_splits)) < len(cfg.evaluate.extra_splits)):
        raise ConfigError(f"config: evaluate.extra_splits must name distinct splits other than data.test_split "
                          f"({cfg.data.test_split!r}), got {cfg.evaluate.extra_splits}")
    if int(cfg.index.colbert_kmeans_niter) < 1:
        raise ConfigError(
            f"config: index.colbert_kmeans_niter must be at least 1, got {cfg.index.colbert_kmeans_niter}")
    if cfg.evaluate.dev_judge not in DEV_JUDGES:
        raise ConfigError(f"config: evaluate.dev_judge must be one of {', '.join(DEV_JUDGES)}, "
                          f"got {cfg.evaluate.dev_judge!r}")
    ev = cfg.evaluate
    if int(ev.cross_encoder_depth) < 1:
        raise ConfigError(f"config: evaluate.cross_encoder_depth must be at least 1, got {ev.cross_encoder_depth}")
    if int(ev.cross_encoder_max_len) != 0 and int(ev.cross_encoder_max_len) < 16:
        raise ConfigError(f"config: evaluate.cross_encoder_max_len must be 0 (as trained) or at least 16, "
                          f"got {ev.cross_encoder_max_len}")
    if cfg.asymmetric.head not in ASYM_HEADS:
        raise ConfigError(f"config: asymmetric.head must be one of {', '.join(ASYM_HEADS)}, "
                          f"got {cfg.asymmetric.head!r}")
    if cfg.asymmetric.hybrid_head not in HYBRID_HEADS:
        raise ConfigError(f"config: asymmetric.hybrid_head must be one of {', '.join(HYBRID_HEADS)}, "
                          f"got {cfg.asymmetric.hybrid_head!r}")
    if cfg.asymmetric.checkpoint not in CHECKPOINTS:
        raise ConfigError(f"config: asymmetric.checkpoint must be one of {', '.join(CHECKPOINTS)}, "
                          f"got {cfg.asymmetric.checkpoint!r}")
    if cfg.asymmetric.head_hidden < 1 or cfg.asymmetric.head_init_epochs < 0:
        raise ConfigError("config: asymmetric.head_hidden must be >= 1 and asymmetric.head_init_epochs >= 0")
    if int(cfg.asymmetric.log_draws) < 1:
        raise ConfigError(f"config: asymmetric.log_draws must be at least 1, got {cfg.asymmetric.log_draws}")
    if cfg.asymmetric.kl_target not in KL_TARGETS:
        raise ConfigError(f"config: asymmetric.kl_target must be one of {', '.join(KL_TARGETS)}, "
                          f"got {cfg.asymmetric.kl_target!r}")
    if cfg.asymmetric.pseudo_kl_pool not in PSEUDO_KL_POOLS:
        raise ConfigError(f"config: asymmetric.pseudo_kl_pool must be one of {', '.join(PSEUDO_KL_POOLS)}, "
                          f"got {cfg.asymmetric.pseudo_kl_pool!r}")
    if not float(cfg.asymmetric.pseudo_kl_temperature) > 0:
        raise ConfigError(f"config: asymmetric.pseudo_kl_temperature must be > 0, "
                          f"got {cfg.asymmetric.pseudo_kl_temperature}")
    unknown_kinds = [k for k in cfg.students.kinds if k not in STUDENT_KINDS]
    if unknown_kinds:
        raise ConfigError(f"config: students.kinds: unknown {', '.join(map(repr, unknown_kinds))}; "
                          f"known: {', '.join(STUDENT_KINDS)}")
    for kind, tcfg in cfg.train.items():
        if tcfg.wise_ft is not None and not 0.0 <= float(tcfg.wise_ft) <= 1.0:
            raise ConfigError(f"config: train.{kind}.wise_ft must be in [0, 1], got {tcfg.wise_ft}")
        if tcfg.proj_init not in PROJ_INITS:
            raise ConfigError(f"config: train.{kind}.proj_init must be one of {', '.join(PROJ_INITS)}, "
                             f"got {tcfg.proj_init!r}")
        if tcfg.proj_init != "random" and kind != "colbert":
            raise ConfigError(f"config: train.{kind}.proj_init applies to the ColBERT student only")
        if tcfg.precision not in PRECISIONS:
            raise ConfigError(f"config: train.{kind}.precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {tcfg.precision!r}")
        if str(tcfg.device) not in ("auto", "cpu"):  # a GPU request: check that torch can use it
            try:
                resolve_device(str(tcfg.device))
            except ValueError as e:
                raise ConfigError(f"config: train.{kind}.device: {e}") from None
    return cfg


def resolve_device(name: str) -> torch.device:
    """The torch device for ``name`` (see :attr:`TrainConfig.device`), with a clear error when
    a GPU is asked for and torch cannot use one.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    import torch  # only here: reading a config stays torch-free

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"train device {name!r}: {e}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"train device {name!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"train device {name!r}: this torch build sees no CUDA GPU "
                             "(install a CUDA build of torch, or use device 'cpu')")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"train device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return device
