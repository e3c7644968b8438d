"""benchmarks/significance.py: paired differences between rows of a build, against hand computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from benchmarks.significance import compare, main, paired


def test_paired_difference_interval_and_test_match_hand_computations():
    rng = np.random.default_rng(3)
    b = rng.uniform(0, 1, 300)
    a = np.clip(b + rng.normal(0.03, 0.1, 300), 0, 1)
    r = paired(a, b, margin=0.0)
    diff = a - b
    assert r["diff"] == pytest.approx(diff.mean(), abs=1e-4) and r["queries"] == 300
    assert r["p_paired_t"] == pytest.approx(stats.ttest_rel(a, b).pvalue, abs=1e-4)
    # the percentile interval of the mean difference: about mean +- 1.96 standard errors
    se = diff.std(ddof=1) / np.sqrt(len(diff))
    assert r["ci95"][0] == pytest.approx(diff.mean() - 1.96 * se, abs=0.25 * se)
    assert r["ci95"][1] == pytest.approx(diff.mean() + 1.96 * se, abs=0.25 * se)
    assert r["ci95"][0] > 0 and r["verdict"] == "above the margin"
    assert paired(a, b, margin=1.0)["verdict"] == "below the margin"
    assert paired(a, b, margin=float(diff.mean()))["verdict"] == "within noise of the margin"
    assert paired(a, b, margin=0.0) == r  # seeded


def test_identical_rows_differ_by_nothing():
    a = np.array([0.5, 0.2, 1.0])
    r = paired(a, a.copy(), margin=-0.005)
    assert r["diff"] == 0 and r["ci95"] == [0, 0] and r["p_paired_t"] == 1.0 and r["verdict"] == "above the margin"
    with pytest.raises(ValueError):
        paired(a[:1], a[:1], margin=0.0)


def test_pairs_use_the_queries_both_rows_have_and_the_pool_margins(tmp_path):
    rows = {"asym-dense": {"q1": 0.6, "q2": 0.8, "q3": 0.1}, "base-dense": {"q1": 0.5, "q2": 0.7},
            "teacher": {"q1": 0.7, "q2": 0.9}}
    out = compare(rows, pool=False)
    assert set(out) == {"asym-dense - base-dense", "teacher - base-dense"}
    assert out["asym-dense - base-dense"]["queries"] == 2 and out["asym-dense - base-dense"]["margin"] == 0.02
    assert compare(rows, pool=True)["asym-dense - base-dense"]["margin"] == -0.005
    # the script over a build's file
    f = tmp_path / "x.per-query.json"
    f.write_text(json.dumps({"metric": "nDCG@10", "mode": "rerank", "collection": rows, "trec": {"dl19": rows},
                             "command": "index-build all"}))
    main(files=[f], out=tmp_path / "sig.json")
    report = json.loads((tmp_path / "sig.json").read_text())
    build = report["builds"][str(f).removesuffix(".per-query.json")]
    assert build["collection"]["asym-dense - base-dense"]["margin"] == -0.005  # a pool build
    assert build["trec"]["dl19"]["teacher - base-dense"]["diff"] == pytest.approx(0.2)
    assert "| asym-dense - base-dense |" in (tmp_path / "sig.md").read_text()


def test_a_label_free_builds_other_splits_are_compared_too(tmp_path):
    rows = {"asym-dense": {"q1": 0.6, "q2": 0.8}, "base-dense": {"q1": 0.5, "q2": 0.7}}
    f = tmp_path / "lf.per-query.json"
    f.write_text(json.dumps({"metric": "nDCG@10", "mode": "retrieval", "collection": rows,
                             "splits": {"train": rows}, "trec": {}, "command": "index-build all"}))
    main(files=[f], out=tmp_path / "sig.json")
    build = json.loads((tmp_path / "sig.json").read_text())["builds"][str(f).removesuffix(".per-query.json")]
    assert build["splits"]["train"]["asym-dense - base-dense"]["margin"] == 0.02
    assert "| train | asym-dense - base-dense |" in (tmp_path / "sig.md").read_text()
    # every unseen query together: both splits' pairs, the same query id in each counted twice
    both = build["splits"]["test+train"]["asym-dense - base-dense"]
    assert both["queries"] == 4 and both["diff"] == pytest.approx(0.1)


def test_seed_groups_average_each_query_over_the_seeds(tmp_path, monkeypatch):
    import benchmarks.significance as sig

    def build(dense: list[float], extra: list[float]) -> dict:
        rows = {"asym-dense": dict(zip(["q1", "q2"], dense)), "base-dense": {"q1": 0.5, "q2": 0.5}}
        train = {"asym-dense": dict(zip(["t1", "t2"], extra)), "base-dense": {"t1": 0.4, "t2": 0.4}}
        return {"metric": "nDCG@10", "mode": "retrieval", "collection": rows, "splits": {"train": train},
                "trec": {}, "command": "index-build all"}

    seeds = [build([0.6, 0.5], [0.4, 0.6]), build([0.8, 0.5], [0.5, 0.4])]
    averaged = sig.seed_average(seeds)
    assert averaged["collection"]["asym-dense"] == pytest.approx({"q1": 0.7, "q2": 0.5})
    assert averaged["splits"]["train"]["asym-dense"] == pytest.approx({"t1": 0.45, "t2": 0.5})
    files = []
    for i, data in enumerate(seeds):
        files.append(tmp_path / f"s{i}.per-query.json")
        files[-1].write_text(json.dumps(data))
    monkeypatch.setattr(sig, "SEED_GROUPS", {"both seeds": [str(f).removesuffix(".per-query.json") for f in files]})
    main(files=files, out=tmp_path / "sig.json")
    group = json.loads((tmp_path / "sig.json").read_text())["builds"]["both seeds"]
    assert group["collection"]["asym-dense - base-dense"]["diff"] == pytest.approx(0.1)
    unseen = group["splits"]["test+train"]["asym-dense - base-dense"]
    assert unseen["queries"] == 4 and unseen["diff"] == pytest.approx((0.2 + 0.0 + 0.05 + 0.1) / 4)
    assert "| both seeds | test |" in (tmp_path / "sig.md").read_text()
