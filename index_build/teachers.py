"""Teachers: pluggable scorers of (query, document) pairs.

- :class:`BM25Teacher` (``bm25s``)
- :class:`BiEncoderTeacher` (any sentence-embedding checkpoint, run through our ONNX export)
- :class:`CrossEncoderTeacher` (any HF sequence-classification checkpoint, torch)
- :class:`EnsembleTeacher`: normalizes each member's scores per query over the candidate
  list and sums them with weights (as the dense + sparse teacher aggregation of
  "Towards Competitive Search Relevance for Inference-Free Learned Sparse Retrievers").

Every teacher scores a list of queries, each against its own candidate list of corpus
indices: ``score(queries, candidates) -> list[np.ndarray]`` (raw scores, one array per
query). Scores are cached on disk keyed by content (model fingerprint, query text,
candidate ids), so reruns only compute what is new.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Protocol

import numpy as np

from index_build.cache import ArrayCache, content_key
from models.dense_index import exact_search
from models.encoders import DOC_BATCH, QUERY_CHUNK
from models.fusion import Norm, normalize
from models.sparse_index import BM25Config, BM25Index


class Teacher(Protocol):
    name: str

    def fingerprint(self) -> str: ...

    def score(self, queries: Sequence[str], candidates: Sequence[np.ndarray]) -> list[np.ndarray]: ...


class Retriever(Protocol):
    def retrieve(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]: ...


class BM25Teacher:
    def __init__(self, corpus_texts: list[str], corpus_checksum: str, config: BM25Config | None = None,
                 index: BM25Index | None = None) -> None:
        self.config = config or BM25Config()
        self.index = index or BM25Index.build(corpus_texts, self.config)
        self._fp = content_key("bm25", repr(self.config), corpus_checksum)[:16]
        self.name = "bm25"

    def fingerprint(self) -> str:
        return self._fp

    def score(self, queries: Sequence[str], candidates: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [self.index.scores(q)[np.asarray(c, dtype=np.int64)] for q, c in zip(queries, candidates)]

    def retrieve(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(list(queries), k)


BI_ENCODER_MAX_DOC_LEN = 256  # document tokens a bi-encoder teacher member reads
#: how an int8 bi-encoder member's graph scales activations: one scale per token, so its
#: vectors do not depend on batch-mates (benchmarks/results/int8-fidelity.md: cosine 1.0 alone
#: vs batched, closer to fp32 than per-tensor scales, about 8% slower on documents)
TEACHER_INT8_ACTIVATIONS = "token"


class BiEncoderTeacher:
    """A sentence-embedding model run through ONNX; each document is encoded on first use and
    cached by content."""

    def __init__(self, model_ref: str, corpus_texts: list[str], cache: ArrayCache, *,
                 max_doc_len: int = BI_ENCODER_MAX_DOC_LEN, int8: bool = False,
                 threads: int = 0, progress: bool = True, name: str | None = None) -> None:
        from index_build.export import INT8_NAME, INT8_WEIGHTS_MARK, ONNX_NAME, OUTLIER_RATIO, base_dense_onnx

        self.model_ref = model_ref
        # an int8 member scales each token's activations on its own, so a document's or query's
        # vector does not depend on what it was batched with (nor on which vectors a cache
        # already held when it was encoded): a build's teacher is the same from any cache
        self.onnx_dir, model_fp = base_dense_onnx(model_ref, max_doc_len=max_doc_len,
                                                  activations=TEACHER_INT8_ACTIVATIONS if int8 else "tensor")
        from models.encoders import DenseEncoder

        # int8: the dynamically quantized graph, per channel (several times faster on CPU for a
        # large teacher's corpus pass; benchmarks/results/int8-fidelity.md)
        self.encoder = DenseEncoder(self.onnx_dir, onnx_file=INT8_NAME if int8 else ONNX_NAME, threads=threads)
        int8_marks = ["int8-per-channel", f"outliers-fp32-{OUTLIER_RATIO:g}", INT8_WEIGHTS_MARK,
                      f"activations-{TEACHER_INT8_ACTIVATIONS}"] if int8 else []
        self._fp = content_key("bi-encoder", model_fp, str(max_doc_len), *int8_marks)[:16]
        self.name = name or f"bi-encoder:{model_ref}"
        self.corpus_texts, self.cache, self.progress = corpus_texts, cache, progress
        # documents are encoded when first needed: scoring candidate lists touches only those
        # documents (e.g. the top-100 of a rerank run), retrieval the whole corpus
        self._emb = np.zeros((len(corpus_texts), self.encoder.dim), np.float32)
        self._have = np.zeros(len(corpus_texts), bool)
        self._queries: dict[str, np.ndarray] = {}

    def fingerprint(self) -> str:
        return self._fp

    def embeddings(self, idx: np.ndarray) -> np.ndarray:
        """Embeddings of the documents at ``idx`` (encoded and cached on first use)."""
        idx = np.asarray(idx, dtype=np.int64)
        todo = np.unique(idx[~self._have[idx]])
        if len(todo):
            self._emb[todo] = encode_corpus_cached(self.encoder, [self.corpus_texts[i] for i in todo], self.cache,
                                                   self._fp, progress=self.progress and len(todo) > 1000)
            self._have[todo] = True
        return self._emb[idx]

    @property
    def doc_embeddings(self) -> np.ndarray:
        """All corpus embeddings, ``[n_docs, dim]``."""
        if not self._have.all():
            self.embeddings(np.arange(len(self._have)))
        return self._emb

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        """Query embeddings, each distinct query encoded once and cached by content like the
        documents (the base model embeds the same training queries for mining and again as a
        teacher member; an asymmetric student's tens of thousands of training queries are
        embedded by every member)."""
        from tqdm import tqdm

        todo = list(dict.fromkeys(q for q in queries if q not in self._queries))
        keys = {q: content_key(self._fp, "query", q) for q in todo}
        found = self.cache.get_many(list(keys.values()))
        self._queries.update((q, found[k]) for q, k in keys.items() if k in found)
        todo = [q for q in todo if keys[q] not in found]
        bar = tqdm(total=len(todo), desc=f"{self.name}: encode queries", unit="query",
                   disable=not self.progress or len(todo) <= QUERY_CHUNK)
        for start in range(0, len(todo), QUERY_CHUNK):
            part = todo[start : start + QUERY_CHUNK]
            vecs = np.asarray(self.encoder.encode_queries(part), dtype=np.float32)
            self._queries.update(zip(part, vecs))
            self.cache.put_many([(keys[q], v) for q, v in zip(part, vecs)])
            bar.update(len(part))
        bar.close()
        if not queries:
            return np.zeros((0, self.encoder.dim), np.float32)
        return np.stack([self._queries[q] for q in queries])

    def score(self, queries: Sequence[str], candidates: Sequence[np.ndarray]) -> list[np.ndarray]:
        q = self.encode_queries(queries)
        self.embeddings(np.concatenate([np.zeros(0, np.int64), *(np.asarray(c, np.int64) for c in candidates)]))
        return [self._emb[np.asarray(c, dtype=np.int64)] @ q[i] for i, c in enumerate(candidates)]

    def retrieve(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        q = self.encode_queries(queries)
        return exact_search(self.doc_embeddings, q, k)


class CrossEncoderTeacher:
    """Any Hugging Face sequence-classification checkpoint scoring ``(query, doc)`` pairs."""

    def __init__(self, model_ref: str, corpus_texts: list[str], cache: ArrayCache, *, max_len: int = 512,
                 batch_size: int = 32, name: str | None = None) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from models.sources import fingerprint, resolve_model

        path = resolve_model(model_ref)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
        self.corpus_texts = corpus_texts
        self.cache = cache
        self.max_len = max_len
        self.batch_size = batch_size
        self._fp = content_key("cross-encoder", fingerprint(path), str(max_len))[:16]
        self.name = name or f"cross-encoder:{model_ref}"
        self._torch = torch

    def fingerprint(self) -> str:
        return self._fp

    def _score_pairs(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        torch = self._torch
        out = []
        with torch.inference_mode():
            for i in range(0, len(pairs), self.batch_size):
                chunk = pairs[i : i + self.batch_size]
                enc = self.tokenizer([p[0] for p in chunk], [p[1] for p in chunk], truncation="only_second",
                                     max_length=self.max_len, padding=True, return_tensors="pt")
                logits = self.model(**enc).logits
                # one logit: relevance; two or more: log-odds of the last ("relevant") class
                s = logits[:, 0] if logits.shape[-1] == 1 else logits[:, -1] - logits[:, 0]
                out.append(s.float().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def score(self, queries: Sequence[str], candidates: Sequence[np.ndarray]) -> list[np.ndarray]:
        keys = [[content_key(self._fp, q, self.corpus_texts[int(d)]) for d in c] for q, c in zip(queries, candidates)]
        flat = [k for ks in keys for k in ks]
        cached = self.cache.get_many(flat)
        todo = [(qi, j) for qi, ks in enumerate(keys) for j, k in enumerate(ks) if k not in cached]
        if todo:
            pairs = [(queries[qi], self.corpus_texts[int(candidates[qi][j])]) for qi, j in todo]
            scores = self._score_pairs(pairs)
            new = {keys[qi][j]: np.array(s, np.float32) for (qi, j), s in zip(todo, scores)}
            self.cache.put_many(new.items())
            cached.update(new)
        return [np.array([float(cached[k]) for k in ks], np.float32) for ks in keys]


@dataclass
class EnsembleTeacher:
    """Per-query normalized, weighted sum of member scores over each candidate list."""

    members: list[Teacher]
    weights: list[float] = field(default_factory=list)
    norm: Norm = "zscore"
    name: str = "ensemble"

    def __post_init__(self) -> None:
        if not self.weights:
            self.weights = [1.0] * len(self.members)
        if len(self.weights) != len(self.members):
            raise ValueError(f"ensemble: {len(self.members)} members but {len(self.weights)} weights")

    def fingerprint(self) -> str:
        parts = [m.fingerprint() for m in self.members] + [repr(self.weights), self.norm]
        return content_key("ensemble", *parts)[:16]

    def score(self, queries: Sequence[str], candidates: Sequence[np.ndarray]) -> list[np.ndarray]:
        per_member = [m.score(queries, candidates) for m in self.members]
        out = []
        for i in range(len(queries)):
            total = np.zeros(len(candidates[i]), np.float64)
            for w, scores in zip(self.weights, per_member):
                total += w * normalize(scores[i], self.norm)
            out.append(total.astype(np.float32))
        return out


def cached_teacher_scores(teacher: Teacher, cache: ArrayCache, queries: Sequence[str],
                          candidates: Sequence[np.ndarray], batch_size: int = 64,
                          progress: bool = True) -> list[np.ndarray]:
    """Teacher scores per (query, candidate list), computed once and cached by content."""
    from tqdm import tqdm

    fp = teacher.fingerprint()
    keys = [content_key(fp, q, np.asarray(c, np.int64).tobytes()) for q, c in zip(queries, candidates)]
    found = cache.get_many(keys)
    # similar lengths together: a bi-encoder member pads each batch of queries to its longest
    todo = sorted((i for i, k in enumerate(keys) if k not in found), key=lambda i: len(queries[i]))
    bar = tqdm(total=len(todo), desc=f"teacher {teacher.name}", unit="query", disable=not progress or not todo)
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        scores = teacher.score([queries[i] for i in idx], [candidates[i] for i in idx])
        new = [(keys[i], s.astype(np.float32)) for i, s in zip(idx, scores)]
        cache.put_many(new)
        found.update(new)
        bar.update(len(idx))
    bar.close()
    return [found[k] for k in keys]


def encode_corpus_cached(encoder, texts: list[str], cache: ArrayCache, model_fp: str, *,
                         batch_size: int = DOC_BATCH, progress: bool = True) -> np.ndarray:
    """Dense corpus embeddings; each document's vector cached under (model, text)."""
    keys = [content_key(model_fp, t) for t in texts]
    found = cache.get_many(keys)
    todo = [i for i, k in enumerate(keys) if k not in found]
    if todo:
        chunk = 1024
        for start in range(0, len(todo), chunk):
            idx = todo[start : start + chunk]
            vecs = encoder.encode_docs([texts[i] for i in idx], batch_size=batch_size, progress=progress)
            new = [(keys[i], v) for i, v in zip(idx, vecs)]
            cache.put_many(new)
            found.update(new)
    return np.stack([found[k] for k in keys]).astype(np.float32)


