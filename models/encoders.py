"""ONNX Runtime inference for the exported students (torch-free).

An exported model directory holds ``model.onnx``, ``tokenizer.json`` and ``encoder.json``
(:class:`EncoderConfig`). The graphs take ``input_ids``, ``attention_mask``,
``token_type_ids`` and return:

- dense: ``embeddings [batch, dim]`` (pooled, L2-normalized when ``similarity == "cos"``);
  an asymmetric query encoder's graph also ``token_states [batch, length, hidden]``, the
  last-layer states the embedding was pooled from (:func:`project_query_tokens`)
- colbert: ``token_embeddings [batch, length, dim]`` (projected and L2-normalized)
- cross-encoder: ``scores [batch]`` (relevance logits)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from models.tokenization import Batch, TextTokenizer

Kind = Literal["dense", "colbert", "cross-encoder"]
CONFIG_NAME = "encoder.json"
ONNX_NAME = "model.onnx"
TOKENIZER_NAME = "tokenizer.json"
#: the second output of a dense graph that has one: its last-layer token states
TOKEN_STATES = "token_states"
#: an artifact's map from the dense query encoder's token states to ColBERT's query tokens
#: (``[hidden, dim]`` float32, beside the ColBERT model: :func:`project_query_tokens`)
QUERY_TOKEN_MAP = "query_token_map.npy"
#: the same from the hybrid first stage's own query encoder (an artifact's ``hybrid`` model)
HYBRID_QUERY_TOKEN_MAP = "hybrid_query_token_map.npy"
#: per query model whose pass ColBERT's query tokens are projected from: the manifest entry
#: under ``models.colbert`` that describes its map, and the map's default file name
QUERY_TOKEN_MAPS = {"dense": ("query_token_map", QUERY_TOKEN_MAP),
                    "hybrid": ("hybrid_query_token_map", HYBRID_QUERY_TOKEN_MAP)}
QUERY_CHUNK = 256  # queries per ONNX run in encode_queries
QUERY_BATCH = 64  # length-sorted queries per ONNX run when a dense encoder encodes many
#: documents (or query-document pairs) per ONNX run on the document side: small batches pad
#: less and stay in cache on CPU (the sizes compared: benchmarks/results/onnx-batch.md).
DOC_BATCH = 8


@dataclass
class EncoderConfig:
    kind: Kind
    max_query_len: int = 64
    max_doc_len: int = 256
    pooling: Literal["mean", "cls"] = "mean"
    similarity: Literal["cos", "dot"] = "cos"
    dim: int = 384
    colbert_query_len: int = 32
    base_model: str = ""
    extra: dict = field(default_factory=dict)

    def save(self, directory: Path) -> None:
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: Path) -> EncoderConfig:
        path = directory / CONFIG_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: encoder config missing") from None
        return cls(**data)


def make_session(path: Path, threads: int = 0, providers: list[str] | None = None):
    """An ONNX Runtime session with explicit thread settings (0 = library default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    available = ort.get_available_providers()
    chosen = [p for p in (providers or ["CPUExecutionProvider"]) if p in available] or ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), sess_options=opts, providers=chosen)


