"""The search pipeline, without HTTP: encode -> first stage -> rerank -> fetch.

:class:`SearchEngine` holds everything one artifact directory provides (the dense and
ColBERT query encoders, the cross-encoder, the FAISS index, the ColBERT token index, BM25
and the document store) and answers queries synchronously, filling a
:class:`StageTimings` per query. It is safe to call from several threads at once: ONNX
Runtime sessions, FAISS searches (``nprobe`` passed per call), memory-mapped token arrays
and the per-thread SQLite connections of the document store are all read-only.

The web layer (:mod:`service.state`) calls the same pieces, but encodes queries through
the dynamic batcher and runs the rest in a thread pool; :meth:`SearchEngine.search` is the
plain synchronous path (warm-up, tests, scripts). Both give the same results.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.artifacts import ArtifactError, Manifest, verify
from models.dense_index import DenseIndex
from models.docstore import DocStore
from models.encoders import (
    QUERY_TOKEN_MAPS,
    TOKEN_STATES,
    ColbertEncoder,
    CrossEncoderScorer,
    DenseEncoder,
    OnnxEncoder,
    project_query_tokens,
)
from models.retrieval import (
    FIRST_STAGES,
    RERANK_MODES,
    FirstStage,
    QueryModel,
    Ranked,
    RerankMode,
    RetrievalWeights,
    StageTimings,
    doc_full_text,
    first_stages,
    rerank_order,
)
from models.sparse_index import BM25Index
from models.text import QueryTextError, clean_query
from models.token_index import TokenIndex
from service.errors import InvalidRequest
from service.schemas import HitOut
from service.settings import Settings

logger = logging.getLogger(__name__)

__all__ = ["FIRST_STAGES", "RERANK_MODES", "EncodedQueries", "FirstStage", "QueryModel", "RerankMode",
           "SearchEngine", "SearchOptions", "SearchResult", "StageTimings", "doc_full_text", "first_stage_queries",
           "retrieval_weights", "validate_query"]

WARMUP_QUERY = "warm up query for every stage"
#: a cross-encoder rerank's candidates when neither the settings nor the artifact say
DEFAULT_CROSS_ENCODER_CANDIDATES = 20


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


@dataclass(frozen=True)
class SearchOptions:
    """A validated request: ``depth`` = documents taken from the first stage."""

    k: int
    candidates: int
    rerank: RerankMode = "none"
    first_stage: FirstStage = "dense"
    nprobe: int | None = None
    include_text: bool = False

    @property
    def depth(self) -> int:
        return max(self.k, self.candidates)

    def encoders_needed(self, one_pass: bool = False, hybrid_head: bool = False,
                        hybrid_one_pass: bool = False) -> tuple[QueryModel, ...]:
        """Query encoders this request runs; ``one_pass``: ColBERT's query tokens come from
        the dense encoder's pass (:attr:`SearchEngine.one_pass`); ``hybrid_head``: the hybrid
        first stage's dense parts come from their own encoder (:attr:`SearchEngine.hybrid_encoder`);
        ``hybrid_one_pass``: after that hybrid, from that encoder's pass
        (:attr:`SearchEngine.hybrid_one_pass`)."""
        out: list[QueryModel] = []
        own_hybrid = self.first_stage == "hybrid" and hybrid_head
        colbert = self.rerank == "colbert"
        tokens_from_hybrid = colbert and own_hybrid and hybrid_one_pass
        if self.first_stage == "dense" or (self.first_stage == "hybrid" and not own_hybrid) or (
                colbert and one_pass and not tokens_from_hybrid):
            out.append("dense")
        if own_hybrid:
            out.append("hybrid")
        if colbert and not one_pass and not tokens_from_hybrid:
            out.append("colbert")
        return tuple(out)


@dataclass
class SearchResult:
    hits: list[HitOut]
    timings: StageTimings
    rerank: str
    first_stage: str
    artifact_version: str


@dataclass
class EncodedQueries:
    """Query vectors (``[n, dim]`` dense or ``[n, Lq, dim]`` ColBERT) and the time they took;
    ``tokens``: ColBERT's query tokens (``[n, L, dim]``, zero rows past each query) projected
    from the same pass as the dense or hybrid ``vectors`` when the engine serves one pass."""

    vectors: np.ndarray
    tokenize_ms: float = 0.0
    encode_ms: float = 0.0
    tokens: np.ndarray | None = None


def first_stage_queries(encoded: Mapping[QueryModel, EncodedQueries]) -> np.ndarray | None:
    """The query vectors the first stage searches with among a request's encodings by model:
    the hybrid head's where it ran (a hybrid request), else the dense encoder's, else None."""
    order: tuple[QueryModel, ...] = ("hybrid", "dense")
    for model in order:
        if model in encoded:
            return encoded[model].vectors
    return None


def colbert_queries(encoded: Mapping[QueryModel, EncodedQueries]) -> np.ndarray | None:
    """ColBERT's query tokens among a request's encodings by model: its ColBERT encoder's, or
    those projected from the hybrid head's pass (a hybrid request), else from the dense
    encoder's; None when it has none."""
    if "colbert" in encoded:
        return encoded["colbert"].vectors
    for model in ("hybrid", "dense"):
        if model in encoded and encoded[model].tokens is not None:
            return encoded[model].tokens
    return None


