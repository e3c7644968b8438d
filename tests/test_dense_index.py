from __future__ import annotations

import numpy as np
import pytest

from models.dense_index import (
    FLAT_MAX_BYTES,
    DenseIndex,
    default_factory,
    default_nlist,
    default_nprobe_for,
    exact_search,
    ivfpq_factory,
    recall_at_k,
)


def clustered(n: int, n_queries: int, dim: int = 64, n_centers: int = 50, seed: int = 0):
    """``n`` documents and ``n_queries`` queries around the same random unit centers."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_centers, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)

    def draw(m: int) -> np.ndarray:
        x = centers[rng.integers(0, n_centers, m)] + 0.1 * rng.standard_normal((m, dim)).astype(np.float32)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return draw(n), draw(n_queries)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clustered(3000, 40)


@pytest.fixture(scope="module")
def ivfpq(data) -> DenseIndex:
    return DenseIndex.build(data[0], ivfpq_factory(*data[0].shape), seed=0)


def test_default_factory_shapes() -> None:
    assert default_factory(100, 384) == "Flat"
    # exact search while the float32 vectors fit FLAT_MAX_BYTES, IVF-PQ beyond
    assert default_factory(5183, 384) == default_factory(5183, 1152) == "Flat"
    assert default_factory(FLAT_MAX_BYTES // (4 * 384) + 1, 384) == "IVF1024,PQ192x8"
    assert ivfpq_factory(5183, 384) == "IVF128,PQ192x8"
    assert ivfpq_factory(5183, 384, opq=True, pq_bytes=48) == "OPQ48_384,IVF128,PQ48x8"
    assert default_nlist(3000) == 64  # 4*sqrt(3000) ~ 219 -> 256, capped to 3000/39 -> 64
    assert default_nprobe_for(128) == 32
    with pytest.raises(ValueError, match="divisor"):
        ivfpq_factory(5183, 384, pq_bytes=100)
    with pytest.raises(ValueError, match="1/8"):
        ivfpq_factory(5183, 384, pq_bytes=384)


def test_ivfpq_recall_and_size(data, ivfpq: DenseIndex) -> None:
    vectors, queries = data
    assert ivfpq.is_ivf and ivfpq.factory == "IVF64,PQ32x8"
    assert ivfpq.ntotal == 3000 and ivfpq.dim == 64
    assert ivfpq.bytes_per_vector() == 32  # 1/8 of 64 * 4 bytes
    params = ivfpq.params()
    assert params["nlist"] == 64 and params["M"] == 32 and params["nbits"] == 8 and params["opq"] is False
    _, exact = exact_search(vectors, queries, 100)
    scores, approx = ivfpq.search(queries, 100, nprobe=32)
    assert approx.dtype == np.int64 and scores.shape == (40, 100)
    assert recall_at_k(approx, exact, 100) > 0.8
    # the default nprobe is usable too, and recall grows with nprobe
    r_default = recall_at_k(ivfpq.search(queries, 100)[1], exact, 100)
    r_small = recall_at_k(ivfpq.search(queries, 100, nprobe=1)[1], exact, 100)
    assert r_default > 0.85 and r_default >= r_small
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # sorted by score


def test_save_load_round_trip(tmp_path, data, ivfpq: DenseIndex) -> None:
    _, queries = data
    path = tmp_path / "sub" / "index.faiss"
    ivfpq.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["index.faiss"]  # no temp file left
    for mmap in (False, True):
        loaded = DenseIndex.load(path, mmap=mmap)
        assert loaded.factory == ivfpq.factory and loaded.default_nprobe == ivfpq.default_nprobe
        for nprobe in (None, 8):
            s0, i0 = ivfpq.search(queries, 10, nprobe=nprobe)
            s1, i1 = loaded.search(queries, 10, nprobe=nprobe)
            np.testing.assert_array_equal(i0, i1)
            np.testing.assert_allclose(s0, s1)
    assert DenseIndex.load(path, use_gpu=True).ntotal == 3000  # CPU fallback without GPU faiss
    with pytest.raises(FileNotFoundError):
        DenseIndex.load(tmp_path / "missing.faiss")


def test_flat_for_tiny_corpus_and_padding(data) -> None:
    vectors, queries = data
    small = vectors[:5]
    index = DenseIndex.build(small)
    assert index.factory == "Flat" and not index.is_ivf
    assert index.bytes_per_vector() == 4 * 64
    scores, ids = index.search(queries[:3], 8, nprobe=99)  # nprobe ignored
    exact_scores, exact_ids = exact_search(small, queries[:3], 8)
    np.testing.assert_array_equal(ids, exact_ids)
    assert (ids[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()
    assert set(ids[0, :5]) == set(range(5))
    np.testing.assert_allclose(scores[:, :5], exact_scores[:, :5], rtol=1e-5)
    # a single query vector is accepted; a wrong dim is not
    assert index.search(queries[0], 2)[1].shape == (1, 2)
    with pytest.raises(ValueError):
        index.search(queries[:, :10], 2)


def test_recall_at_k() -> None:
    a = np.array([[1, 2, 3, -1], [4, 5, 6, 7]])
    e = np.array([[3, 2, 1, 0], [0, 1, 2, 3]])
    assert recall_at_k(a, e, 4) == pytest.approx((3 / 4 + 0) / 2)
    assert recall_at_k(a, e, 2) == pytest.approx((1 / 2 + 0) / 2)


def test_calibrate_nprobe_picks_the_smallest_sufficient_power_of_two(data) -> None:
    docs, _ = data
    index = DenseIndex.build(docs, ivfpq_factory(*docs.shape), seed=0)
    calib = clustered(3000, 60, seed=1)[1]  # held-out queries from the same distribution
    info = index.calibrate_nprobe(docs, calib, k=50, target=0.99)
    recalls = {int(p): r for p, r in info["recall_by_nprobe"].items()}
    nlist = index.params()["nlist"]
    assert max(recalls) == nlist and index.default_nprobe == info["chosen"]
    ceiling = recalls[nlist]
    assert recalls[info["chosen"]] >= 0.99 * ceiling - 1e-4  # rounding in the record
    smaller = [p for p in recalls if p < info["chosen"]]
    assert all(recalls[p] < 0.99 * ceiling + 1e-4 for p in smaller)
    with pytest.raises(ValueError, match="non-empty"):
        index.calibrate_nprobe(docs, np.zeros((0, docs.shape[1]), np.float32))
    flat = DenseIndex.build(docs[:50])
    assert flat.calibrate_nprobe(docs[:50], calib) == {"method": "not-ivf"}


def test_vectors_decode_what_the_search_scores(data):
    """``vectors`` returns the indexed vectors (exact for a flat index, decoded for IVF-PQ
    once its id map is built), so their inner products with a query are the scores the
    search gives those documents."""
    docs, queries = data
    flat = DenseIndex.build(docs[:200], "Flat")
    np.testing.assert_array_equal(flat.vectors(np.array([3, 7])), docs[[3, 7]])
    ivf = DenseIndex.build(docs, ivfpq_factory(*docs.shape), seed=0)
    with pytest.raises(RuntimeError, match="enable_vectors"):
        ivf.vectors(np.array([1]))
    ivf.enable_vectors()
    scores, idx = ivf.search(queries[:5], 10, nprobe=ivf._ivf.nlist)
    for q, s, i in zip(queries[:5], scores, idx):
        np.testing.assert_allclose(ivf.vectors(i) @ q, s, rtol=1e-4, atol=1e-4)
    assert ivf.vectors(np.zeros(0, np.int64)).shape == (0, docs.shape[1])
