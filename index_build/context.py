"""What every build stage reads: the configuration, the corpus, BM25, the base dense model,
the teacher, the cache of encodings and scores, and the exported students' encoders as the
evaluation and the artifact use them (:class:`BuildContext`). The stage runner
(:class:`index_build.stages.Pipeline`) is a build context that also keys, runs and records
the stages."""

from __future__ import annotations

import logging
import os
import pickle
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from index_build.cache import ArrayCache, content_key
from index_build.config import BuildConfig, ConfigError
from index_build.data import Collection, load_collection
from index_build.metrics import metrics, run_from_arrays
from models.dense_index import exact_search
from models.encoders import ONNX_NAME
from models.retrieval import FIRST_STAGES, DenseParts, Ranked, first_stages, rerank_order

E = TypeVar("E")

log = logging.getLogger(__name__)

#: WiSE-FT weight of a label-free build's distilled dense student (see TrainConfig.wise_ft):
#: distilling on extractive pseudo-queries alone pulls the student away from real queries.
LABEL_FREE_WISE_FT = 0.5
#: training queries the map from the query encoder's token states to ColBERT's is fitted on
TOKEN_MAP_QUERIES = 4000
#: the name of the asymmetric student's hybrid head among the exported graphs (:meth:`BuildContext.onnx_dir`)
HYBRID_HEAD = "hybrid-head"


