"""benchmarks/query_log_loop.py: which claims are sent and which held out, and the rows read
from a build's per-query scores (the builds and the service run in the benchmark only)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer

from benchmarks.query_log_loop import split_claims, summarize


def test_sent_claims_and_holdout_split_the_training_claims(tiny_beir):
    from index_build.data import load_collection

    train = load_collection(tiny_beir, splits=["train"]).split_queries("train")
    sent, holdout = split_claims(tiny_beir, 5)
    assert len(sent) == 5 and len(holdout) == len(train) - 5
    assert {q for q, _ in sent} | set(holdout) == set(train) and not {q for q, _ in sent} & set(holdout)
    assert all(train[q] == text for q, text in sent)
    assert split_claims(tiny_beir, 5) == (sent, holdout)  # seeded
    with pytest.raises(typer.BadParameter):
        split_claims(tiny_beir, len(train))


def test_a_held_out_claim_repeating_a_sent_one_is_left_out(tmp_path, tiny_beir):
    import shutil

    from index_build.data import load_collection

    data = tmp_path / "beir"
    shutil.copytree(tiny_beir, data)
    train = load_collection(data, splits=["train"]).split_queries("train")
    sent, holdout = split_claims(data, 5)
    twin = holdout[0]  # give a held-out claim the text of a sent one, in other case
    lines = [json.loads(line) for line in (data / "queries.jsonl").read_text().splitlines() if line.strip()]
    for q in lines:
        if q["_id"] == twin:
            q["text"] = sent[0][1].upper()
    (data / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in lines))
    sent2, holdout2 = split_claims(data, 5)
    assert sent2 == sent and holdout2 == [q for q in holdout if q != twin] and len(train) == len(holdout) + 5


def test_rows_over_test_holdout_and_both_come_from_the_per_query_scores():
    rng = np.random.default_rng(0)
    rows = ["base-dense", "teacher", "asym-dense", "served-default"]
    test = {r: {f"t{i}": float(v) for i, v in enumerate(rng.uniform(0, 1, 6))} for r in rows}
    # the training split as a build that logged claims x0 and x1 evaluates it: the others only
    train = {r: {f"x{i}": float(v) for i, v in enumerate(rng.uniform(0, 1, 8)) if i >= 2} for r in rows}
    holdout = ["x5", "x3", "x7"]
    out = summarize({"collection": test, "splits": {"train": train}}, holdout)
    assert out["test"]["queries"] == 6 and out["holdout"]["queries"] == 3 and out["test+holdout"]["queries"] == 9
    for r in rows:
        assert out["test"]["nDCG@10"][r] == pytest.approx(np.mean(list(test[r].values())), abs=1e-4)
        assert out["holdout"]["nDCG@10"][r] == pytest.approx(np.mean([train[r][q] for q in holdout]), abs=1e-4)
        both = list(test[r].values()) + [train[r][q] for q in holdout]
        assert out["test+holdout"]["nDCG@10"][r] == pytest.approx(np.mean(both), abs=1e-4)
    pair = out["test+holdout"]["pairs"]["asym-dense - base-dense"]
    diff = np.mean([test["asym-dense"][q] - test["base-dense"][q] for q in test["asym-dense"]]
                   + [train["asym-dense"][q] - train["base-dense"][q] for q in holdout])
    assert pair["diff"] == pytest.approx(diff, abs=1e-4) and pair["queries"] == 9 and pair["margin"] == 0.02
    assert out["holdout"]["pairs"]["served-default - teacher"]["margin"] == -0.005
    # every training claim the build evaluated (those it did not log)
    assert out["unlogged"]["queries"] == 6
    assert out["unlogged"]["nDCG@10"]["asym-dense"] == pytest.approx(np.mean(list(train["asym-dense"].values())),
                                                                       abs=1e-4)


def test_gains_against_the_corpus_only_build_pair_the_same_claims():
    rng = np.random.default_rng(1)
    rows = ["base-dense", "asym-dense", "served-default"]

    def build():
        return {"collection": {r: {f"t{i}": float(v) for i, v in enumerate(rng.uniform(0, 1, 5))} for r in rows},
                "splits": {"train": {r: {f"x{i}": float(v) for i, v in enumerate(rng.uniform(0, 1, 6))}
                                     for r in rows}}}

    before, after = build(), build()
    holdout = ["x4", "x1"]
    gains = summarize(after, holdout, before)["test+holdout"]["against_corpus_only"]
    assert set(gains) == {"asym-dense", "served-default"}
    for r in gains:
        diff = [after["collection"][r][q] - before["collection"][r][q] for q in before["collection"][r]]
        diff += [after["splits"]["train"][r][q] - before["splits"]["train"][r][q] for q in holdout]
        assert gains[r]["diff"] == pytest.approx(np.mean(diff), abs=1e-4) and gains[r]["queries"] == 7
    assert "against_corpus_only" not in summarize(after, holdout)["test"]
    # the claims a build did not log, paired with the corpus-only build's scores on those claims
    del after["splits"]["train"]["asym-dense"]["x0"], after["splits"]["train"]["served-default"]["x0"]
    del after["splits"]["train"]["base-dense"]["x0"]
    unlogged = summarize(after, holdout, before)["unlogged"]["against_corpus_only"]["asym-dense"]
    ids = [f"x{i}" for i in range(1, 6)]
    assert unlogged["queries"] == 5 and unlogged["diff"] == pytest.approx(
        np.mean([after["splits"]["train"]["asym-dense"][q] - before["splits"]["train"]["asym-dense"][q] for q in ids]),
        abs=1e-4)
