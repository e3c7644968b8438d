"""BM25 over the corpus with ``bm25s`` (Lucene variant): a teacher member, the negative
miner and the sparse half of the hybrid first stage.

Defaults follow the reference figure in ``../shared/data/README.md``: k1 0.9, b 0.4,
English stopwords, no stemming.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

CONFIG_NAME = "bm25.json"


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of one query's scores over the corpus that are above 0 (documents
    sharing no term score 0): ``(scores, doc indices)``, best first, ties by index.

    >>> top_k(np.array([0.0, 2.0, 1.0, 2.0]), 3)
    (array([2., 2., 1.]), array([1, 3, 2]))
    """
    k = min(k, len(scores))
    if k <= 0:
        return scores[:0], np.zeros(0, np.int64)
    top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    top = top[np.lexsort((top, -scores[top]))]
    top = top[scores[top] > 0]
    return scores[top], top.astype(np.int64)


@dataclass
class BM25Config:
    k1: float = 0.9
    b: float = 0.4
    stopwords: str = "en"
    stemmer: str | None = None  # e.g. "english" (needs PyStemmer)


class BM25Index:
    def __init__(self, retriever, config: BM25Config, n_docs: int) -> None:
        self.retriever = retriever
        self.config = config
        self.n_docs = n_docs
        self._stemmer = _make_stemmer(config.stemmer)

    @classmethod
    def build(cls, texts: list[str], config: BM25Config | None = None, progress: bool = False) -> BM25Index:
        import bm25s

        # bm25s sets its own logger to DEBUG, which would put its internals in every build log
        bm25s_log = logging.getLogger("bm25s")
        if bm25s_log.level < logging.INFO:
            bm25s_log.setLevel(logging.INFO)
        config = config or BM25Config()
        stemmer = _make_stemmer(config.stemmer)
        tokens = bm25s.tokenize(texts, stopwords=config.stopwords, stemmer=stemmer, show_progress=progress)
        retriever = bm25s.BM25(k1=config.k1, b=config.b, method="lucene")
        retriever.index(tokens, show_progress=progress)
        return cls(retriever, config, len(texts))

    def _tokenize(self, queries: list[str]) -> list[list[str]]:
        import bm25s

        toks = bm25s.tokenize(
            queries, stopwords=self.config.stopwords, stemmer=self._stemmer, return_ids=False, show_progress=False
        )
        vocab = self.retriever.vocab_dict
        return [[t for t in q if t in vocab] for q in toks]  # type: ignore[union-attr]

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of ``query`` against every document (``[n_docs]`` float32)."""
        toks = self._tokenize([query])[0]
        if not toks:
            return np.zeros(self.n_docs, np.float32)
        return np.asarray(self.retriever.get_scores(toks), dtype=np.float32)

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ``(scores, doc indices)``, each ``[n_queries, k]``; missing slots are -1."""
        k = min(k, self.n_docs)
        out_s = np.zeros((len(queries), k), np.float32)
        out_i = np.full((len(queries), k), -1, np.int64)
        for row, q in enumerate(queries):
            s, top = top_k(self.scores(q), k)
            out_s[row, : len(top)] = s
            out_i[row, : len(top)] = top
        return out_s, out_i

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.retriever.save(str(directory))
        payload = {"config": asdict(self.config), "n_docs": self.n_docs}
        (directory / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path, mmap: bool = True) -> BM25Index:
        import bm25s

        meta = json.loads((directory / CONFIG_NAME).read_text())
        retriever = bm25s.BM25.load(str(directory), mmap=mmap)
        return cls(retriever, BM25Config(**meta["config"]), int(meta["n_docs"]))


def _make_stemmer(name: str | None):
    if not name:
        return None
    import Stemmer  # PyStemmer

    return Stemmer.Stemmer(name)
