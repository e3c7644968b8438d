"""The hybrid over a dense space of parts (an asymmetric student's teacher space): every
candidate of either list is scored by BM25 and by each part, and their z-scores are summed
at the parts' weights within the dense weight."""

from __future__ import annotations

import numpy as np
import pytest

from models.fusion import normalize
from models.retrieval import DenseParts, Ranked, first_stages, fuse_parts, fuse_signals


class FakeBM25:
    def __init__(self, scores: np.ndarray) -> None:
        self._scores = np.asarray(scores, np.float32)

    def scores(self, query: str) -> np.ndarray:
        return self._scores

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(-self._scores, kind="stable")[:k]
        order = order[self._scores[order] > 0]
        return self._scores[order][None], order[None]


def test_dense_parts_split_and_validate():
    parts = DenseParts.from_dims([2, 3], [1.0, 3.0])
    assert parts.bounds == (0, 2, 5) and parts.weights == (0.25, 0.75) and parts.dim == 5
    with pytest.raises(ValueError, match="bounds"):
        DenseParts((1, 3), (1.0,))
    with pytest.raises(ValueError, match="weights"):
        DenseParts((0, 2, 4), (0.0, 0.0))


def test_fuse_parts_against_a_hand_computation():
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((6, 4)).astype(np.float32)
    query = rng.standard_normal(4).astype(np.float32)
    bm25 = np.array([0.0, 3.0, 0.0, 1.0, 2.0, 0.0], np.float32)
    parts = DenseParts.from_dims([1, 3], [1.0, 1.0])
    dense = Ranked(np.array([0, 2]), np.array([0.9, 0.5]))  # doc 3 and 4 reach it through BM25 only
    sparse = Ranked(np.array([1, 4, 3]), np.array([3.0, 2.0, 1.0]))
    got = fuse_parts(dense, sparse, bm25, query, lambda ids: docs[ids], parts, (0.6, 0.4), depth=4)
    cands = np.array([0, 1, 2, 3, 4])
    by_hand = (0.3 * normalize(docs[cands, :1] @ query[:1]) + 0.3 * normalize(docs[cands, 1:] @ query[1:])
               + 0.4 * normalize(bm25[cands]))
    order = np.argsort(-by_hand, kind="stable")[:4]
    assert got.indices.tolist() == cands[order].tolist()
    np.testing.assert_allclose(got.scores, by_hand[order], rtol=1e-6)


def test_fuse_signals_breaks_ties_by_corpus_index():
    got = fuse_signals(np.array([9, 3, 5]), [np.array([1.0, 1.0, 1.0])], [1.0], 3)
    assert got.indices.tolist() == [3, 5, 9]


def test_first_stages_fuse_the_parts_only_in_the_hybrid():
    rng = np.random.default_rng(1)
    docs = rng.standard_normal((8, 4)).astype(np.float32)
    queries = rng.standard_normal((1, 4)).astype(np.float32)
    bm25 = FakeBM25(np.array([0, 4, 0, 1, 0, 2, 0, 0], np.float32))
    parts = DenseParts.from_dims([2, 2], [1.0, 1.0])

    def dense_search(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        s = q @ docs.T
        i = np.argsort(-s, axis=1)[:, :k]
        return np.take_along_axis(s, i, 1), i

    kwargs = dict(dense_vectors=queries, dense_search=dense_search, sparse=bm25, hybrid_weights=(0.5, 0.5))
    with_parts = first_stages(["dense", "sparse", "hybrid"], ["q"], 3, dense_parts=parts,
                              doc_vectors=lambda ids: docs[ids], **kwargs)
    plain = first_stages(["dense", "sparse", "hybrid"], ["q"], 3, **kwargs)
    for stage in ("dense", "sparse"):
        assert with_parts[stage][0].indices.tolist() == plain[stage][0].indices.tolist()
    expected = fuse_parts(plain["dense"][0], plain["sparse"][0], bm25.scores("q"), queries[0],
                          lambda ids: docs[ids], parts, (0.5, 0.5), 3)
    assert with_parts["hybrid"][0].indices.tolist() == expected.indices.tolist()
    with pytest.raises(ValueError, match="document vectors"):
        first_stages(["hybrid"], ["q"], 3, dense_parts=parts, **kwargs)