@dataclass
class TeacherSpec:
    """Config of a teacher: ``kind`` in bm25 | bi-encoder | cross-encoder | ensemble."""

    kind: str = "ensemble"
    model: str = ""
    weight: float = 1.0
    int8: bool = False           # bi-encoder: run the int8-quantized ONNX graph
    members: list[TeacherSpec] = field(default_factory=list)
    norm: str = "zscore"

    @classmethod
    def from_dict(cls, d: dict) -> TeacherSpec:
        members = [cls.from_dict(m) for m in d.get("members", [])]
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"teacher: unknown key(s) {', '.join(sorted(unknown))}")
        return cls(kind=d.get("kind", "ensemble"), model=d.get("model", ""), weight=float(d.get("weight", 1.0)),
                   int8=bool(d.get("int8", False)), members=members, norm=d.get("norm", "zscore"))


def build_teacher(spec: TeacherSpec, corpus_texts: list[str], corpus_checksum: str, cache: ArrayCache, *,
                  bm25: BM25Index | None = None, threads: int = 0,
                  prebuilt: dict[str, Teacher] | None = None) -> Teacher:
    """``prebuilt`` maps a bi-encoder model reference to an already-built teacher to reuse
    (the pipeline's base dense model), so its corpus embeddings are not loaded twice."""
    if spec.kind == "bi-encoder" and prebuilt and spec.model in prebuilt and not spec.int8:
        return prebuilt[spec.model]
    if spec.kind == "bm25":
        return BM25Teacher(corpus_texts, corpus_checksum, index=bm25)
    if spec.kind == "bi-encoder":
        return BiEncoderTeacher(spec.model, corpus_texts, cache, int8=spec.int8, threads=threads,
                                name=f"bi-encoder:{spec.model}")
    if spec.kind == "cross-encoder":
        return CrossEncoderTeacher(spec.model, corpus_texts, cache)
    if spec.kind == "ensemble":
        if not spec.members:
            raise ValueError("ensemble teacher needs at least one member")
        members = [build_teacher(m, corpus_texts, corpus_checksum, cache, bm25=bm25, threads=threads,
                                 prebuilt=prebuilt) for m in spec.members]
        names = "+".join(m.name.split(":")[-1] for m in members)
        return EnsembleTeacher(members, [m.weight for m in spec.members], spec.norm,  # type: ignore[arg-type]
                               name=f"ensemble({names})")
    raise ValueError(f"unknown teacher kind {spec.kind!r}; choose bm25, bi-encoder, cross-encoder, ensemble")


def default_teacher_spec() -> TeacherSpec:
    """BM25 + all-MiniLM-L6-v2, z-score fused with equal weights (the best offline teacher
    that is cheap enough to run here; add ``packaged:mpnet`` for the three-member one)."""
    return TeacherSpec(kind="ensemble", members=[TeacherSpec(kind="bm25"),
                                                  TeacherSpec(kind="bi-encoder", model="packaged:minilm")])


