"""The index benchmark's measuring code on tiny synthetic data (the real run is a benchmark)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks import indexes as bench
from models.dense_index import exact_search

N_DOCS, DENSE_DIM, TOKEN_DIM, N_QUERIES = 2500, 32, 16, 30


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@dataclass
class FakeInputs:
    """Stands in for :class:`benchmarks.indexes.SciFactInputs`: clustered dense vectors and
    token vectors for the same documents, queries near documents, qrels = each query's source
    document (grade 2) and its exact dense top-2 (grade 1)."""

    progress: bool = False
    cfg: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(index=SimpleNamespace(colbert_bits=2)))

    def __post_init__(self) -> None:
        rng = np.random.default_rng(0)
        centers = unit(rng.standard_normal((40, DENSE_DIM)))
        self.dense_corpus = unit(centers[rng.integers(0, 40, N_DOCS)] + 0.3 * rng.standard_normal((N_DOCS, DENSE_DIM)))
        src = rng.choice(N_DOCS, N_QUERIES, replace=False)
        self.dense_queries = unit(self.dense_corpus[src] + 0.05 * rng.standard_normal((N_QUERIES, DENSE_DIM)))
        calib = rng.choice(N_DOCS, N_QUERIES, replace=False)
        self.calibration_queries = unit(self.dense_corpus[calib] + 0.05 * rng.standard_normal((N_QUERIES, DENSE_DIM)))
        tok_centers = unit(rng.standard_normal((60, TOKEN_DIM)))
        self.tokens = [unit(tok_centers[rng.integers(0, 60, n)] + 0.1 * rng.standard_normal((n, TOKEN_DIM)))
                       for n in rng.integers(0, 6, N_DOCS)]
        self.query_tokens = np.stack([
            unit(np.concatenate([self.tokens[d], tok_centers[rng.integers(0, 60, 8)]])[:8]) for d in src
        ])
        _, top = exact_search(self.dense_corpus, self.dense_queries, 2)
        doc_ids = [f"d{i}" for i in range(N_DOCS)]
        qids = [f"q{i}" for i in range(N_QUERIES)]
        qrels = {q: {doc_ids[int(j)]: 1 for j in top[r]} | {doc_ids[int(src[r])]: 2} for r, q in enumerate(qids)}
        self.judged = bench.Judged(qids, doc_ids, qrels)

    def colbert_tokens(self) -> list[np.ndarray]:
        return self.tokens

    def colbert_queries(self) -> np.ndarray:
        return self.query_tokens


@pytest.fixture(scope="module")
def fake() -> FakeInputs:
    return FakeInputs()


def test_measure_ivfpq(fake: FakeInputs) -> None:
    alternatives = ["PQ16x8np", "IVF64,PQ8x8", "OPQ4_32,IVF64,PQ4x8"]
    out = bench.measure_ivfpq(fake.dense_corpus, fake.dense_queries, fake.judged, nprobes=(1, 8, 64, 128),
                              alternatives=alternatives)
    assert out["factory"] == "IVF64,PQ16x8"
    assert out["bytes_per_vector"] == 16 and out["float32_bytes_per_vector"] == 4 * DENSE_DIM
    assert [r["nprobe"] for r in out["sweep"]] == [1, 8, 64]  # 128 > nlist is skipped
    recalls = [r["recall@100_vs_exact"] for r in out["sweep"]]
    assert recalls[0] < recalls[-1] and recalls[-1] == out["recall@100_vs_exact_all_lists"]
    assert 0.0 < out["recall@100_vs_exact"] <= 1.0 and 0.0 < out["nDCG@10"] <= out["nDCG@10_exact"] + 0.05
    assert all(r["p50_ms"] <= r["p99_ms"] for r in out["sweep"])
    assert [a["factory"] for a in out["alternatives"]] == alternatives
    assert [a["bytes_per_vector"] for a in out["alternatives"]] == [16, 8, 4]
    flat_pq = out["alternatives"][0]  # the default's codes, every one scanned: the IVF-free bound
    assert flat_pq["nprobe"] is None and flat_pq["recall@100_vs_exact"] == pytest.approx(
        out["recall@100_vs_exact_all_lists"], abs=0.05)
    assert all(a["p50_ms"] > 0 for a in out["alternatives"])


def test_measure_colbert(fake: FakeInputs, tmp_path: Path) -> None:
    _, cands = exact_search(fake.dense_corpus, fake.dense_queries, bench.K)
    out, first = bench.measure_colbert(fake.tokens, fake.query_tokens, cands, fake.judged, tmp_path, bits=(2, 4),
                                       ncells=(1, 4), first_stage_reference={"R@100": 0.5, "nDCG@10": 0.4})
    assert set(out) >= {"2", "4", "fp16_nDCG@10", "fp16_index_bytes", "n_tokens"}
    assert out["fp16_bytes_per_token"] == 2 * TOKEN_DIM
    for b in ("2", "4"):
        e = out[b]
        assert e["index_bytes"] < out["fp16_index_bytes"] and e["fp16_index_bytes"] == out["fp16_index_bytes"]
        assert e["bytes_per_token"] == 2 + TOKEN_DIM * int(b) // 8
        assert e["rerank_p50_ms"] > 0 and abs(e["nDCG@10_delta_vs_fp16"]) < 0.2
    assert first is not None and first["bits"] == 2 and first["dense_R@100"] == 0.5
    assert [r["ncells"] for r in first["sweep"]] == [1, 4]
    assert all(0.0 <= r["R@100"] <= 1.0 and r["p50_ms"] > 0 for r in first["sweep"])


def test_synthetic_vectors_and_chunked_exact_search(fake: FakeInputs) -> None:
    vecs, sigma = bench.synthetic_vectors(fake.dense_corpus[:100], 3000, noise_ratio=0.4, chunk=700)
    assert vecs.shape == (3000, DENSE_DIM) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert sigma == pytest.approx(0.4 / np.sqrt(DENSE_DIM), rel=1e-3)
    s, i = bench.exact_topk_chunked(vecs, fake.dense_queries, 50, chunk=700)
    ref_s, ref_i = exact_search(vecs, fake.dense_queries, 50)
    np.testing.assert_allclose(s, ref_s, atol=1e-5)
    assert (i == ref_i).mean() > 0.99  # only ties may swap


def test_measure_scale(fake: FakeInputs) -> None:
    vecs, _ = bench.synthetic_vectors(fake.dense_corpus, 3000, noise_ratio=0.4)
    out = bench.measure_scale(vecs, fake.dense_queries, nprobes=(1, 16, 64), train_sample=2600)
    assert out["factory"] == "IVF64,PQ16x8" and out["n"] == 3000 and out["train_sample"] == 2600
    assert list(out["p50_ms"]) == ["1", "16", "64"] == list(out["recall@100_vs_exact"])
    assert out["recall@100_vs_exact"]["1"] < out["recall@100_vs_exact"]["64"]
    assert out["build_s"] == pytest.approx(out["train_s"] + out["add_s"], abs=0.02)
    assert out["memory_bytes"] > out["code_bytes"] == 16 * 3000


def test_main_runs_every_section_and_merges(fake: FakeInputs, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(bench, "SciFactInputs", lambda config, progress=True: fake)
    monkeypatch.setattr(bench, "SCALE_N", 3000)
    monkeypatch.setattr(bench, "alternative_factories", lambda n, dim: ["IVF64,PQ8x8"])  # OPQ training is slow
    (tmp_path / bench.JSON_NAME).write_text(json.dumps({"old_section": {"kept": True}}))
    bench.main(config=Path("x.toml"), only="ivfpq,colbert", out_dir=tmp_path, threads=1, progress=False)
    data = json.loads((tmp_path / bench.JSON_NAME).read_text())
    assert data["old_section"] == {"kept": True}
    assert {"ivfpq", "colbert", "colbert_first_stage", "machine", "versions", "command", "checks"} <= set(data)
    assert set(data["colbert"]) >= {"1", "2", "4", "fp16_nDCG@10", "fp16_index_bytes"}
    assert set(data["checks"]) == {"ivfpq", "colbert_2bit"} and "seconds" in data["ivfpq"]
    bench.main(config=Path("x.toml"), only="scale_1m", out_dir=tmp_path, threads=1, progress=False)
    data = json.loads((tmp_path / bench.JSON_NAME).read_text())
    assert {"ivfpq", "colbert", "scale_1m"} <= set(data) and data["scale_1m"]["n"] == 3000
    md = (tmp_path / bench.MD_NAME).read_text()
    assert "## Dense IVF-PQ" in md and "## ColBERT token index" in md and "synthetic vectors" in md


def test_failing_section_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    class Broken:
        progress = False

        @property
        def dense_corpus(self) -> np.ndarray:
            raise FileNotFoundError("export-dense/stage.json missing")

    monkeypatch.setattr(bench, "SciFactInputs", lambda config, progress=True: Broken())
    with pytest.raises(FileNotFoundError):
        bench.main(config=Path("x.toml"), only="ivfpq", out_dir=tmp_path, threads=1, progress=False)
    assert not (tmp_path / bench.JSON_NAME).exists()


def test_parse_only_and_checks() -> None:
    assert bench.parse_only("colbert") == ["colbert"]
    with pytest.raises(ValueError, match="unknown"):
        bench.parse_only("ivfpq,hnsw")
    c = bench.checks({
        "ivfpq": {"bytes_per_vector": 48, "float32_bytes_per_vector": 1536, "recall@100_vs_exact": 0.96},
        "colbert": {"2": {"index_bytes": 20, "nDCG@10": 0.70}, "fp16_index_bytes": 100, "fp16_nDCG@10": 0.71},
    })
    assert c["ivfpq"]["met"] is True
    assert c["colbert_2bit"]["size_met"] is True and c["colbert_2bit"]["quality_met"] is False
