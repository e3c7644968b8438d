from __future__ import annotations

import json

import numpy as np
import pytest

from models.encoders import maxsim
from models.token_index import ResidualCodec, TokenIndex, default_n_centroids

DIM = 64


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_corpus() -> tuple[list[np.ndarray], np.ndarray]:
    """300 documents of 0-39 token vectors around 50 centers, and one 8-token query."""
    rng = np.random.default_rng(0)
    centers = unit(rng.standard_normal((50, DIM)))

    def tokens(n: int) -> np.ndarray:
        return unit(centers[rng.integers(0, 50, n)] + 0.1 * rng.standard_normal((n, DIM)))

    docs = [tokens(int(n)) for n in rng.integers(0, 40, 300)]
    docs[3] = np.zeros((0, DIM), np.float32)  # an empty document
    return docs, tokens(8)


@pytest.fixture(scope="module")
def corpus() -> tuple[list[np.ndarray], np.ndarray]:
    return make_corpus()


def brute_force_maxsim(query: np.ndarray, doc: np.ndarray) -> float:
    return float((query @ doc.T).max(axis=1).sum()) if len(doc) else 0.0


@pytest.mark.parametrize("bits, bound", [(1, 0.88), (2, 0.95), (4, 0.985)])
def test_codec_round_trip(tmp_path, corpus, bits: int, bound: float) -> None:
    # measured mean cosines on this data: 0.924 (1 bit), 0.971 (2 bits), 0.995 (4 bits)
    sample = np.concatenate(corpus[0])
    codec = ResidualCodec.train(sample, 256, bits, seed=0)
    codes, packed = codec.compress(sample)
    assert codes.shape == (len(sample),) and packed.dtype == np.uint8
    assert packed.shape == (len(sample), DIM * bits // 8)
    restored = codec.decompress(codes, packed)
    assert restored.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(restored, axis=1), 1.0, atol=1e-5)
    cos = (restored * sample).sum(axis=1)
    assert cos.mean() >= bound
    codec.save(tmp_path)
    again = ResidualCodec.load(tmp_path)
    np.testing.assert_array_equal(again.decompress(codes, packed), restored)


def test_codec_bit_packing_is_exact(corpus) -> None:
    codec = ResidualCodec.train(np.concatenate(corpus[0]), 16, 4)
    buckets = np.random.default_rng(1).integers(0, 16, (7, DIM)).astype(np.uint8)
    np.testing.assert_array_equal(codec._unpack(codec._pack(buckets)), buckets)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_codec_byte_table_decodes_like_the_bucket_weights(corpus, bits: int) -> None:
    # the per-byte lookup table used by decompress must equal centroid + weights[bucket, dim]
    sample = np.concatenate(corpus[0])
    codec = ResidualCodec.train(sample, 32, bits, seed=0)
    codes, packed = codec.compress(sample)
    buckets = codec._unpack(packed)
    reference = codec.centroids[codes.astype(np.int64)] + codec.weights[buckets, np.arange(DIM)]
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    np.testing.assert_allclose(codec.decompress(codes, packed), reference, atol=1e-6)


def test_default_n_centroids() -> None:
    assert default_n_centroids(10_000) == 1024
    assert default_n_centroids(100) == 100  # capped by the token count


def test_fp16_reference_is_exact(tmp_path, corpus) -> None:
    docs, query = corpus
    index = TokenIndex.build(docs, tmp_path / "fp16", bits=None)
    assert index.bits is None and index.bytes_per_token() == 2 * DIM
    assert index.n_docs == 300 and index.n_tokens == sum(len(d) for d in docs)
    assert sorted(p.name for p in (tmp_path / "fp16").iterdir()) == [
        "offsets.npy",
        "token_index.json",
        "tokens_fp16.npy",
    ]
    picked = np.array([7, 3, 299, 0, 7])
    tokens, offsets = index.doc_tokens(picked)
    np.testing.assert_allclose(tokens, np.concatenate([docs[i] for i in picked]), atol=1e-3)
    np.testing.assert_array_equal(np.diff(offsets), [len(docs[i]) for i in picked])
    scores = index.rerank(query, picked)
    expected = [brute_force_maxsim(query, docs[i]) for i in picked]
    np.testing.assert_allclose(scores, expected, atol=1e-2)
    assert scores[1] == 0.0  # empty document