def validate_query(query: str, max_chars: int) -> str:
    """The query as it is searched (:func:`models.text.clean_query`), or
    :class:`InvalidRequest` when it is not a string, has a lone surrogate, shows nothing
    visible, or is longer than ``max_chars``."""
    if not isinstance(query, str):
        raise InvalidRequest("query must be a non-empty string")
    if len(query) > max_chars:
        raise InvalidRequest(f"query has {len(query)} characters; the maximum is {max_chars}")
    try:
        return clean_query(query)
    except QueryTextError as exc:
        raise InvalidRequest(str(exc)) from None


def _token_map(root: Path, manifest: Manifest, model: str, encoder: DenseEncoder,
               colbert_dim: int) -> np.ndarray | None:
    """The map the manifest names (:data:`models.encoders.QUERY_TOKEN_MAPS`) from query model
    ``model``'s token states (``encoder``'s) to ColBERT's query tokens
    (``[hidden, colbert_dim]``), or None where the artifact has none or the encoder's graph
    gives no token states."""
    entry, default = QUERY_TOKEN_MAPS[model]
    info = (manifest.models.get("colbert") or {}).get(entry)
    if not info or not encoder.has_token_states:
        return None
    path = root / str(manifest.models["colbert"]["path"]) / str(info.get("file") or default)
    with _loading(root, f"ColBERT's query token map ({path})"):
        token_map = np.load(path, allow_pickle=False)
    if token_map.ndim != 2 or token_map.shape[1] != colbert_dim:
        raise ArtifactError(f"{path}: shape {token_map.shape}, expected [hidden, {colbert_dim}] "
                            "(the ColBERT model's dim)")
    return np.asarray(token_map)


@contextmanager
def _loading(root: Path, what: str) -> Iterator[None]:
    """Turn any failure while opening one component into an :class:`ArtifactError` naming it."""
    try:
        yield
    except ArtifactError:
        raise
    except Exception as exc:  # a component that cannot be opened makes the artifact unusable
        raise ArtifactError(f"{root}: cannot load {what}: {type(exc).__name__}: {exc}") from exc


def _providers(use_gpu: bool) -> list[str]:
    import onnxruntime as ort

    if use_gpu:
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        logger.warning("use_gpu is set but ONNX Runtime has no CUDAExecutionProvider here; using CPU")
    return ["CPUExecutionProvider"]


