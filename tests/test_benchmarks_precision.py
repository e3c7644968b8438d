"""The training-precision benchmark end to end on the tiny corpus and model (the real run is a
benchmark script; here only its plumbing and its result file are checked)."""

from __future__ import annotations

import json

from benchmarks import train_precision as bench
from tests.conftest import tiny_overrides


def test_precision_benchmark_runs_both_arms(tiny_beir, tiny_bert, tmp_path):
    over = tiny_overrides(tiny_beir, tiny_bert, tmp_path, 'students.kinds=["dense","colbert"]',
                          "train.dense.pseudo_queries=6", "train.dense.dev_retrieval=true", "train.dense.wise_ft=0.5")
    bench.main(config=None, kinds="dense", precisions="fp32,bf16", root=tmp_path / "arms",
               overrides=over, results_dir=tmp_path / "results")
    # a later run for another student adds its rows (mining cached, the dense rows kept)
    bench.main(config=None, kinds="colbert", precisions="fp32,bf16", root=tmp_path / "arms",
               overrides=over, results_dir=tmp_path / "results")
    data = json.loads((tmp_path / "results" / "train-precision.json").read_text())
    assert set(data["runs"]) == {"fp32", "bf16"}
    for prec in ("fp32", "bf16"):
        dense = data["runs"][prec]["dense"]
        assert dense["steps"] > 0 and 0.0 <= dense["test"]["nDCG@10"] <= 1.0
        assert dense["wise_ft"] == 0.5 and dense["export_dev_nDCG@10"] is not None
        assert dense["parity_max_abs_diff"] < 1e-4  # the ONNX graph is fp32 whatever the training precision
        assert "colbert" in data["runs"][prec]
    # mining ran once: the bf16 arm's mine stage is a copy, its key equal to the fp32 arm's
    mine = [json.loads((tmp_path / "arms" / p / "mine" / "stage.json").read_text())["key"] for p in ("fp32", "bf16")]
    assert mine[0] == mine[1]
    # the arms trained different models (different stage keys)
    keys = [json.loads((tmp_path / "arms" / p / "distill-dense" / "stage.json").read_text())["key"]
            for p in ("fp32", "bf16")]
    assert keys[0] != keys[1]
    assert set(data["ratios_fp32_over_bf16"]) == {"dense", "colbert"}
    assert "--kinds dense " in data["commands"]["dense"] and "--kinds colbert " in data["commands"]["colbert"]
    assert "| dense | bf16 |" in (tmp_path / "results" / "train-precision.md").read_text()