def test_compressed_index_build_load_and_rerank(tmp_path, corpus) -> None:
    docs, query = corpus
    path = tmp_path / "colbert"
    built = TokenIndex.build(docs, path, bits=2, n_centroids=128, seed=0)
    names = sorted(p.name for p in path.iterdir())
    assert names == [
        "bucket_cutoffs.npy",
        "bucket_weights.npy",
        "centroids.npy",
        "codes.npy",
        "ivf.npy",
        "ivf_offsets.npy",
        "offsets.npy",
        "residuals.npy",
        "token_index.json",
    ]
    meta = json.loads((path / "token_index.json").read_text())
    assert meta["bits"] == 2 and meta["n_centroids"] == 128 and meta["n_docs"] == 300
    assert built.bytes_per_token() == 2 + DIM * 2 // 8  # uint16 code + packed residual
    assert built.index_bytes() == sum(p.stat().st_size for p in path.iterdir())
    loaded = TokenIndex.load(path)  # memory-mapped by default
    assert isinstance(loaded.codes, np.memmap) and isinstance(loaded.residuals, np.memmap)
    assert loaded.params()["n_tokens"] == built.n_tokens
    candidates = np.arange(300)
    scores = loaded.rerank(query, candidates)
    exact = np.array([brute_force_maxsim(query, docs[i]) for i in candidates])
    assert np.abs(scores - exact).mean() < 0.2  # measured 0.11 (8 query tokens)
    top_exact = set(np.argsort(-exact)[:10])
    assert len(top_exact & set(np.argsort(-scores)[:10])) >= 8  # measured 9
    np.testing.assert_array_equal(TokenIndex.load(path, mmap=False).rerank(query, candidates), scores)
    # rerank scales unnormalized decodes by their inverse norms: the MaxSim of the decoded tokens
    picked = np.array([7, 0, 299, 42])
    tokens, offsets = loaded.doc_tokens(picked)
    np.testing.assert_allclose(loaded.rerank(query, picked), maxsim(query, tokens, offsets), rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError):
        loaded.doc_tokens(np.array([300]))
    with pytest.raises(IndexError):
        loaded.rerank(query, np.array([-1]))


def test_centroid_candidates(tmp_path, corpus) -> None:
    docs, query = corpus
    index = TokenIndex.build(docs, tmp_path / "plaid", bits=2, n_centroids=64)
    ids, approx = index.centroid_candidates(query, k=50, ncells=8)
    assert len(ids) == 50 and np.all(np.diff(approx) <= 1e-6)
    exact = np.array([brute_force_maxsim(query, d) for d in docs])
    assert len(set(np.argsort(-exact)[:10]) & set(ids)) >= 8


@pytest.mark.parametrize("bits", [None, 2])
def test_rerank_split_over_threads_gives_the_same_scores(tmp_path, corpus, monkeypatch, bits) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import models.token_index as ti

    docs, query = corpus
    index = TokenIndex.build(docs, tmp_path / "colbert", bits=bits, n_centroids=128, seed=0)
    candidates = np.random.default_rng(1).permutation(300)[:200]
    serial = index.rerank(query, candidates)
    # small runs, so the ~3,900 candidate tokens make several chunks per part
    monkeypatch.setattr(ti, "RERANK_CHUNK_TOKENS", 256)
    monkeypatch.setattr(ti, "RERANK_MIN_SPLIT_TOKENS", 512)
    submitted: list[int] = []

    class Counting(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):  # type: ignore[override]
            submitted.append(args[5] - args[4])  # documents in the part
            return super().submit(fn, *args, **kwargs)

    with Counting(max_workers=2) as pool:
        for parts in (2, 3):
            submitted.clear()
            # (other matrix shapes per BLAS call: equal up to float rounding)
            split = index.rerank(query, candidates, executor=pool, parts=parts)
            np.testing.assert_allclose(split, serial, rtol=1e-6, atol=1e-6)
            assert len(submitted) == parts - 1 and all(n > 0 for n in submitted)
        submitted.clear()
        few = candidates[:10]  # under RERANK_MIN_SPLIT_TOKENS per part: scored by the caller alone
        np.testing.assert_allclose(index.rerank(query, few, executor=pool, parts=2), index.rerank(query, few),
                                   rtol=1e-6, atol=1e-6)
        assert submitted == []


def test_codec_kmeans_iterations_are_a_recorded_setting(tmp_path, corpus) -> None:
    """The codec's k-means iterations default to ColBERTv2's 4, are recorded with the index,
    and must be at least 1; more iterations fit the sample at least as well."""
    from models.token_index import KMEANS_NITER

    docs, _ = corpus
    assert KMEANS_NITER == 4
    built = TokenIndex.build(docs, tmp_path / "a", bits=2, n_centroids=32, seed=0)
    assert built.params()["kmeans_niter"] == 4
    assert TokenIndex.build(docs, tmp_path / "b", bits=2, n_centroids=32, seed=0, kmeans_niter=1
                            ).params()["kmeans_niter"] == 1
    assert "kmeans_niter" not in TokenIndex.build(docs, tmp_path / "c", bits=None).params()
    with pytest.raises(ValueError, match="niter must be at least 1"):
        TokenIndex.build(docs, tmp_path / "d", bits=2, n_centroids=32, kmeans_niter=0)
    sample = np.concatenate(docs)
    fits = []
    for n in (1, 10):
        codec = ResidualCodec.train(sample, 32, 2, seed=0, niter=n)
        fits.append(float((codec.centroids[codec.assign(sample).astype(np.int64)] * sample).sum(1).mean()))
    assert fits[1] >= fits[0] - 1e-6