class BuildContext(ABC):
    """The shared inputs and encoders of one build (``cfg``), each made once when first used."""

    def __init__(self, cfg: BuildConfig, *, progress: bool = True) -> None:
        self.cfg = cfg
        self.work = Path(cfg.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        #: per TREC DL pool whose own students are evaluated: the dev-slice weights used
        self.trec_weights: dict[str, dict[str, Any]] = {}
        # dev-slice choices, computed once per exported models (index_build.tune)
        self.tuning: dict[tuple, dict[str, Any]] = {}
        # open ONNX sessions of the exported students (student_encoder)
        self._encoders: dict[tuple[str, str], tuple[tuple[int, ...], Any]] = {}
        if cfg.threads:
            os.environ.setdefault("OMP_NUM_THREADS", str(cfg.threads))

    @abstractmethod
    def export_key(self, kind: str, onnx_file: str | None = None) -> str:
        """The key of student ``kind``'s export (defined by the runner, which keys the stages);
        content caches of what an exported graph encodes are kept under it."""

    def student_encoder(self, cls: type[E], kind: str, onnx_file: str = ONNX_NAME) -> E:
        """Student ``kind``'s exported graph ``onnx_file`` as an encoder of class ``cls``
        (:class:`~models.encoders.DenseEncoder`, :class:`~models.encoders.ColbertEncoder`),
        opened once and reused while the file stays the same (an export that rewrites it opens
        it again): evaluation and tuning encode with the same graphs many times, and opening an
        ONNX session costs a graph optimization each time."""
        directory = self.onnx_dir(kind)
        st = (directory / onnx_file).stat()
        stamp = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)  # any rewrite changes one
        key = (cls.__name__, str(directory / onnx_file))
        held = self._encoders.get(key)
        if held is None or held[0] != stamp:
            self._encoders[key] = (stamp, cls(directory, onnx_file=onnx_file,  # type: ignore[call-arg]
                                              threads=self.cfg.threads))
        return self._encoders[key][1]  # type: ignore[no-any-return]

    @cached_property
    def collection(self) -> Collection:
        # a rerank-mode collection is a candidate pool: its judged documents need not all be in it
        unknown = "keep" if self.cfg.evaluate.mode == "rerank" else "error"
        return load_collection(self.cfg.data.path, unknown_docs=unknown)

    @cached_property
    def corpus_texts(self) -> list[str]:
        return self.collection.doc_texts()

    @cached_property
    def cache(self) -> ArrayCache:
        from models.sources import cache_dir

        return ArrayCache(self.cfg.cache_path or cache_dir() / "arrays.sqlite")

    @cached_property
    def bm25(self):
        from models.sparse_index import BM25Index

        return BM25Index.build(self.corpus_texts)

    @cached_property
    def base_dense(self):
        from index_build.teachers import BiEncoderTeacher

        return BiEncoderTeacher(self.cfg.students.base, self.corpus_texts, self.cache,
                                max_doc_len=self.cfg.students.max_doc_len, threads=self.cfg.threads,
                                progress=self.progress, name="base-dense")

    @cached_property
    def teacher(self):
        from index_build.teachers import BI_ENCODER_MAX_DOC_LEN, EnsembleTeacher, build_teacher

        spec = self.teacher_spec()
        # the base dense model is the same scorer as a bi-encoder member on the same checkpoint and length
        same_length = self.cfg.students.max_doc_len == BI_ENCODER_MAX_DOC_LEN
        prebuilt = {self.cfg.students.base: self.base_dense} if same_length else None
        teacher = build_teacher(spec, self.corpus_texts, self.collection.checksum(), self.cache, bm25=self.bm25,
                                threads=self.cfg.threads, prebuilt=prebuilt)
        assert isinstance(teacher, EnsembleTeacher)
        return teacher

    def teacher_spec(self):
        """The configured teacher: an ensemble of ``teacher.members``."""
        from index_build.teachers import TeacherSpec

        return TeacherSpec.from_dict({"kind": "ensemble", "members": self.cfg.teacher.members,
                                      "norm": self.cfg.teacher.norm})

    @cached_property
    def query_log_digest(self) -> str:
        """The SHA-256 of ``label_free.query_log``, read once a run ("" without a log): the
        mine stage's key, and so every later stage's, holds it."""
        from index_build.data import query_log_checksum

        return query_log_checksum(self.cfg.label_free.query_log) if self.cfg.label_free.query_log else ""

    @property
    def label_free(self) -> bool:
        c = self.collection
        return self.cfg.data.label_free or not (c.has_labels and self.cfg.data.train_split in c.qrels)

    def extra_splits(self) -> list[str]:
        """``evaluate.extra_splits``, checked: only a label-free build may name them (it reads
        no judgments; a query log's queries are left out of them, :meth:`logged_queries`),
        and each must be judged in the collection."""
        extra = list(self.cfg.evaluate.extra_splits)
        if extra and not self.label_free:
            raise ConfigError("evaluate.extra_splits: only a label-free build reads none of a split's judgments; "
                              f"this build trains on the {self.cfg.data.train_split!r} judgments")
        missing = [s for s in extra if s not in self.collection.qrels]
        if missing:
            raise ConfigError(f"evaluate.extra_splits: no judgments for {missing} in {self.cfg.data.path} "
                              f"(judged splits: {sorted(self.collection.qrels)})")
        return extra

    @cached_property
    def logged_queries(self) -> frozenset[str]:
        """The queries of ``label_free.query_log`` (:func:`index_build.data.query_key`; empty
        without one): an extra split is evaluated on its other queries only, those the build
        never read."""
        from index_build.data import load_query_log, query_key

        log = self.cfg.label_free.query_log
        return frozenset(query_key(t) for t in load_query_log(log)) if log else frozenset()

    def candidate_pools(self, queries: list[str], depth: int, extra: list[list[int]] | None = None):
        """Union of BM25 and base-dense top-``depth`` per query, plus the two rankings."""
        from index_build.sampling import union_pools

        _, bm_idx = self.bm25.search(queries, depth)
        _, de_idx = self.base_dense.retrieve(queries, depth)
        return union_pools([bm_idx, de_idx], extra), [bm_idx, de_idx]

    def content_fp(self, *parts: str) -> str:
        """The fingerprint under which a content cache (corpus encodings, scores) keeps this
        corpus's arrays for ``parts`` (a model's export key, ...)."""
        return content_key(self.collection.checksum(), *parts)[:16]

    @property
    def pseudo_dev(self) -> bool:
        """Whether the dev slice is pseudo-queries cut from the documents: a label-free build
        without logged queries held out for it (``label_free.log_dev_queries``)."""
        lf = self.cfg.label_free
        return self.label_free and not (lf.query_log and lf.log_dev_queries > 0)

    @cached_property
    def teacher_space(self):
        """The document space of the teacher's bi-encoder members
        (:class:`index_build.asymmetric.TeacherSpace`): the asymmetric student's target, and
        the vectors the artifact's dense index holds when it serves that student."""
        from index_build.asymmetric import TeacherSpace
        from index_build.config import ConfigError
        from index_build.teachers import BiEncoderTeacher

        members = [m for m in self.teacher.members if isinstance(m, BiEncoderTeacher)]
        if not members:
            raise ConfigError("students.kinds includes 'asymmetric', whose document space is the teacher's "
                              "bi-encoder members, but teacher.members has none")
        return TeacherSpace(members)

    @cached_property
    def teacher_fusion(self) -> dict[str, Any]:
        """How the teacher fuses the signals the asymmetric student's hybrid serves: its
        bi-encoder members' share of the weight of those and its BM25 members
        (``dense_share``; 0.5 when it has no BM25 member), those members' own weights
        (``member_weights``, in the space's order), and the members' parts of the
        document space weighted as in the teacher (``parts``, :class:`models.retrieval.DenseParts`;
        ``record``: the manifest's description of them). Members the hybrid cannot serve (a
        cross-encoder) are left out of both."""
        from index_build.teachers import BiEncoderTeacher, BM25Teacher

        space, teacher = self.teacher_space, self.teacher  # the space: the bi-encoder members, in order
        dense = [w for m, w in zip(teacher.members, teacher.weights) if isinstance(m, BiEncoderTeacher)]
        sparse = sum(w for m, w in zip(teacher.members, teacher.weights) if isinstance(m, BM25Teacher))
        share = sum(dense) / (sum(dense) + sparse) if sparse > 0 else 0.5
        parts = DenseParts.from_dims(space.dims, dense)
        return {"parts": parts, "dense_share": round(float(share), 4), "member_weights": dense,
                "record": {"members": space.names, "dims": space.dims, "weights": [round(w, 6) for w in parts.weights],
                           "scoring": "every candidate of either list by BM25 and by each part, z-scored"}}

    @property
    def served_dense(self) -> str:
        """The dense model the artifact serves (and the first stage that the hybrid, the
        rerank weights and the served default are tuned on): the asymmetric student when the
        build distills one, else the full-tower dense student."""
        return "asymmetric" if "asymmetric" in self.cfg.students.kinds else "dense"

    def load_mined(self) -> dict:
        with (self.work / "mine" / "examples.pkl").open("rb") as f:
            return pickle.load(f)

    def dev_qrels(self, dev: dict) -> dict[str, dict[str, int]]:
        """Judgments of the dev slice: its pseudo-qrels (label-free) or the held-out train qrels."""
        train_qrels = self.collection.qrels.get(self.cfg.data.train_split, {})
        return dev.get("qrels") or {q: train_qrels[q] for q in dev["qids"]}

    def wise_ft(self, kind: str) -> float:
        """The WiSE-FT weight of the distilled model against the base for ``kind``."""
        if kind == "asymmetric":  # its maps have no counterpart in the base model to interpolate with
            return 1.0
        value = self.cfg.train[kind].wise_ft  # range checked by load_config
        if value is None:
            value = LABEL_FREE_WISE_FT if (self.label_free and kind == "dense") else 1.0
        return float(value)

    def onnx_dir(self, kind: str) -> Path:
        """Student ``kind``'s exported graphs (:data:`HYBRID_HEAD`: the asymmetric student's hybrid head's)."""
        return self.work / ("head-asymmetric" if kind == HYBRID_HEAD else f"export-{kind}") / "onnx"

    def hybrid_head(self) -> dict[str, Any] | None:
        """The record of the asymmetric student's hybrid head when it serves the hybrid's
        dense parts (the runner fits and exports it, :func:`index_build.distill.hybrid_head_stage`),
        else None: the served dense model serves them."""
        return None

    def hybrid_queries(self, texts: list[str], onnx_file: str = ONNX_NAME) -> np.ndarray | None:
        """The query vectors of the hybrid's dense parts from the hybrid head's graph
        ``onnx_file`` when it serves them (:meth:`hybrid_head`), else None (the served dense
        model's vectors serve them)."""
        if self.hybrid_head() is None:
            return None
        from models.encoders import DenseEncoder

        enc = self.student_encoder(DenseEncoder, HYBRID_HEAD, onnx_file)
        return np.ascontiguousarray(enc.encode_queries(texts), dtype=np.float32)

    def corpus_vectors(self, kind: str | None = None) -> np.ndarray:
        """The document vectors dense model ``kind`` (default :attr:`served_dense`) searches:
        the full-tower student's own corpus encodings, or for the asymmetric student the
        teacher members' (cached) document vectors."""
        kind = kind or self.served_dense
        return self.teacher_space.doc_vectors() if kind == "asymmetric" else self.dense_corpus()

    def dense_queries(self, texts: list[str], kind: str | None = None, onnx_file: str = ONNX_NAME) -> np.ndarray:
        """Query vectors of dense model ``kind`` (default :attr:`served_dense`) from its exported graph."""
        from models.encoders import DenseEncoder

        enc = self.student_encoder(DenseEncoder, kind or self.served_dense, onnx_file)
        return np.ascontiguousarray(enc.encode_queries(texts), dtype=np.float32)

    def dense_corpus(self, onnx_file: str = ONNX_NAME) -> np.ndarray:
        from index_build.teachers import encode_corpus_cached
        from models.encoders import DenseEncoder

        enc = self.student_encoder(DenseEncoder, "dense", onnx_file)
        fp = self.content_fp("dense-corpus", self.export_key("dense", onnx_file), onnx_file)
        return encode_corpus_cached(enc, self.corpus_texts, self.cache, fp, progress=self.progress)

    def colbert_corpus(self, onnx_file: str = ONNX_NAME, subset: np.ndarray | None = None) -> dict[int, np.ndarray]:
        from models.encoders import ColbertEncoder

        enc = self.student_encoder(ColbertEncoder, "colbert", onnx_file)
        fp = self.content_fp("colbert-corpus", self.export_key("colbert", onnx_file), onnx_file)
        idx = np.arange(len(self.corpus_texts)) if subset is None else np.unique(subset)
        keys = [content_key(fp, self.corpus_texts[i]) for i in idx]
        found = self.cache.get_many(keys)
        todo = [int(i) for i, k in zip(idx, keys) if k not in found]
        for start in range(0, len(todo), 1024):
            part = todo[start : start + 1024]
            vecs = enc.encode_docs([self.corpus_texts[i] for i in part], progress=self.progress)
            new = [(content_key(fp, self.corpus_texts[i]), v) for i, v in zip(part, vecs)]
            self.cache.put_many(new)
            found.update(new)
        return {int(i): found[k] for i, k in zip(idx, keys)}

    def cross_encoder_scores(self, queries: list[str], candidate_texts: list[list[str]],
                             onnx_file: str = ONNX_NAME) -> list[np.ndarray]:
        """The cross-encoder student's score (its ONNX graph ``onnx_file``, each pair cut to
        ``evaluate.cross_encoder_max_len`` as served) of each query's candidate texts, cached
        per query by content (model, query, texts): the slowest part of evaluation is computed
        once per model."""
        from tqdm import tqdm

        from models.encoders import CrossEncoderScorer

        max_len = self.cfg.evaluate.cross_encoder_max_len
        fp = self.content_fp("cross-encoder-scores", self.export_key("cross-encoder", onnx_file),
                             *([onnx_file] if onnx_file != ONNX_NAME else []),
                             *([f"max_len={max_len}"] if max_len else []))
        keys = [content_key(fp, q, *texts) for q, texts in zip(queries, candidate_texts)]
        found = self.cache.get_many(keys)
        todo = [i for i, k in enumerate(keys) if k not in found]
        if todo:
            ce = CrossEncoderScorer(self.onnx_dir("cross-encoder"), onnx_file=onnx_file, threads=self.cfg.threads,
                                    max_len=max_len or None)
            for i in tqdm(todo, desc=f"cross-encoder rerank ({onnx_file})", unit="query", disable=not self.progress):
                item = (keys[i], np.asarray(ce.score(queries[i], candidate_texts[i]), dtype=np.float32))
                self.cache.put_many([item])  # per query: an interrupted evaluation keeps what it scored
                found[item[0]] = item[1]
        return [found[k] for k in keys]

    @property
    def one_pass(self) -> bool:
        """Whether ColBERT's query tokens are projected from the pass of the query encoder that
        serves the first stage (:meth:`colbert_query_source`, :meth:`query_token_map`) rather
        than encoded by ColBERT's query encoder: a build with both students serves them so
        (one transformer pass a query)."""
        kinds = self.cfg.students.kinds
        return self.served_dense == "asymmetric" and "colbert" in kinds

    def colbert_query_source(self, stage: str) -> str:
        """The graph whose pass gives ColBERT's query tokens when it reranks first stage
        ``stage``, as the artifact serves it: ``"colbert"`` (its own query encoder) unless
        :attr:`one_pass`; then the hybrid head's (:data:`HYBRID_HEAD`) after the hybrid where
        the head serves it, else the asymmetric student's."""
        if not self.one_pass:
            return "colbert"
        return HYBRID_HEAD if stage == "hybrid" and self.hybrid_head() is not None else "asymmetric"

    def query_token_map(self, source: str = "asymmetric") -> dict[str, Any]:
        """The map from query encoder ``source``'s token states (the asymmetric student's or
        the hybrid head's) to ColBERT's query tokens
        (:func:`index_build.asymmetric.fit_query_token_map`), fitted on the training queries
        (pseudo-queries on a label-free build; at most :data:`TOKEN_MAP_QUERIES`):
        ``{"map": [hidden, dim], "fit_queries", "token_cosine"}``. Computed once per build
        and exported models (seconds: queries only)."""
        memo = ("query-token-map", self.export_key(source), self.export_key("colbert"))
        if memo not in self.tuning:
            from index_build.asymmetric import fit_query_token_map
            from models.encoders import ColbertEncoder

            texts = list(dict.fromkeys(ex.query for ex in self.load_mined()["examples"]))[:TOKEN_MAP_QUERIES]
            colbert = self.student_encoder(ColbertEncoder, "colbert")
            w, cos = fit_query_token_map(self.query_token_states(texts, source=source), colbert.encode_queries(texts))
            self.tuning[memo] = {"map": w, "fit_queries": len(texts), "token_cosine": round(cos, 4)}
        return self.tuning[memo]

    def query_token_states(self, texts: list[str], onnx_file: str = ONNX_NAME,
                           source: str = "asymmetric") -> list[np.ndarray]:
        """Per query, query encoder ``source``'s last-layer states of its real tokens."""
        from models.encoders import DenseEncoder

        enc = self.student_encoder(DenseEncoder, source, onnx_file)
        out: list[np.ndarray] = []
        for start in range(0, len(texts), 128):
            _, states, mask = enc.encode_queries_with_states(texts[start : start + 128])
            out.extend(h[: int(n)] for h, n in zip(states, mask.sum(1)))
        return out

    def colbert_query_tokens(self, texts: list[str], source: str, onnx_file: str = ONNX_NAME) -> list[np.ndarray]:
        """ColBERT's query tokens per query from ``source``: ``"colbert"``, ColBERT's query
        encoder (graph ``onnx_file``), else projected from that query encoder's pass
        (:meth:`query_token_map`, its graph ``onnx_file``)."""
        from models.encoders import ColbertEncoder, project_query_tokens

        if source == "colbert":
            return list(self.student_encoder(ColbertEncoder, "colbert", onnx_file).encode_queries(texts))
        w = self.query_token_map(source)["map"]
        return [project_query_tokens(h, np.ones(len(h)), w)
                for h in self.query_token_states(texts, onnx_file, source=source)]

    def colbert_scores(self, texts: list[str], lists: Sequence[tuple[np.ndarray, np.ndarray]],
                       onnx_file: str = ONNX_NAME, query_onnx_file: str | None = None,
                       source: str | None = None) -> list[np.ndarray]:
        """MaxSim of the ColBERT student over each query's candidates (``lists`` as from
        :meth:`first_stage_lists`): the corpus encoded with ``onnx_file``; the query tokens
        from ``source`` (default: after the dense first stage as served,
        :meth:`colbert_query_source`): ``"colbert"``, ColBERT's query encoder, else projected
        from that query encoder's pass (:meth:`query_token_map`); either graph
        ``query_onnx_file`` (default: ``onnx_file``)."""
        from models.encoders import maxsim

        toks = self.colbert_corpus(onnx_file, subset=np.concatenate([c for c, _ in lists] + [np.zeros(0, np.int64)]))
        qv = self.colbert_query_tokens(texts, source or self.colbert_query_source("dense"),
                                       query_onnx_file or onnx_file)
        out = []
        for r, (cands, _) in enumerate(lists):
            offsets = np.cumsum([0] + [len(toks[int(j)]) for j in cands])
            tokens = (np.concatenate([toks[int(j)] for j in cands]) if len(cands)
                      else np.zeros((0, qv[r].shape[-1]), np.float32))
            out.append(maxsim(qv[r], tokens, offsets))
        return out

    def first_stage_lists(self, texts: list[str], dense_queries: np.ndarray, hybrid_weight: float,
                          depth: int, kind: str | None = None,
                          stages: Sequence[str] = FIRST_STAGES, by_parts: bool = True,
                          hybrid_queries: np.ndarray | None = None) -> dict[str, list[Ranked]]:
        """Per first stage (``dense``: exact search over dense model ``kind``'s corpus vectors,
        default :attr:`served_dense`; ``sparse``: BM25; ``hybrid``: their z-score fusion, per
        part of the teacher's space for the asymmetric student, :attr:`teacher_fusion`), each
        query's top-``depth``, ranked by the service's own first stages
        (:func:`models.retrieval.first_stages`). ``by_parts=False``: the asymmetric
        student's hybrid fuses its dense list with BM25's, as the full-tower student's.
        ``hybrid_queries``: the hybrid's own query vectors (:meth:`hybrid_queries`), as the
        service encodes a hybrid request with the hybrid head."""
        corpus = self.corpus_vectors(kind)
        parts = self.teacher_fusion["parts"] if by_parts and (kind or self.served_dense) == "asymmetric" else None

        def lists(wanted: Sequence[str], queries: np.ndarray) -> dict[str, list[Ranked]]:
            return first_stages(wanted, texts, depth, dense_vectors=queries,
                                dense_search=lambda q, k: exact_search(corpus, q, k), sparse=self.bm25,
                                hybrid_weights=(hybrid_weight, 1.0 - hybrid_weight),
                                dense_parts=parts, doc_vectors=lambda ids: corpus[ids])

        if hybrid_queries is None or "hybrid" not in stages:
            return lists(stages, dense_queries)
        rest = [s for s in stages if s != "hybrid"]
        return {**(lists(rest, dense_queries) if rest else {}), **lists(["hybrid"], hybrid_queries)}

    def run_of(self, qids: list[str], lists: Sequence[tuple[np.ndarray, np.ndarray]],
               rerank: list[np.ndarray] | None = None, rerank_weight: float = 1.0) -> dict[str, dict[str, float]]:
        """A run from first-stage lists, optionally reranked as the service reranks
        (:func:`models.retrieval.rerank_order`)."""
        doc_ids = self.collection.doc_ids
        run = {}
        for r, qid in enumerate(qids):
            cands, first = lists[r]
            final = first if rerank is None else rerank_order(first, rerank[r], rerank_weight)[0]
            run[qid] = {doc_ids[int(j)]: float(x) for j, x in zip(cands, final)}
        return run

    def dense_metrics(self, qids: list[str], queries: list[str], qrels, depth: int = 100) -> dict[str, float]:
        """Exact full-corpus search with the exported dense graph (corpus encodings cached)."""
        from models.encoders import DenseEncoder

        q = self.student_encoder(DenseEncoder, "dense").encode_queries(queries)
        s, i = exact_search(self.dense_corpus(), q, depth)
        return metrics(qrels, run_from_arrays(qids, self.collection.doc_ids, s, i))
