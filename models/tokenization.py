"""Tokenization shared by training (torch) and serving (ONNX): one code path, so the
inputs a model was trained on are exactly the inputs it sees online.

All functions return int64 NumPy arrays ``input_ids``, ``attention_mask``,
``token_type_ids`` of shape ``[batch, length]``, padded to the longest row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

# ColBERT marker tokens (as in the ColBERT reference: [unused0] for queries, [unused1] for docs).
Q_MARKER = "[unused0]"
D_MARKER = "[unused1]"
# Documents' punctuation tokens are dropped before storage (ColBERT's skiplist).
PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


@dataclass
class Batch:
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "token_type_ids": self.token_type_ids,
        }

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class TextTokenizer:
    """Wraps a ``tokenizers.Tokenizer`` (``tokenizer.json``) with the project's input layouts."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.tok.no_padding()
        self.tok.no_truncation()
        vocab = self.tok.get_vocab()

        def special(*names: str) -> int:
            for name in names:
                if name in vocab:
                    return vocab[name]
            raise ValueError(f"tokenizer has none of the special tokens {names}")

        self.cls_id = special("[CLS]", "<s>")
        self.sep_id = special("[SEP]", "</s>")
        self.pad_id = special("[PAD]", "<pad>")
        self.mask_id = special("[MASK]", "<mask>")
        self.q_marker_id = vocab.get(Q_MARKER, self.cls_id)
        self.d_marker_id = vocab.get(D_MARKER, self.cls_id)
        self.skip_ids = np.array(
            sorted({vocab[c] for c in PUNCTUATION if c in vocab}), dtype=np.int64
        )

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        return cls(Tokenizer.from_file(str(path)))

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def _pack(self, rows: list[list[int]], type_rows: list[list[int]] | None = None) -> Batch:
        n = len(rows)
        length = max((len(r) for r in rows), default=1)
        ids = np.full((n, length), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, length), dtype=np.int64)
        types = np.zeros((n, length), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
            if type_rows is not None:
                types[i, : len(r)] = type_rows[i]
        return Batch(ids, mask, types)

    def encode(self, texts: list[str], max_len: int) -> Batch:
        """``[CLS] text [SEP]``, truncated to ``max_len`` tokens in all."""
        rows = [[self.cls_id, *ids[: max_len - 2], self.sep_id] for ids in self._ids(texts)]
        return self._pack(rows)

    def encode_pairs(self, queries: list[str], docs: list[str], max_len: int, max_query_len: int = 64) -> Batch:
        """``[CLS] query [SEP] doc [SEP]`` with segment ids, doc truncated to fit ``max_len``."""
        if len(queries) != len(docs):
            raise ValueError(f"encode_pairs: {len(queries)} queries vs {len(docs)} docs")
        q_ids = self._ids(queries)
        d_ids = self._ids(docs)
        rows, types = [], []
        for q, d in zip(q_ids, d_ids):
            q = q[: max_query_len]
            d = d[: max(0, max_len - len(q) - 3)]
            rows.append([self.cls_id, *q, self.sep_id, *d, self.sep_id])
            types.append([0] * (len(q) + 2) + [1] * (len(d) + 1))
        return self._pack(rows, types)

    def encode_colbert_queries(self, texts: list[str], query_len: int) -> Batch:
        """``[CLS] [Q] query [SEP]`` then ``[MASK]`` up to exactly ``query_len`` (query augmentation).

        The mask tokens are not attended to (attention 0) but their output vectors take
        part in MaxSim, as in ColBERT.
        """
        rows = [[self.cls_id, self.q_marker_id, *ids[: query_len - 3], self.sep_id] for ids in self._ids(texts)]
        n = len(rows)
        ids = np.full((n, query_len), self.mask_id, dtype=np.int64)
        mask = np.zeros((n, query_len), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return Batch(ids, mask, np.zeros_like(ids))

    def encode_colbert_docs(self, texts: list[str], max_len: int) -> Batch:
        """``[CLS] [D] doc [SEP]`` truncated to ``max_len``."""
        rows = [[self.cls_id, self.d_marker_id, *ids[: max_len - 3], self.sep_id] for ids in self._ids(texts)]
        return self._pack(rows)

    def colbert_doc_keep_mask(self, batch: Batch) -> np.ndarray:
        """Boolean ``[batch, length]``: real tokens that are not punctuation (the skiplist)."""
        keep = batch.attention_mask.astype(bool)
        if self.skip_ids.size:
            keep &= ~np.isin(batch.input_ids, self.skip_ids)
        return keep

    def token_lengths(self, texts: list[str]) -> np.ndarray:
        return np.array([len(ids) for ids in self._ids(texts)], dtype=np.int64)
