"""The Distill-VQ benchmark's measuring, checks and output on small synthetic inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from benchmarks import distill_vq as bench  # noqa: E402
from models.dense_index import exact_search  # noqa: E402

ROW_KEYS = {"method", "bytes_per_vector", "labels", "R@10_vs_exact", "R@100_vs_exact", "nDCG@10"}


class FakeJudged:
    def __init__(self) -> None:
        self.calls = 0

    def score(self, scores: np.ndarray, indices: np.ndarray) -> dict[str, float]:
        self.calls += 1
        return {"nDCG@10": 0.5}


def row(method: str, size: int, labels: bool, r100: float) -> dict:
    return {"method": method, "bytes_per_vector": size, "labels": labels, "R@10_vs_exact": r100,
            "R@100_vs_exact": r100, "R@100_vs_exact_all_lists": r100, "nDCG@10": 0.6, "queries": "none",
            "train_seconds": 1.0}


def test_measure_is_exact_for_an_index_that_probes_everything():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 16)).astype(np.float32)
    q = rng.standard_normal((20, 16)).astype(np.float32)
    index = faiss.index_factory(16, "IVF4,PQ16x8", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    _, exact = exact_search(x, q, bench.K)
    m = bench.measure(index, q, exact, FakeJudged(), nprobe=1, nlist=4)
    assert 0 < m["R@100_vs_exact"] <= m["R@100_vs_exact_all_lists"] <= 1
    assert m["nDCG@10"] == 0.5 and 0 < m["R@10_vs_exact"] <= 1


def test_checks_compare_with_the_better_faiss_index_per_labels_value():
    rows = []
    for labels in (True, False):
        rows += [row("faiss-ivfpq", 8, labels, 0.40), row("faiss-ivfopq", 8, labels, 0.45),
                 row("faiss-ivfpq", 16, labels, 0.50), row("faiss-ivfopq", 16, labels, 0.55)]
    rows += [row("distill-vq", 8, True, 0.55), row("distill-vq", 16, True, 0.60),
             row("distill-vq", 8, False, 0.46), row("distill-vq", 16, False, 0.54)]
    by_labels = {c["labels"]: c for c in bench.checks(rows)}
    assert by_labels[True]["gain_R@100_over_best_faiss"] == {8: 0.1, 16: 0.05}
    assert by_labels[True]["beats_faiss_at_every_size"] and by_labels[True]["largest_gain_at_smallest_size"]
    assert not by_labels[False]["beats_faiss_at_every_size"]


def test_outputs_are_a_row_list_and_a_table(tmp_path):
    rows = [row("faiss-ivfpq", 8, True, 0.4), row("faiss-ivfopq", 8, True, 0.45), row("distill-vq", 8, True, 0.5)]
    meta = {"command": "python benchmarks/distill_vq.py", "machine": {"cpu": "x", "cpu_count": 2}, "seconds": 1,
            "date": "today", "n_test_queries": 3, "n_docs": 10, "dim": 4, "nlist": 4, "nprobe": 2,
            "exact_nDCG@10": 0.7, "checks": bench.checks(rows)}
    bench.write_outputs(tmp_path, rows, meta)
    saved = json.loads((tmp_path / bench.JSON_NAME).read_text())
    assert isinstance(saved, list) and all(ROW_KEYS <= set(r) for r in saved)
    md = (tmp_path / bench.MD_NAME).read_text()
    assert "| 8 | true | distill-vq |" in md and "beats FAISS at every size: yes" in md
