from __future__ import annotations

import numpy as np
import pytest

from index_build.cache import ArrayCache
from index_build.data import load_collection
from index_build.teachers import (
    BiEncoderTeacher,
    BM25Teacher,
    EnsembleTeacher,
    TeacherSpec,
    build_teacher,
    cached_teacher_scores,
)
from models.fusion import fuse_ranked_lists, normalize


class FixedTeacher:
    """Scores a candidate by a fixed table; counts calls so cache reuse can be checked."""

    def __init__(self, name: str, table: dict[int, float]) -> None:
        self.name, self.table, self.calls = name, table, 0

    def fingerprint(self) -> str:
        return f"fixed-{self.name}-{sorted(self.table.items())}"

    def score(self, queries, candidates):
        self.calls += 1
        return [np.array([self.table[int(d)] for d in c], np.float32) for c in candidates]


def test_ensemble_zscore_matches_hand_computation():
    a = FixedTeacher("a", {0: 1.0, 1: 2.0, 2: 3.0})
    b = FixedTeacher("b", {0: 30.0, 1: 10.0, 2: 20.0})
    ens = EnsembleTeacher([a, b], [1.0, 0.5])
    out = ens.score(["q"], [np.array([0, 1, 2])])[0]
    za = np.array([-1.0, 0.0, 1.0]) * np.sqrt(1.5)          # (x - 2) / std([1, 2, 3]) with std = sqrt(2/3)
    zb = np.array([1.0, -1.0, 0.0]) * np.sqrt(1.5)
    np.testing.assert_allclose(out, za + 0.5 * zb, rtol=1e-5)


def test_ensemble_minmax_and_weights_checked():
    a = FixedTeacher("a", {0: 0.0, 1: 5.0, 2: 10.0})
    ens = EnsembleTeacher([a], norm="minmax")
    np.testing.assert_allclose(ens.score(["q"], [np.array([0, 1, 2])])[0], [0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="weights"):
        EnsembleTeacher([a], [1.0, 2.0])


def test_normalize_constant_scores_is_finite():
    assert np.all(np.isfinite(normalize(np.array([2.0, 2.0, 2.0]))))


def test_rrf_and_zscore_fusion_by_hand():
    fused = fuse_ranked_lists([{1: 3.0, 2: 1.0}, {2: 5.0, 3: 4.0}], [1.0, 1.0], method="rrf", rrf_k=60)
    assert [d for d, _ in fused] == [2, 1, 3]
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61)
    z = dict(fuse_ranked_lists([{1: 3.0, 2: 1.0}, {2: 5.0, 3: 4.0}], [1.0, 1.0], method="zscore"))
    # list 1 -> {1: 1, 2: -1}; list 2 -> {2: 1, 3: -1}; a missing doc gets the list's minimum (-1)
    assert z == {1: pytest.approx(0.0), 2: pytest.approx(0.0), 3: pytest.approx(-2.0)}


def test_teacher_scores_are_cached_by_content(tmp_path):
    cache = ArrayCache(tmp_path / "c.sqlite")
    t = FixedTeacher("a", {i: float(i) for i in range(10)})
    cands = [np.array([1, 2, 3]), np.array([4, 5])]
    first = cached_teacher_scores(t, cache, ["q1", "q2"], cands, progress=False)
    assert t.calls == 1
    again = cached_teacher_scores(t, cache, ["q1", "q2"], cands, progress=False)
    assert t.calls == 1  # nothing recomputed
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x, y)
    cached_teacher_scores(t, cache, ["q1", "q3"], [cands[0], np.array([7])], progress=False)
    assert t.calls == 2 and cache.hits >= 3  # only the new query was scored


def test_bm25_teacher_prefers_matching_docs(tiny_beir, tmp_path):
    col = load_collection(tiny_beir)
    t = BM25Teacher(col.doc_texts(), col.checksum())
    scores, idx = t.retrieve(["vitamin deficiency bone"], 5)
    assert all(col.docs[int(i)].title.startswith("vitamin") for i in idx[0])
    s = t.score(["vitamin deficiency bone"], [idx[0]])[0]
    np.testing.assert_allclose(s, scores[0], rtol=1e-5)


