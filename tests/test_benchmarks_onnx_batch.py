"""The ONNX batch-size benchmark end to end on the tiny model and corpus."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from benchmarks import onnx_batch as bench  # noqa: E402


def test_onnx_batch_benchmark_writes_every_cell(tiny_beir, tiny_bert, tmp_path):
    bench.main(docs=12, repeats=1, model=str(tiny_bert), max_len=48, data=tiny_beir, threads=1, results_dir=tmp_path)
    data = json.loads((tmp_path / "onnx-batch.json").read_text())
    assert data["docs"] == 12
    for kind in ("dense", "colbert", "cross-encoder"):
        for precision in ("fp32", "int8"):
            row = data["docs_per_second"][kind][precision]
            assert set(row) == {str(b) for b in bench.BATCH_SIZES} and all(v > 0 for v in row.values())
            assert data["ratio_to_batch_32"][kind][precision]["32"] == 1.0
            assert data["fastest_batch_size"][kind][precision] in bench.BATCH_SIZES
    assert "| cross-encoder | int8 |" in (tmp_path / "onnx-batch.md").read_text()