def length_sorted_batches(lengths: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Indices in batches of similar length (longest first), to waste little padding."""
    order = np.argsort(-lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


class OnnxEncoder:
    """Base: loads the graph, tokenizer and config from one exported directory."""

    kind: Kind

    def __init__(
        self,
        directory: str | Path,
        *,
        onnx_file: str = ONNX_NAME,
        threads: int = 0,
        providers: list[str] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.config = EncoderConfig.load(self.directory)
        if self.config.kind != self.kind:
            raise ValueError(f"{self.directory}: expected a {self.kind} model, found {self.config.kind}")
        self.tokenizer = TextTokenizer.from_file(self.directory / TOKENIZER_NAME)
        self.session = make_session(self.directory / onnx_file, threads=threads, providers=providers)
        self._input_names = {i.name for i in self.session.get_inputs()}
        self._outputs = [o.name for o in self.session.get_outputs()]
        #: how progress bars name this model: its base checkpoint, role and graph
        base = Path(self.config.base_model or self.directory)
        self.label = f"{base.parent.name if base.name in ('model', 'hf') else base.name} ({self.kind}, {onnx_file})"

    def _run(self, batch: Batch) -> np.ndarray:
        feed = {k: v for k, v in batch.as_dict().items() if k in self._input_names}
        return self.session.run(self._outputs[:1], feed)[0]

    def _encode_chunked(self, texts: list[str], encode: Callable[[list[str]], Batch]) -> np.ndarray:
        """Run ``encode(chunk)`` for chunks of :data:`QUERY_CHUNK` texts, so that encoding many
        queries at once (offline: calibration, Distill-VQ) never holds one giant batch."""
        if len(texts) <= QUERY_CHUNK:
            return self._run(encode(texts)).astype(np.float32, copy=False)
        return np.concatenate([self._run(encode(texts[i : i + QUERY_CHUNK])).astype(np.float32, copy=False)
                               for i in range(0, len(texts), QUERY_CHUNK)])


class DenseEncoder(OnnxEncoder):
    kind: Kind = "dense"

    @property
    def dim(self) -> int:
        return self.config.dim

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        """Query embeddings; many queries run in length-sorted batches of :data:`QUERY_BATCH`
        (pseudo-queries of 5 to 64 word pieces padded to their batch's longest cost 2.3x the
        compute of sorted ones)."""
        max_len = self.config.max_query_len
        if len(texts) <= QUERY_BATCH:
            return self._run(self.tokenizer.encode(texts, max_len)).astype(np.float32, copy=False)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        lengths = np.minimum(self.tokenizer.token_lengths(texts), max_len)
        for idx in length_sorted_batches(lengths, QUERY_BATCH):
            out[idx] = self._run(self.tokenizer.encode([texts[i] for i in idx], max_len))
        return out

    @property
    def has_token_states(self) -> bool:
        """Whether the graph also outputs its token states (an asymmetric query encoder's does)."""
        return TOKEN_STATES in self._outputs

    def encode_queries_with_states(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One pass over ``texts`` (one batch): the embeddings ``[n, dim]``, the token states
        ``[n, length, hidden]`` and the attention mask ``[n, length]``."""
        if not self.has_token_states:
            raise ValueError(f"{self.directory}: the graph has no {TOKEN_STATES} output")
        batch = self.tokenizer.encode(texts, self.config.max_query_len)
        feed = {k: v for k, v in batch.as_dict().items() if k in self._input_names}
        emb, states = self.session.run([self._outputs[0], TOKEN_STATES], feed)
        return (np.asarray(emb, dtype=np.float32), np.asarray(states, dtype=np.float32),
                np.asarray(batch.attention_mask))

    def encode_docs(self, texts: list[str], batch_size: int = DOC_BATCH, progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        lengths = self.tokenizer.token_lengths(texts)
        batches = list(length_sorted_batches(lengths, batch_size))
        for idx in _maybe_tqdm(batches, progress, f"encode documents: {self.label}"):
            out[idx] = self._run(self.tokenizer.encode([texts[i] for i in idx], self.config.max_doc_len))
        return out


class ColbertEncoder(OnnxEncoder):
    kind: Kind = "colbert"

    @property
    def dim(self) -> int:
        return self.config.dim

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        """``[n, query_len, dim]`` float32, including the [MASK] augmentation tokens."""
        return self._encode_chunked(
            texts, lambda chunk: self.tokenizer.encode_colbert_queries(chunk, self.config.colbert_query_len))

    def encode_docs(self, texts: list[str], batch_size: int = DOC_BATCH, progress: bool = False) -> list[np.ndarray]:
        """One ``[n_tokens_i, dim]`` float32 array per document, skiplist applied."""
        out: list[np.ndarray] = [np.zeros((0, self.dim), np.float32)] * len(texts)
        lengths = self.tokenizer.token_lengths(texts)
        for idx in _maybe_tqdm(list(length_sorted_batches(lengths, batch_size)), progress,
                               f"encode documents: {self.label}"):
            batch = self.tokenizer.encode_colbert_docs([texts[i] for i in idx], self.config.max_doc_len)
            vecs = self._run(batch)
            keep = self.tokenizer.colbert_doc_keep_mask(batch)
            for row, i in enumerate(idx):
                out[i] = np.ascontiguousarray(vecs[row][keep[row]], dtype=np.float32)
        return out


class CrossEncoderScorer(OnnxEncoder):
    """Scores (query, document) pairs; ``max_len`` caps the pair's word pieces below the
    length the model was trained at (``config.max_doc_len``): the cost on CPU is about
    linear in it."""

    kind: Kind = "cross-encoder"

    def __init__(self, directory: str | Path, *, max_len: int | None = None, **kwargs: Any) -> None:
        super().__init__(directory, **kwargs)
        self.max_len = min(max_len, self.config.max_doc_len) if max_len else self.config.max_doc_len

    def score(self, query: str, docs: list[str], batch_size: int = DOC_BATCH) -> np.ndarray:
        return self.score_pairs([query] * len(docs), docs, batch_size=batch_size)

    def score_pairs(self, queries: list[str], docs: list[str], batch_size: int = DOC_BATCH) -> np.ndarray:
        out = np.zeros(len(docs), dtype=np.float32)
        lengths = self.tokenizer.token_lengths(docs)
        for idx in length_sorted_batches(lengths, batch_size):
            batch = self.tokenizer.encode_pairs(
                [queries[i] for i in idx], [docs[i] for i in idx], self.max_len, self.config.max_query_len
            )
            out[idx] = self._run(batch).reshape(-1)
        return out


def project_query_tokens(states: np.ndarray, mask: np.ndarray, token_map: np.ndarray) -> np.ndarray:
    """ColBERT query tokens ``[n, length, dim]`` from a dense query encoder's token states
    (``[n, length, hidden]``, as :meth:`DenseEncoder.encode_queries_with_states` gives them):
    each real token's state through ``token_map`` (``[hidden, dim]``), L2-normalized; padding
    rows are zero, which adds nothing to a MaxSim score."""
    tokens = np.asarray(states, dtype=np.float32) @ np.asarray(token_map, dtype=np.float32)
    tokens /= np.maximum(np.linalg.norm(tokens, axis=-1, keepdims=True), 1e-12)
    tokens *= np.asarray(mask, dtype=np.float32)[..., None]
    return tokens


def maxsim(query: np.ndarray, doc_tokens: np.ndarray, doc_offsets: np.ndarray,
           token_scale: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """ColBERT MaxSim of one query against several documents stored back to back.

    ``query`` is ``[Lq, dim]``; ``doc_tokens`` is ``[T, dim]`` with document ``i`` in rows
    ``doc_offsets[i]:doc_offsets[i+1]``. Returns ``[n_docs]`` scores: for each query token
    the best dot product over the document's tokens, summed over query tokens.
    ``token_scale`` (``[T]``) multiplies each document token's similarities first, e.g. the
    inverse norms of tokens that were decoded without normalizing them. ``out`` (float32
    ``[Lq, T]``, C-contiguous) receives the similarities instead of a new array.

    >>> q = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    >>> d = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], np.float32)
    >>> [round(float(x), 3) for x in maxsim(q, d, np.array([0, 2, 3]))]
    [1.8, 1.0]
    """
    n_docs = len(doc_offsets) - 1
    if n_docs <= 0:
        return np.zeros(0, np.float32)
    # [Lq, T]: each query token's similarities are contiguous, so the per-document max below
    # reduces along memory (several times faster than reducing the [T, Lq] layout)
    sims = np.matmul(np.ascontiguousarray(query, dtype=np.float32), doc_tokens.astype(np.float32, copy=False).T,
                     out=out)
    if token_scale is not None:
        sims *= token_scale[None, :]
    lengths = np.diff(doc_offsets)
    scores = np.zeros((query.shape[0], n_docs), np.float32)
    nonempty = lengths > 0
    if sims.shape[1]:
        scores[:, nonempty] = np.maximum.reduceat(sims, doc_offsets[:-1][nonempty], axis=1)
    return scores.sum(axis=0)


def _maybe_tqdm(items: list, progress: bool, desc: str):
    if not progress:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="batch")
