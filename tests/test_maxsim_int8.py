"""Int8 MaxSim (ONNX Runtime integer GEMM) and the in-memory token stores of TokenIndex."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import models.maxsim_int8 as mi
from models.maxsim_int8 import GRAPH_FILE, Int8MaxSim, build_graph, quantize_rows
from models.token_index import TokenIndex

from .test_token_index import brute_force_maxsim, make_corpus, unit


@pytest.fixture(scope="module")
def corpus() -> tuple[list[np.ndarray], np.ndarray]:
    return make_corpus()


def offsets_of(docs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)


def test_shipped_graph_is_the_built_graph() -> None:
    pytest.importorskip("onnx")
    assert GRAPH_FILE.read_bytes() == build_graph().SerializeToString(), (
        "models/maxsim_int8.onnx is stale: rewrite it with build_graph().SerializeToString()")


def test_quantize_rows_error_is_within_half_a_step() -> None:
    x = unit(np.random.default_rng(0).standard_normal((50, 64)))
    q, scale = quantize_rows(x)
    assert q.dtype == np.int8 and np.abs(q).max() == 127
    assert np.all(np.abs(q * scale[:, None] - x) <= scale[:, None] / 2 + 1e-7)


def test_scores_match_exact_maxsim_in_any_order(corpus) -> None:
    docs, query = corpus
    scorer = Int8MaxSim.from_vectors(offsets_of(docs), np.concatenate(docs))
    candidates = np.random.default_rng(2).permutation(len(docs))
    scores = scorer.score(query, candidates)
    exact = np.array([brute_force_maxsim(query, docs[i]) for i in candidates])
    assert scores.dtype == np.float32 and scores.shape == (len(docs),)
    # int8 rounding of both sides: at most ~1% of a query token's similarity each
    np.testing.assert_allclose(scores, exact, atol=0.02 * len(query))
    assert scores[list(candidates).index(3)] == 0.0  # the empty document, as maxsim
    assert len(set(np.argsort(-exact)[:10]) & set(np.argsort(-scores)[:10])) >= 9
    assert scorer.score(query, np.array([], np.int64)).shape == (0,)


def test_padding_never_wins_a_max_and_runs_do_not_change_scores(corpus, monkeypatch) -> None:
    docs, query = corpus
    # a document pointing away from the query: every similarity is negative, padding is 0 before bias
    away = unit(-query[:1] + 0.01 * np.random.default_rng(3).standard_normal((5, query.shape[1])))
    docs = [*docs, away]
    scorer = Int8MaxSim.from_vectors(offsets_of(docs), np.concatenate(docs))
    last = len(docs) - 1
    assert scorer.score(query, np.array([last, 0]))[0] == pytest.approx(brute_force_maxsim(query, away), abs=0.05)
    assert brute_force_maxsim(query[:1], away) < -0.9
    candidates = np.arange(len(docs))
    whole = scorer.score(query, candidates)
    monkeypatch.setattr(mi, "CHUNK_ROWS", 64)  # many small runs of similar length
    np.testing.assert_allclose(scorer.score(query, candidates), whole, rtol=1e-6, atol=1e-6)


def test_scorer_checks_its_arrays() -> None:
    with pytest.raises(ValueError, match="uint8"):
        Int8MaxSim(np.array([0, 2]), np.zeros((2, 8), np.uint8), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="scales"):
        Int8MaxSim(np.array([0, 2]), np.zeros((3, 8), np.uint8), np.zeros(2, np.float32))


@pytest.mark.parametrize("bits", [None, 2])
def test_token_index_in_memory_modes(tmp_path, corpus, bits, monkeypatch) -> None:
    import models.token_index as ti

    docs, query = corpus
    TokenIndex.build(docs, tmp_path / "colbert", bits=bits, n_centroids=128, seed=0)
    index = TokenIndex.load(tmp_path / "colbert")
    assert index.in_memory == ("float16" if bits is None else "compressed")
    assert index.to_memory("compressed") is index
    candidates = np.random.default_rng(1).permutation(len(docs))[:200]
    reference = index.rerank(query, candidates)

    f32 = index.to_memory("float32")
    assert f32.in_memory == "float32" and f32.tokens is not None and f32.tokens.dtype == np.float32
    np.testing.assert_allclose(f32.rerank(query, candidates), reference, rtol=1e-4, atol=1e-4)

    i8 = index.to_memory("int8")
    assert i8.in_memory == "int8" and i8.int8 is not None and i8.int8.tokens.shape == (index.n_tokens + 1, index.dim)
    scores = i8.rerank(query, candidates)
    np.testing.assert_allclose(scores, reference, atol=0.02 * len(query))
    assert len(set(np.argsort(-reference)[:10]) & set(np.argsort(-scores)[:10])) >= 9
    monkeypatch.setattr(ti, "RERANK_MIN_SPLIT_TOKENS", 512)
    with ThreadPoolExecutor(max_workers=2) as pool:  # the split rerank path: each part, the same scores
        submitted = []
        real_submit = pool.submit
        monkeypatch.setattr(pool, "submit", lambda fn, *a: submitted.append(a) or real_submit(fn, *a))
        np.testing.assert_array_equal(i8.rerank(query, candidates, executor=pool, parts=2), scores)
        assert len(submitted) == 1
    # the files and the centroid lists are untouched
    assert i8.residuals is index.residuals and i8.ivf is index.ivf
    with pytest.raises(ValueError, match="unknown in-memory token mode"):
        index.to_memory("bfloat16")


def test_query_side_stays_in_seven_bits_so_avx2_integer_gemm_cannot_saturate():
    """u8 document tokens (up to 255) times the query's int8 values, summed in pairs in int16
    by ONNX Runtime's kernel on CPUs without VNNI: 255 * 127 * 2 overflows, 255 * 63 * 2 not."""
    from models.maxsim_int8 import QUERY_LEVELS, quantize_rows

    assert 255 * QUERY_LEVELS * 2 <= 32767
    q, scale = quantize_rows(np.array([[-1.0, 0.25, 0.0]], np.float32), levels=QUERY_LEVELS)
    assert q.tolist() == [[-63, 16, 0]] and abs(float(scale[0]) - 1.0 / 63) < 1e-7
