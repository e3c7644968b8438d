"""The int8 fidelity benchmark end to end on the tiny model and corpus."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from benchmarks import int8_fidelity as bench  # noqa: E402


def test_int8_fidelity_benchmark_compares_every_graph(tiny_beir, tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setenv("NRS_CACHE_DIR", str(tmp_path / "cache"))
    bench.main(models=str(tiny_bert), queries=5, docs=12, threads=1, repeats=1, calibration_len=64,
               data=tiny_beir, results_dir=tmp_path)
    data = json.loads((tmp_path / "int8-fidelity.json").read_text())
    rows = data["models"][str(tiny_bert)]
    assert set(rows) == {"fp32", "per-tensor", "per-channel", "per-channel-outliers-fp32",
                         "per-channel-outliers-fp32-8bit-weights", "per-channel-outliers-smoothed",
                         "per-channel-outliers-fp32-per-token"}
    assert data["int8_weight_bits"] == 7 and isinstance(data["cpu_int8_features"], list)
    assert rows["fp32"]["fp32_matmuls"] > 0 and rows["per-channel"]["fp32_matmuls"] == 0
    eight_bit = rows["per-channel-outliers-fp32-8bit-weights"]   # may saturate: host-dependent
    assert -1.0001 <= eight_bit["query_cos_mean"] <= 1.0001
    for graph in set(rows) - {"fp32", "per-channel-outliers-fp32-8bit-weights"}:
        row = rows[graph]
        assert 0.5 < row["query_cos_mean"] <= 1.0001 and row["doc_cos_min"] <= row["doc_cos_mean"]
        assert 0.0 <= row["top10_overlap"] <= 1.0 and row["docs_seconds"] >= 0
        assert 0.5 < row["query_alone_vs_batched_cos_min"] <= 1.0001 and row["queries_seconds"] >= 0
    assert rows["per-channel-outliers-fp32-per-token"]["query_alone_vs_batched_cos_min"] > 0.99999
    assert "| per-channel-outliers-fp32 |" in (tmp_path / "int8-fidelity.md").read_text()
