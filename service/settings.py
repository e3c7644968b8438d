"""Service settings: every field can come from an ``NRS_``-prefixed environment variable
(``NRS_ARTIFACT_DIR``, ``NRS_MAX_K``, ...) and is checked at start-up.

Groups (one flat object so every env var name is simply ``NRS_<FIELD>``):

- artifact and runtime: ``artifact_dir``, ``threads``, ``use_gpu``, ``use_int8``, ``int8_models``,
  ``warmup``, ``worker_threads``, ``rerank_threads``
- request limits: ``default_k``, ``max_k``, ``default_candidates``, ``max_candidates``,
  ``max_cross_encoder_candidates``, ``max_query_chars``, ``max_batch_queries``, ``max_body_bytes``
- backpressure: ``max_concurrency``, ``max_queue``, ``request_timeout_ms``
- dynamic batching: ``batch_max_size``, ``batch_max_wait_ms``
- fusion: ``hybrid_dense_weight``, ``hybrid_sparse_weight``, ``colbert_weight``, ``cross_encoder_weight``
- server: ``host``, ``port``, ``log_level``, ``api_key``, ``admin_key``, ``artifact_root``, ``graceful_shutdown_s``
- query log (opt-in): ``query_log_path``, ``query_log_sample``, ``query_log_max_mb``, ``query_log_backups``
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.retrieval import FirstStage, RerankMode

LogLevel = Literal["debug", "info", "warning", "error", "critical"]
#: the models an artifact may hold (manifest ``models`` keys)
MODEL_ROLES = ("dense", "colbert", "cross-encoder")


#: search permits per CPU core when ``max_concurrency`` is 0: one searching, one between stages
PERMITS_PER_CORE = 2


def available_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class Settings(BaseSettings):
    """Validated configuration of one service process (see the module docstring)."""

    model_config = SettingsConfigDict(env_prefix="NRS_", extra="ignore", frozen=True)

    # -- artifact and runtime -------------------------------------------------------------------
    artifact_dir: Path = Field(description="Artifact directory written by the builder (holds manifest.json).")
    threads: int = Field(1, ge=0, le=256, description=(
        "ONNX Runtime intra-op threads per session; with `python -m service` also the OpenMP / BLAS "
        "threads per call (0 = library defaults)."))
    use_gpu: bool = Field(False, description="Use CUDAExecutionProvider / FAISS GPU when available.")
    use_int8: bool = Field(False, description="Load the int8-quantized ONNX models when the artifact has them.")
    int8_models: str = Field("dense,colbert,cross-encoder", description=(
        "Comma-separated models use_int8 applies to, e.g. `dense,colbert` for int8 query encoders "
        "with an fp32 cross-encoder."))
    malloc_arenas: int = Field(2, ge=0, le=64, description=(
        "Most C heap arenas (glibc M_ARENA_MAX, set by `python -m service` at start; 0 = glibc's "
        "default of 8 per core): every thread that allocates at once gets an arena of its own, "
        "and memory freed into many arenas (a replaced artifact's, after a reload) stays held "
        "as fragments between what is still used."))
    warmup: bool = Field(True, description="Run warm-up queries through every stage before reporting ready.")
    worker_threads: int = Field(
        0, ge=0, le=512, description="Threads for CPU work (ONNX, FAISS, MaxSim); 0 = max_concurrency + 2."
    )
    rerank_threads: int = Field(2, ge=1, le=64, description=(
        "Threads one ColBERT rerank may split its candidates over while it is the only search in "
        "flight (idle cores cut low-load latency); under load every rerank uses one thread."))
    one_pass: bool = Field(True, description=(
        "When the artifact has ColBERT's query token map (a build with an asymmetric query encoder "
        "and ColBERT), rerank=colbert projects the query tokens from the dense encoder's pass, one "
        "transformer pass a query; false runs ColBERT's own query encoder as a second pass."))
    colbert_tokens: Literal["compressed", "float32", "int8"] = Field("compressed", description=(
        "How ColBERT reranking reads document tokens: `compressed` decodes the artifact's residual "
        "codes for every query (least RAM); `int8` decodes them once at start-up into RAM as int8 "
        "(dim + 4 bytes a token, 138 MiB for SciFact) scored with ONNX Runtime's integer GEMM; "
        "`float32` into RAM as float32 (4 * dim bytes a token)."))

    # -- request limits ---------------------------------------------------------------------------
    default_k: int = Field(10, ge=1)
    max_k: int = Field(100, ge=1)
    default_candidates: int = Field(100, ge=1, description="First-stage depth when a request gives none.")
    max_candidates: int = Field(1000, ge=1)
    max_cross_encoder_candidates: int = Field(100, ge=1, description="Most candidates a cross-encoder rescores.")
    cross_encoder_candidates: int | None = Field(None, ge=1, description=(
        "Candidates a cross-encoder rerank rescores when a request gives none (default: the depth the "
        "builder evaluated and tuned it at, in the artifact's manifest, else 20): its cost on CPU is "
        "linear in it."))
    cross_encoder_max_len: int | None = Field(None, ge=16, description=(
        "Word pieces of each (query, document) pair the cross-encoder reads (default: the artifact's "
        "served length, else the length it was trained at)."))
    max_query_chars: int = Field(2048, ge=1)
    max_batch_queries: int = Field(64, ge=1, description="Most queries in one /search/batch request.")
    max_body_bytes: int = Field(1 << 20, ge=256, description="Largest request body accepted (413 above).")
    body_timeout_ms: float = Field(5_000.0, gt=0, description=(
        "Longest wait for the next piece of a request body (408 past it: a client that stalls "
        "mid-body does not hold a connection open)."))

    # -- backpressure ----------------------------------------------------------------------------
    max_concurrency: int = Field(0, ge=0, description=(
        "Search requests processed at once (permits); 0 = two per CPU core this process may run "
        "on. More permits than that only share the same cores: each search then takes longer "
        "and varies more, so fewer of the admitted ones meet the deadline."))
    max_queue: int = Field(64, ge=0, description="Requests allowed to wait for a permit before 429.")
    request_timeout_ms: float = Field(10_000.0, gt=0, description="Per-request deadline (504 past it).")
    worker_nice: int = Field(10, ge=0, le=19, description=(
        "How much lower the CPU priority (nice) of the search, rerank and admin threads is than "
        "that of the event loop (Linux; elsewhere ignored): when the cores are busy with searches, "
        "the loop still runs at once to refuse excess requests with 429 and to answer finished "
        "ones. 0 = the same priority."))
    gil_switch_ms: float = Field(1.0, gt=0, le=100, description=(
        "Python's thread switch interval (sys.setswitchinterval): how long a search thread running "
        "Python code may hold the interpreter before the event loop gets it back to answer other "
        "requests, a 429 under overload among them (Python's default is 5 ms)."))

    # -- dynamic batching of query encodes -------------------------------------------------------
    batch_max_size: int = Field(32, ge=1, description="Most query texts encoded in one ONNX call.")
    batch_max_wait_ms: float = Field(
        0.0, ge=0, description="How long a batch waits for more queries (0: continuous batching, no wait).")

    # -- served default mode ---------------------------------------------------------------------
    default_first_stage: FirstStage | None = Field(None, description=(
        "First stage of a request that names none (default: the artifact's, chosen by the builder "
        "on its dev queries; dense for an artifact without one)."))
    default_rerank: RerankMode | None = Field(None, description=(
        "Rerank mode of a request that names none (default: the artifact's, else none)."))

    # -- hybrid first stage ----------------------------------------------------------------------
    hybrid_dense_weight: float | None = Field(
        None, ge=0, description="Dense weight of the hybrid fusion (default: the builder's tuned value, else 0.5)."
    )
    hybrid_sparse_weight: float | None = Field(None, ge=0, description="Sparse (BM25) weight of the hybrid fusion.")
    colbert_weight: float | None = Field(None, ge=0, le=1, description=(
        "Weight of the ColBERT score against the first stage's in a ColBERT rerank (z-scores over the "
        "candidates; 1 = MaxSim alone). Default: the builder's dev-tuned weight per first stage, else 1."))
    cross_encoder_weight: float | None = Field(None, ge=0, le=1, description=(
        "Weight of the cross-encoder's score against the first stage's in a cross-encoder rerank "
        "(z-scores over the candidates; 1 = its score alone). Default: the builder's dev-tuned weight "
        "per first stage, else 1."))

    # -- server ----------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: LogLevel = "info"
    api_key: SecretStr | None = Field(None, description="When set, required on /search* and /info.")
    admin_key: SecretStr | None = Field(None, description=(
        "Enables /admin/* (403 while unset) and is required there "
        "(`Authorization: Bearer <key>` or `X-API-Key: <key>`)."))
    artifact_root: Path | None = Field(None, description=(
        "/admin/reload loads only artifact directories under this one "
        "(default: the directory that holds artifact_dir)."))
    graceful_shutdown_s: int = Field(10, ge=1, description="Time in-flight requests get after SIGTERM.")

    # -- query log (service/query_log.py) ---------------------------------------------------------
    query_log_path: Path | None = Field(None, description=(
        "When set, every answered query is appended to this JSON-lines file (BEIR queries.jsonl "
        "lines with time, artifact version and mode), which a later build reads as its "
        "`label_free.query_log`. It holds raw query text. One file per service process (each "
        "rotates its own). Off by default."))
    query_log_sample: float = Field(1.0, gt=0, le=1, description="Share of search requests whose queries are logged.")
    query_log_max_mb: float = Field(64.0, gt=0, description="Size at which the log file rotates.")
    query_log_backups: int = Field(5, ge=1, le=1000, description=(
        "Rotated parts kept (queries.1.jsonl ... queries.N.jsonl beside the file); the oldest is deleted."))

    @field_validator("max_concurrency")
    @classmethod
    def _permits_per_core(cls, value: int) -> int:
        return value or PERMITS_PER_CORE * available_cores()

    @model_validator(mode="after")
    def _check(self) -> Settings:
        problems = []
        if self.default_k > self.max_k:
            problems.append(f"default_k={self.default_k} is above max_k={self.max_k}")
        if self.default_candidates > self.max_candidates:
            problems.append(
                f"default_candidates={self.default_candidates} is above max_candidates={self.max_candidates}"
            )
        if self.max_k > self.max_candidates:
            problems.append(f"max_k={self.max_k} is above max_candidates={self.max_candidates}")
        if (self.hybrid_dense_weight is None) != (self.hybrid_sparse_weight is None):
            problems.append("set both hybrid_dense_weight and hybrid_sparse_weight, or neither")
        elif self.hybrid_dense_weight is not None and self.hybrid_dense_weight + (self.hybrid_sparse_weight or 0) <= 0:
            problems.append("hybrid_dense_weight and hybrid_sparse_weight are both 0")
        unknown = self._int8_model_names() - set(MODEL_ROLES)  # a typo is an error even with use_int8 off
        if unknown:
            problems.append(f"int8_models names unknown models {sorted(unknown)}; known: {', '.join(MODEL_ROLES)}")
        if self.api_key is not None and not self.api_key.get_secret_value().strip():
            problems.append("api_key is set but empty (unset NRS_API_KEY to disable authentication)")
        if self.admin_key is not None and not self.admin_key.get_secret_value().strip():
            problems.append("admin_key is set but empty (unset NRS_ADMIN_KEY to disable /admin/*)")
        if self.query_log_path is not None and self.query_log_path.suffix != ".jsonl":
            problems.append(f"query_log_path={self.query_log_path} must end in .jsonl (the builder reads it by suffix)")
        if problems:
            raise ValueError("invalid service settings: " + "; ".join(problems))
        return self

    def _int8_model_names(self) -> set[str]:
        return {m.strip() for m in self.int8_models.split(",") if m.strip()}

    @property
    def int8_model_set(self) -> set[str]:
        """The models loaded as int8 (empty unless ``use_int8``)."""
        return self._int8_model_names() if self.use_int8 else set()

    @property
    def cpu_workers(self) -> int:
        """Size of the thread pool for CPU work."""
        return self.worker_threads or self.max_concurrency + 2

    @property
    def reload_root(self) -> Path:
        """The directory /admin/reload may load artifacts from (resolved)."""
        return (self.artifact_root or Path(self.artifact_dir).resolve().parent).resolve()

    @property
    def request_timeout_s(self) -> float:
        return self.request_timeout_ms / 1000.0