def test_build_ensemble_from_spec_with_tiny_bi_encoder(tiny_beir, tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setenv("NRS_CACHE_DIR", str(tmp_path / "cache"))
    col = load_collection(tiny_beir)
    cache = ArrayCache(tmp_path / "c.sqlite")
    spec = TeacherSpec.from_dict({"kind": "ensemble", "members": [{"kind": "bm25"},
                                                                  {"kind": "bi-encoder", "model": str(tiny_bert)}]})
    teacher = build_teacher(spec, col.doc_texts(), col.checksum(), cache)
    out = teacher.score(["vitamin bone", "gene dna"], [np.arange(10), np.arange(5)])
    assert [len(o) for o in out] == [10, 5]
    assert all(np.isfinite(o).all() for o in out)
    n_cached = len(cache)
    again = build_teacher(spec, col.doc_texts(), col.checksum(), cache).score(  # embeddings come from the cache
        ["vitamin bone", "gene dna"], [np.arange(10), np.arange(5)])
    assert len(cache) == n_cached
    for a, b in zip(out, again):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_bi_encoder_encodes_only_the_documents_it_scores(tiny_beir, tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setenv("NRS_CACHE_DIR", str(tmp_path / "cache"))
    texts = load_collection(tiny_beir).doc_texts()
    cache = ArrayCache(tmp_path / "c.sqlite")
    teacher = BiEncoderTeacher(str(tiny_bert), texts, cache, progress=False)
    scores = teacher.score(["vitamin bone"], [np.array([3, 1])])[0]
    assert len(cache) == 2 + 1 and teacher._have.sum() == 2        # candidates (and the query) only
    full = teacher.doc_embeddings                                  # retrieval needs every document
    assert len(cache) == len(texts) + 1 and teacher._have.all()
    np.testing.assert_allclose(scores, full[[3, 1]] @ teacher.encode_queries(["vitamin bone"])[0], rtol=1e-5)


def test_bi_encoder_query_vectors_are_cached_by_content(tiny_beir, tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setenv("NRS_CACHE_DIR", str(tmp_path / "cache"))
    texts = load_collection(tiny_beir).doc_texts()
    cache = ArrayCache(tmp_path / "c.sqlite")
    first = BiEncoderTeacher(str(tiny_bert), texts, cache, progress=False).encode_queries(["heart", "gene dna"])
    again = BiEncoderTeacher(str(tiny_bert), texts, cache, progress=False)

    def fail(_texts):
        raise AssertionError("a cached query was encoded again")

    monkeypatch.setattr(again.encoder, "encode_queries", fail)
    np.testing.assert_array_equal(again.encode_queries(["gene dna", "heart"]), first[::-1])


def test_bi_encoder_int8_member(tiny_beir, tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setenv("NRS_CACHE_DIR", str(tmp_path / "cache"))
    texts = load_collection(tiny_beir).doc_texts()
    cache = ArrayCache(tmp_path / "c.sqlite")
    spec = TeacherSpec.from_dict({"kind": "bi-encoder", "model": str(tiny_bert), "int8": True})
    t8 = build_teacher(spec, texts, "x", cache)
    t32 = build_teacher(TeacherSpec.from_dict({"kind": "bi-encoder", "model": str(tiny_bert)}), texts, "x", cache)
    assert isinstance(t8, BiEncoderTeacher) and t8.encoder.session is not t32.encoder.session
    assert t8.fingerprint() != t32.fingerprint()                   # cached embeddings never mix
    s8, s32 = (t.score(["gene dna"], [np.arange(5)])[0] for t in (t8, t32))
    assert np.isfinite(s8).all() and not np.array_equal(s8, s32)
    np.testing.assert_allclose(s8, s32, atol=0.1)                  # quantized, same model
    # a vector does not depend on what it is batched with, so a build's teacher is the same
    # whatever its cache already held
    alone = np.vstack([t8.encoder.encode_docs([t]) for t in texts[:4]])
    np.testing.assert_allclose(t8.encoder.encode_docs(texts[:4]), alone, atol=1e-5)
    np.testing.assert_allclose(t8.encoder.encode_queries(["gene dna", "a much longer query about vitamin d"])[:1],
                               t8.encoder.encode_queries(["gene dna"]), atol=1e-5)
    with pytest.raises(ValueError, match="unknown key"):
        TeacherSpec.from_dict({"kind": "bi-encoder", "model": "m", "int_8": True})


def test_unknown_teacher_kind(tiny_beir, tmp_path):
    col = load_collection(tiny_beir)
    with pytest.raises(ValueError, match="unknown teacher kind"):
        build_teacher(TeacherSpec(kind="oracle"), col.doc_texts(), col.checksum(), ArrayCache(tmp_path / "c"))


def test_bi_encoder_encodes_each_distinct_query_once(tiny_beir, tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setenv("NRS_CACHE_DIR", str(tmp_path / "cache"))
    texts = load_collection(tiny_beir).doc_texts()
    teacher = BiEncoderTeacher(str(tiny_bert), texts, ArrayCache(tmp_path / "c.sqlite"), progress=False)
    seen: list[str] = []
    encode = teacher.encoder.encode_queries
    monkeypatch.setattr(teacher.encoder, "encode_queries", lambda qs: seen.extend(qs) or encode(qs))
    first = teacher.encode_queries(["gene dna", "vitamin bone", "gene dna"])
    again = teacher.encode_queries(["vitamin bone", "heart"])        # mining, then scoring as a member
    assert seen == ["gene dna", "vitamin bone", "heart"]
    np.testing.assert_array_equal(first[0], first[2])
    np.testing.assert_array_equal(again[0], first[1])
    assert teacher.encode_queries([]).shape == (0, teacher.encoder.dim)
