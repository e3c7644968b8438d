from __future__ import annotations

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")
pytest.importorskip("torch")

from index_build.distill_vq import (  # noqa: E402
    DistillVQConfig,
    assign,
    distill,
    index_parts,
    reconstruct,
    stored_codes,
)
from models.dense_index import exact_search, recall_at_k  # noqa: E402


def clustered(n: int, dim: int, n_centers: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_centers, dim)).astype(np.float32)
    x = centers[rng.integers(0, n_centers, n)] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def problem():
    x = clustered(2000, 32, 20, 0.6, seed=0)
    rng = np.random.default_rng(1)
    q = x[rng.integers(0, len(x), 400)] + 0.3 * rng.standard_normal((400, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q[:300], q[300:]


def build(x: np.ndarray, factory: str = "IVF16,PQ4x6"):
    index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    faiss.extract_index_ivf(index).cp.seed = 0
    index.train(x)
    index.add(x)
    return index


def recall(index, x, q, k=10, nprobe=4):
    faiss.extract_index_ivf(index).nprobe = nprobe
    _, approx = index.search(q, k)
    _, exact = exact_search(x, q, k)
    return recall_at_k(approx, exact, k)


def test_training_lowers_the_distillation_loss(problem):
    x, q_train, _ = problem
    index = build(x)
    info = distill(index, x, q_train, DistillVQConfig(steps=60, batch_queries=32))
    assert info["loss_end"] < info["loss_start"]
    assert info["method"] == "distill-vq" and info["steps"] == 60 and info["n_queries"] == len(q_train)
    assert info["candidates"] == "all documents"
    assert index.ntotal == len(x)


@pytest.fixture(scope="module")
def anisotropic():
    """Queries that care about a few directions only (as real query vectors do): k-means
    spends the codebooks on reconstructing every direction, distillation can spend them on
    the directions the queries rank by."""
    rng = np.random.default_rng(0)
    dim = 32
    x = rng.standard_normal((2000, dim)) * np.linspace(1.0, 0.3, dim)
    q = rng.standard_normal((600, dim)) * np.r_[np.ones(8), np.full(dim - 8, 0.15)]
    x, q = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (x, q))
    return x.astype(np.float32), q[:400].astype(np.float32), q[400:].astype(np.float32)


def test_distilled_codebooks_rank_better_than_reconstruction_trained_ones(anisotropic):
    """On held-out queries the distilled index finds more of the exact top-10 than the same
    index as FAISS trained it (k-means on reconstruction error)."""
    x, q_train, q_test = anisotropic
    before = recall(build(x, "IVF16,PQ8x4"), x, q_test)
    index = build(x, "IVF16,PQ8x4")
    distill(index, x, q_train, DistillVQConfig(steps=150, batch_queries=32, temperature=0.2, lr=2e-3))
    after = recall(index, x, q_test)
    assert after > before + 0.03, (before, after)


def test_large_corpus_mode_samples_candidates(anisotropic):
    """Above ``full_corpus_max`` documents each query sees its teacher top-k plus random docs."""
    x, q_train, q_test = anisotropic
    before = recall(build(x, "IVF16,PQ8x4"), x, q_test)
    index = build(x, "IVF16,PQ8x4")
    info = distill(index, x, q_train, DistillVQConfig(steps=150, batch_queries=32, temperature=0.2, lr=2e-3,
                                                      full_corpus_max=100, n_top=100, n_random=100))
    assert info["candidates"] == "teacher top-100 + 100 random"
    after = recall(index, x, q_test)
    assert after > before + 0.01, (before, after)


def test_sampled_mode_bounds_the_batch_by_memory(problem, monkeypatch):
    """A large PQ (many sub-quantizers) falls back to sampled candidates and fewer queries
    per step instead of building a huge assignment tensor."""
    import index_build.distill_vq as dvq

    x, q_train, _ = problem
    index = build(x)
    monkeypatch.setattr(dvq, "MAX_ASSIGN_ELEMENTS", 4 * 64 * 20 * 3)  # M=4, ksub=64: 3 queries of 20 docs
    info = distill(index, x, q_train, DistillVQConfig(steps=3, batch_queries=32, n_top=10, n_random=10))
    assert info["candidates"] == "teacher top-10 + 10 random" and info["batch_queries"] == 3
    assert index.ntotal == len(x)


def test_config_is_validated():
    with pytest.raises(ValueError, match="queries"):
        DistillVQConfig(queries="test")
    with pytest.raises(ValueError, match="steps"):
        DistillVQConfig(steps=0)


def test_rejects_mismatched_inputs(problem):
    x, q_train, _ = problem
    index = build(x)
    with pytest.raises(ValueError, match="vectors"):
        distill(index, x[:10], q_train)
    with pytest.raises(ValueError, match="query"):
        distill(index, x, q_train[:0])


def test_reassigned_codes_match_learned_codebooks_and_roundtrip(problem, tmp_path):
    x, q_train, _ = problem
    index = build(x)
    distill(index, x, q_train, DistillVQConfig(steps=10))
    parts = index_parts(index)
    C, P = parts.centroids(), parts.codebooks()
    lists, codes = stored_codes(parts)
    my_lists, my_codes = assign(x, C, P)
    assert (lists == my_lists).mean() > 0.999  # ties aside, FAISS stores what the codebooks say
    assert (codes == my_codes).mean() > 0.999
    # FAISS's own scores equal the reconstruction from the learned parameters
    faiss.extract_index_ivf(index).nprobe = 16
    s, i = index.search(q_train[:5], 5)
    xh = reconstruct(C, P, lists, codes)
    np.testing.assert_allclose(s, np.take_along_axis(q_train[:5] @ xh.T, i, axis=1), atol=1e-4)
    path = tmp_path / "learned.faiss"
    faiss.write_index(index, str(path))
    again = faiss.read_index(str(path))
    faiss.extract_index_ivf(again).nprobe = 16
    s2, i2 = again.search(q_train[:5], 5)
    np.testing.assert_array_equal(i, i2)
    np.testing.assert_allclose(s, s2, atol=1e-6)


def test_opq_index_is_supported(problem):
    """Behind an OPQ rotation the learning happens in the rotated space, and FAISS's stored
    codes are those of the learned codebooks for the rotated vectors."""
    x, q_train, _ = problem
    index = build(x, "OPQ4_32,IVF16,PQ4x6")
    distill(index, x, q_train, DistillVQConfig(steps=10))
    parts = index_parts(index)
    assert parts.transform is not None and index.ntotal == len(x)
    lists, codes = stored_codes(parts)
    my_lists, my_codes = assign(parts.apply_transform(x), parts.centroids(), parts.codebooks())
    assert (lists == my_lists).mean() > 0.999 and (codes == my_codes).mean() > 0.999


def test_rejects_non_ivfpq():
    index = faiss.index_factory(8, "Flat", faiss.METRIC_INNER_PRODUCT)
    with pytest.raises(ValueError, match="IndexIVFPQ"):
        index_parts(index)