class SearchEngine:
    """Everything loaded from one artifact directory, and the pipeline over it.

    Build with :meth:`load`. Attributes are read-only after construction.
    """

    def __init__(
        self,
        *,
        artifact_dir: Path,
        manifest: Manifest,
        settings: Settings,
        dense_encoder: DenseEncoder,
        dense_index: DenseIndex,
        docstore: DocStore,
        colbert_encoder: ColbertEncoder | None = None,
        token_index: TokenIndex | None = None,
        cross_encoder: CrossEncoderScorer | None = None,
        bm25: BM25Index | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        model_files: dict[str, str] | None = None,
        query_token_map: np.ndarray | None = None,
        hybrid_encoder: DenseEncoder | None = None,
        hybrid_token_map: np.ndarray | None = None,
    ) -> None:
        self.artifact_dir = Path(artifact_dir)
        self.manifest = manifest
        self.settings = settings
        self.dense_encoder = dense_encoder
        #: the query encoder of the hybrid first stage's dense parts, where the builder chose
        #: one other than the dense model (its closer copy of the teacher's query vectors)
        self.hybrid_encoder = hybrid_encoder
        self.dense_index = dense_index
        self.docstore = docstore
        self.colbert_encoder = colbert_encoder
        self.token_index = token_index
        self.cross_encoder = cross_encoder
        self.bm25 = bm25
        self.providers = list(providers)
        self.model_files = dict(model_files or {})
        #: ``[hidden, dim]``: ColBERT's query tokens are projected from the dense encoder's pass
        self.query_token_map = query_token_map
        #: ``[hidden, dim]``: after the hybrid, from the hybrid encoder's pass
        self.hybrid_token_map = hybrid_token_map
        try:
            self.weights = retrieval_weights(settings, manifest)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{artifact_dir}: malformed fusion weights in the manifest: {exc}") from exc
        self.default_mode = self._default_mode()
        self.closed = False
        #: requests and thread jobs using this engine now (kept by the service's event loop)
        self.leases = 0
        self._input_names = {
            role: {i.name for i in enc.session.get_inputs()}
            for role, enc in self._encoders().items()
        }
        #: per query model with a token map: the graph's outputs (vectors, token states); else its vectors
        self._outputs: dict[str, list[str]] = {}
        for role, enc, token_map in (("dense", dense_encoder, query_token_map),
                                     ("hybrid", hybrid_encoder, hybrid_token_map)):
            if enc is not None:
                first = enc.session.get_outputs()[0].name
                self._outputs[role] = [first, TOKEN_STATES] if token_map is not None else [first]

    def _encoders(self) -> dict[str, OnnxEncoder]:
        """The loaded ONNX models by role (``dense``, ``hybrid``, ``colbert``, ``cross-encoder``)."""
        found = {"dense": self.dense_encoder, "hybrid": self.hybrid_encoder, "colbert": self.colbert_encoder,
                 "cross-encoder": self.cross_encoder}
        return {role: enc for role, enc in found.items() if enc is not None}

    # -- loading ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, artifact_dir: str | Path, settings: Settings, *, deep_verify: bool = True) -> SearchEngine:
        """Verify ``artifact_dir`` against its manifest (checksums when ``deep_verify``), then
        open every model and index it lists.

        Raises
        ------
        ArtifactError
            The first problem found: missing or corrupt file (named), a component that
            cannot be opened, or components that disagree (dimensions, document counts).
        """
        root = Path(artifact_dir)
        started = time.perf_counter()
        manifest = verify(root, deep=deep_verify)
        providers = _providers(settings.use_gpu)
        if settings.threads > 0:
            import faiss

            faiss.omp_set_num_threads(settings.threads)

        def model_dir(kind: str, int8_as: str | None = None) -> tuple[Path, str] | None:
            info = manifest.models.get(kind)
            if info is None:
                return None
            onnx_file = str(info.get("onnx_file") or "model.onnx")
            if (int8_as or kind) in settings.int8_model_set:
                if info.get("int8_onnx_file"):
                    onnx_file = str(info["int8_onnx_file"])
                else:
                    logger.warning("use_int8 is set but the %s model has no int8 export; using %s", kind, onnx_file)
            model_files[kind] = onnx_file
            return root / str(info["path"]), onnx_file

        def index_path(name: str) -> Path | None:
            info = manifest.indexes.get(name)
            return None if info is None or info.get("path") is None else root / str(info["path"])

        kwargs: dict[str, Any] = {"threads": settings.threads, "providers": providers}
        model_files: dict[str, str] = {}
        dense_model, dense_path = model_dir("dense"), index_path("dense")
        if dense_model is None or dense_path is None:
            raise ArtifactError(f"{root}: the manifest has no dense model or no dense index; the service needs both")
        with _loading(root, f"the dense model ({dense_model[0]})"):
            dense_encoder = DenseEncoder(dense_model[0], onnx_file=dense_model[1], **kwargs)
        hybrid_encoder = None
        hybrid_model = model_dir("hybrid", int8_as="dense")  # a dense query encoder too: int8 as the dense one
        if hybrid_model is not None:
            with _loading(root, f"the hybrid first stage's query encoder ({hybrid_model[0]})"):
                hybrid_encoder = DenseEncoder(hybrid_model[0], onnx_file=hybrid_model[1], **kwargs)
        with _loading(root, f"the dense index ({dense_path})"):
            dense_index = DenseIndex.load_entry(root, manifest.indexes["dense"], use_gpu=settings.use_gpu)
        docstore_rel = manifest.docstore.get("path")
        if not docstore_rel:
            raise ArtifactError(f"{root}: the manifest names no document store")
        with _loading(root, f"the document store ({root / str(docstore_rel)})"):
            docstore = DocStore.open(root / str(docstore_rel))

        colbert_encoder = token_index = cross_encoder = bm25 = None
        colbert_model, colbert_path = model_dir("colbert"), index_path("colbert")
        if colbert_model is not None and colbert_path is not None:
            with _loading(root, f"the ColBERT model ({colbert_model[0]})"):
                colbert_encoder = ColbertEncoder(colbert_model[0], onnx_file=colbert_model[1], **kwargs)
            with _loading(root, f"the ColBERT token index ({colbert_path})"):
                token_index = TokenIndex.load(colbert_path, mmap=True)
                token_index = token_index.to_memory(settings.colbert_tokens, threads=settings.threads)
        query_token_map = hybrid_token_map = None
        if settings.one_pass and colbert_encoder is not None:
            query_token_map = _token_map(root, manifest, "dense", dense_encoder, colbert_encoder.dim)
            if query_token_map is not None and hybrid_encoder is not None:
                hybrid_token_map = _token_map(root, manifest, "hybrid", hybrid_encoder, colbert_encoder.dim)
        ce_model = model_dir("cross-encoder")
        if ce_model is not None:
            with _loading(root, f"the cross-encoder ({ce_model[0]})"):
                served_ce = manifest.serving.get("cross_encoder") or {}
                cross_encoder = CrossEncoderScorer(ce_model[0], onnx_file=ce_model[1], **kwargs,
                                                   max_len=settings.cross_encoder_max_len or served_ce.get("max_len"))
        bm25_path = index_path("bm25")
        if bm25_path is not None:
            with _loading(root, f"the BM25 index ({bm25_path})"):
                bm25 = BM25Index.load(bm25_path, mmap=True)

        engine = cls(
            artifact_dir=root, manifest=manifest, settings=settings, dense_encoder=dense_encoder,
            dense_index=dense_index, docstore=docstore, colbert_encoder=colbert_encoder, token_index=token_index,
            cross_encoder=cross_encoder, bm25=bm25, providers=providers, model_files=model_files,
            query_token_map=query_token_map, hybrid_encoder=hybrid_encoder, hybrid_token_map=hybrid_token_map,
        )
        engine._check_consistency()
        logger.info(
            "loaded artifact %s (version %s, %d docs) in %.0f ms",
            root, engine.artifact_version, engine.n_docs, _ms(started),
        )
        return engine

    def _check_consistency(self) -> None:
        root, n = self.artifact_dir, len(self.docstore)
        problems = []
        if self.dense_index.dim != self.dense_encoder.dim:
            problems.append(f"dense index dim {self.dense_index.dim} != dense model dim {self.dense_encoder.dim}")
        if self.hybrid_encoder is not None and self.hybrid_encoder.dim != self.dense_index.dim:
            problems.append(f"dense index dim {self.dense_index.dim} != hybrid query encoder dim "
                            f"{self.hybrid_encoder.dim}")
        if self.dense_index.ntotal != n:
            problems.append(f"dense index holds {self.dense_index.ntotal} vectors for {n} documents")
        if self.manifest.corpus.n_docs and self.manifest.corpus.n_docs != n:
            problems.append(f"manifest corpus.n_docs={self.manifest.corpus.n_docs} but the docstore has {n}")
        if self.token_index is not None and self.colbert_encoder is not None:
            if self.token_index.n_docs != n:
                problems.append(f"ColBERT index holds {self.token_index.n_docs} documents for {n}")
            if self.token_index.dim != self.colbert_encoder.dim:
                problems.append(f"ColBERT index dim {self.token_index.dim} != model dim {self.colbert_encoder.dim}")
        if self.bm25 is not None and self.bm25.n_docs != n:
            problems.append(f"BM25 index holds {self.bm25.n_docs} documents for {n}")
        parts = self.weights.dense_parts
        if parts is not None:  # the hybrid scores its candidates by each part of the indexed vectors
            if parts.dim != self.dense_index.dim:
                problems.append(f"hybrid dense parts span {parts.dim} dimensions, "
                                f"the dense index {self.dense_index.dim}")
            else:
                try:
                    self.dense_index.enable_vectors()
                except RuntimeError as exc:
                    problems.append(f"the hybrid scores candidates by dense parts, but {exc}")
        if problems:
            raise ArtifactError(f"{root}: inconsistent artifact: " + "; ".join(problems))

    def close(self) -> None:
        """Release what this engine holds: the document store's connections, the ONNX
        sessions, the FAISS index, the token arrays and BM25. Call only when no request uses
        the engine (:class:`service.state.ServiceState` counts them); a closed engine is
        never used again, so its components are dropped now rather than whenever the
        garbage collector next runs."""
        if self.closed:
            return
        self.closed = True
        self.docstore.close()
        for name in ("dense_encoder", "hybrid_encoder", "colbert_encoder", "cross_encoder", "dense_index",
                     "token_index", "bm25", "_input_names"):
            vars(self).pop(name, None)

    def _default_mode(self) -> dict[str, str]:
        """The mode of a request that names none: the settings' where given, else the
        artifact's (``manifest.serving.default``, the builder's choice on its dev queries),
        else dense without rerank; each field on its own."""
        built = self.manifest.serving.get("default", {})
        out: dict[str, str] = {}
        for name, configured, fallback in (("first_stage", self.settings.default_first_stage, "dense"),
                                           ("rerank", self.settings.default_rerank, "none")):
            available = self.first_stages() if name == "first_stage" else self.rerank_modes()
            if configured is not None:
                if configured not in available:
                    raise ArtifactError(f"default_{name}={configured!r} is not available in this artifact "
                                        f"(it has {', '.join(available)})")
                out[name], source = configured, "settings"
            elif built.get(name) in available:
                out[name], source = built[name], "artifact"
            else:
                out[name], source = fallback, "built-in"
            out[f"{name}_source"] = source
        return out

    # -- introspection ----------------------------------------------------------------------------
    @property
    def artifact_version(self) -> str:
        return self.manifest.artifact_version

    @property
    def n_docs(self) -> int:
        return len(self.docstore)

    @property
    def cross_encoder_candidates(self) -> int:
        """Candidates a cross-encoder rerank rescores when a request gives none: the settings',
        else the depth the builder evaluated it at (``manifest.serving.cross_encoder``), else 20."""
        configured = self.settings.cross_encoder_candidates
        built = (self.manifest.serving.get("cross_encoder") or {}).get("depth")
        depth = int(configured or built or DEFAULT_CROSS_ENCODER_CANDIDATES)
        return min(depth, self.settings.max_cross_encoder_candidates)

    def rerank_modes(self) -> list[str]:
        """Rerank modes this artifact supports."""
        out = ["none"]
        if self.colbert_encoder is not None and self.token_index is not None:
            out.append("colbert")
        if self.cross_encoder is not None:
            out.append("cross-encoder")
        return out

    def first_stages(self) -> list[str]:
        """First stages this artifact supports."""
        return ["dense", "sparse", "hybrid"] if self.bm25 is not None else ["dense"]

    def info(self) -> dict[str, Any]:
        """Manifest summary for ``GET /info``."""
        models: dict[str, Any] = {}
        for role, enc in self._encoders().items():
            cfg = enc.config
            entry: dict[str, Any] = {
                "dim": cfg.dim, "max_query_len": cfg.max_query_len, "max_doc_len": cfg.max_doc_len,
                "pooling": cfg.pooling, "similarity": cfg.similarity, "base_model": cfg.base_model,
                "onnx_file": self.model_files.get(role),
            }
            if role == "colbert":
                entry["colbert_query_len"] = cfg.colbert_query_len
                # where rerank=colbert takes its query tokens: the dense encoder's pass, or its own
                entry["query_tokens"] = "dense pass" if self.one_pass else "colbert pass"
                if self.hybrid_encoder is not None:  # after the hybrid: the hybrid encoder's pass, or as above
                    entry["hybrid_query_tokens"] = "hybrid pass" if self.hybrid_one_pass else entry["query_tokens"]
            if role == "cross-encoder":
                entry.pop("dim")
                entry.pop("pooling")
                entry.update(max_len=self.cross_encoder.max_len if self.cross_encoder else None,
                             default_candidates=self.cross_encoder_candidates)
            models[role] = entry
        indexes = {name: dict(info) for name, info in self.manifest.indexes.items()}
        if "dense" in indexes:
            indexes["dense"].update(ntotal=self.dense_index.ntotal, default_nprobe=(
                self.dense_index.default_nprobe if self.dense_index.is_ivf else None))
        return {
            "artifact_version": self.artifact_version,
            "created_at": self.manifest.created_at,
            "checksums": {rel: entry.sha256 for rel, entry in sorted(self.manifest.files.items())},
            "n_docs": self.n_docs,
            "corpus": self.manifest.corpus.model_dump(),
            "models": models,
            "indexes": indexes,
            "rerank_modes": self.rerank_modes(),
            "first_stages": self.first_stages(),
            "default_mode": dict(self.default_mode),
            "hybrid_weights": {"dense": self.weights.hybrid[0], "sparse": self.weights.hybrid[1],
                               "dense_parts": (None if self.weights.dense_parts is None
                                               else list(self.weights.dense_parts.weights))},
            "colbert_weights": dict(self.weights.colbert),
            "cross_encoder_weights": dict(self.weights.cross_encoder),
            "providers": self.providers,
            "use_int8": self.settings.use_int8,
            "colbert_tokens": None if self.token_index is None else self.token_index.in_memory,
        }

    # -- request validation -----------------------------------------------------------------------
    def resolve_options(
        self,
        *,
        k: int | None = None,
        candidates: int | None = None,
        rerank: str | None = None,
        first_stage: str | None = None,
        nprobe: int | None = None,
        include_text: bool = False,
    ) -> SearchOptions:
        """Fill defaults (:attr:`default_mode`, the settings) and check every limit;
        :class:`InvalidRequest` if not met."""
        s = self.settings
        rerank = self.default_mode["rerank"] if rerank is None else rerank
        first_stage = self.default_mode["first_stage"] if first_stage is None else first_stage
        if rerank not in RERANK_MODES:
            raise InvalidRequest(f"unknown rerank {rerank!r}; expected one of {', '.join(RERANK_MODES)}")
        if first_stage not in FIRST_STAGES:
            raise InvalidRequest(f"unknown first_stage {first_stage!r}; expected one of {', '.join(FIRST_STAGES)}")
        if rerank not in self.rerank_modes():
            raise InvalidRequest(
                f"rerank={rerank!r} is not available: this artifact ({self.artifact_version}) has no "
                f"{'ColBERT model and token index' if rerank == 'colbert' else 'cross-encoder model'}"
            )
        if first_stage not in self.first_stages():
            raise InvalidRequest(f"first_stage={first_stage!r} needs a BM25 index, which this artifact does not have")
        k = s.default_k if k is None else int(k)
        if not 1 <= k <= s.max_k:
            raise InvalidRequest(f"k={k} is out of range: it must be between 1 and {s.max_k}")
        if candidates is None:
            candidates = s.default_candidates
            if rerank == "cross-encoder":
                candidates = self.cross_encoder_candidates
        candidates = int(candidates)
        if not 1 <= candidates <= s.max_candidates:
            raise InvalidRequest(
                f"candidates={candidates} is out of range: it must be between 1 and {s.max_candidates}"
            )
        depth = max(k, candidates)
        if rerank == "cross-encoder" and depth > s.max_cross_encoder_candidates:
            raise InvalidRequest(
                f"the cross-encoder reranks at most {s.max_cross_encoder_candidates} candidates; "
                f"this request asks for {depth} (max of k and candidates)"
            )
        if nprobe is not None and nprobe < 1:
            raise InvalidRequest(f"nprobe={nprobe} must be at least 1")
        return SearchOptions(
            k=k, candidates=candidates, rerank=rerank,  # type: ignore[arg-type]
            first_stage=first_stage, nprobe=nprobe, include_text=bool(include_text),  # type: ignore[arg-type]
        )

    # -- encoding ---------------------------------------------------------------------------------
    def _encoder(self, kind: QueryModel) -> OnnxEncoder:
        enc = self._encoders().get(kind)
        if enc is None:
            raise InvalidRequest(f"this artifact has no {kind} query encoder")
        return enc

    def encode(self, kind: QueryModel, texts: Sequence[str]) -> EncodedQueries:
        """Tokenize and encode ``texts`` in one ONNX batch with the ``kind`` query encoder.

        Same inputs as :meth:`models.encoders.DenseEncoder.encode_queries` /
        :meth:`models.encoders.ColbertEncoder.encode_queries`, timed per step.
        """
        enc = self._encoder(kind)
        started = time.perf_counter()
        if kind != "colbert":
            batch = enc.tokenizer.encode(list(texts), enc.config.max_query_len)
        else:
            batch = enc.tokenizer.encode_colbert_queries(list(texts), enc.config.colbert_query_len)
        tokenize_ms = _ms(started)
        started = time.perf_counter()
        names = self._input_names[kind]
        feed = {k: v for k, v in batch.as_dict().items() if k in names}
        token_map = {"dense": self.query_token_map, "hybrid": self.hybrid_token_map}.get(kind)
        if token_map is not None:  # one pass: ColBERT's query tokens too
            vectors, states = enc.session.run(self._outputs[kind], feed)
            tokens = project_query_tokens(states, batch.attention_mask, token_map)
            return EncodedQueries(np.asarray(vectors, dtype=np.float32), tokenize_ms, _ms(started), tokens)
        vectors = np.asarray(enc.session.run(self._outputs.get(kind), feed)[0], dtype=np.float32)
        return EncodedQueries(vectors, tokenize_ms, _ms(started))

    @property
    def one_pass(self) -> bool:
        """Whether ColBERT's query tokens come from the dense encoder's pass (no second pass)."""
        return self.query_token_map is not None

    @property
    def hybrid_one_pass(self) -> bool:
        """Whether, after the hybrid first stage, ColBERT's query tokens come from the hybrid
        encoder's pass (no second pass)."""
        return self.hybrid_token_map is not None

    def encoders_needed(self, opts: SearchOptions) -> tuple[QueryModel, ...]:
        """The query encoders request ``opts`` runs on this engine."""
        return opts.encoders_needed(self.one_pass, self.hybrid_encoder is not None, self.hybrid_one_pass)

    # -- first stage, rerank, fetch ---------------------------------------------------------------
    def _finish(
        self, query: str, cands: Ranked, timings: StageTimings, opts: SearchOptions, colbert: np.ndarray | None,
        rerank_executor: Executor | None = None,
    ) -> tuple[list[HitOut], StageTimings]:
        idx, first_scores = cands
        docs: list[dict[str, str]] | None = None
        if opts.rerank == "none" or len(idx) == 0:
            order = np.arange(min(opts.k, len(idx)))
            final_scores = first_scores
        else:
            weight = self.weights.rerank_weight(opts.rerank, opts.first_stage)
            if opts.rerank == "colbert":
                assert self.token_index is not None and colbert is not None
                started = time.perf_counter()
                scores = self.token_index.rerank(colbert, idx, executor=rerank_executor,
                                                 parts=self.settings.rerank_threads)
            else:
                assert self.cross_encoder is not None
                started = time.perf_counter()
                docs = self.docstore.get_by_index(idx.tolist())
                timings.fetch += _ms(started)
                started = time.perf_counter()
                scores = self.cross_encoder.score(query, [doc_full_text(d["title"], d["text"]) for d in docs])
            final_scores, order = rerank_order(first_scores, scores, weight, opts.k)
            timings.rerank = _ms(started)
        started = time.perf_counter()
        chosen = [int(i) for i in order]
        if opts.include_text:
            texts = [docs[i] for i in chosen] if docs is not None else self.docstore.get_by_index(idx[chosen].tolist())
        hits = []
        for rank, i in enumerate(chosen, start=1):
            text = texts[rank - 1] if opts.include_text else {}
            hits.append(HitOut.model_construct(  # built from trusted values: no validation on the hot path
                id=self.docstore.ids[int(idx[i])], score=float(final_scores[i]), rank=rank,
                first_stage_score=float(first_scores[i]), title=text.get("title"), text=text.get("text")))
        timings.fetch += _ms(started)
        return hits, timings

    def retrieve(
        self,
        queries: Sequence[str],
        opts: SearchOptions,
        dense: np.ndarray | None = None,
        colbert: np.ndarray | None = None,
        rerank_executor: Executor | None = None,
    ) -> list[tuple[list[HitOut], StageTimings]]:
        """First stage, rerank and fetch for already-encoded queries (one row per query).

        Fills the ``ann``, ``sparse``, ``rerank`` and ``fetch`` timings. With
        ``rerank_executor``, a ColBERT rerank splits its candidates over this thread and
        ``settings.rerank_threads - 1`` of the executor's (same scores).
        """
        if opts.rerank == "colbert" and (colbert is None or len(colbert) != len(queries)):
            raise ValueError("ColBERT reranking needs one ColBERT query matrix per query")
        timings = [StageTimings() for _ in queries]
        candidates = first_stages(
            [opts.first_stage], queries, opts.depth, dense_vectors=dense,
            dense_search=lambda q, k: self.dense_index.search(q, k, nprobe=opts.nprobe),
            sparse=self.bm25, hybrid_weights=self.weights.hybrid, dense_parts=self.weights.dense_parts,
            doc_vectors=self.dense_index.vectors, timings=timings,
        )[opts.first_stage]
        return [
            self._finish(q, c, t, opts, None if colbert is None else colbert[row], rerank_executor)
            for row, (q, c, t) in enumerate(zip(queries, candidates, timings))
        ]

    # -- synchronous end-to-end path --------------------------------------------------------------
    def search_many(self, queries: Sequence[str], opts: SearchOptions) -> list[SearchResult]:
        """Encode ``queries`` in one batch per encoder, then :meth:`retrieve`."""
        started = time.perf_counter()
        encoded = {kind: self.encode(kind, queries) for kind in self.encoders_needed(opts)}
        out = []
        for hits, timings in self.retrieve(
            queries, opts,
            dense=first_stage_queries(encoded), colbert=colbert_queries(encoded),
        ):
            timings.tokenize = sum((e.tokenize_ms for e in encoded.values()), 0.0)
            timings.encode = sum((e.encode_ms for e in encoded.values()), 0.0)
            timings.total = _ms(started)
            out.append(SearchResult(hits, timings, opts.rerank, opts.first_stage, self.artifact_version))
        return out

    def search(self, query: str, **options: Any) -> SearchResult:
        """Search one query synchronously; ``options`` as in :meth:`resolve_options`, e.g.
        ``engine.search("what causes fever", k=5, rerank="colbert")``."""
        query = validate_query(query, self.settings.max_query_chars)
        return self.search_many([query], self.resolve_options(**options))[0]

    def warmup(self) -> dict[str, float]:
        """Run a query through every available first stage and rerank mode; ``{mode: ms}``."""
        out: dict[str, float] = {}
        k = min(self.settings.default_k, self.settings.max_cross_encoder_candidates)
        for first_stage in self.first_stages():
            for rerank in self.rerank_modes():
                started = time.perf_counter()
                self.search(WARMUP_QUERY, k=k, candidates=k, rerank=rerank, first_stage=first_stage)
                out[f"{first_stage}+{rerank}"] = round(_ms(started), 3)
        return out

    def __repr__(self) -> str:
        return f"SearchEngine({self.artifact_dir}, version={self.artifact_version}, n_docs={self.n_docs})"


def retrieval_weights(settings: Settings, manifest: Manifest) -> RetrievalWeights:
    """The weights this service ranks with: the settings' where given
    (``hybrid_dense_weight``/``hybrid_sparse_weight``, ``colbert_weight``,
    ``cross_encoder_weight``), else the builder's dev-tuned ones from the manifest
    (:meth:`models.retrieval.RetrievalWeights.from_manifest`)."""
    hybrid = None
    if settings.hybrid_dense_weight is not None and settings.hybrid_sparse_weight is not None:
        hybrid = (settings.hybrid_dense_weight, settings.hybrid_sparse_weight)
    return RetrievalWeights.from_manifest(
        manifest.indexes, manifest.models, hybrid=hybrid,
        colbert=settings.colbert_weight, cross_encoder=settings.cross_encoder_weight,
    )
