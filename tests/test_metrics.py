"""Metrics helpers: per-query nDCG and the one-standard-error choice of fusion weights."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from index_build.metrics import Scores, metrics, one_se_choice, per_query_ndcg


def test_per_query_ndcg_matches_a_hand_computation_and_the_aggregate():
    qrels = {"q1": {"a": 1}, "q2": {"b": 2, "c": 1}, "q3": {"d": 1}}
    run = {"q1": {"x": 2.0, "a": 1.0}, "q2": {"b": 3.0, "c": 2.0}}  # q3 retrieved nothing
    got = per_query_ndcg(qrels, run, ["q1", "q2", "q3"])
    # q1: the relevant doc at rank 2 -> 1/log2(3); q2: ideal order -> 1; q3: missing -> 0
    np.testing.assert_allclose(got, [1 / math.log2(3), 1.0, 0.0], atol=1e-6)
    # the aggregate is over every judged query, a missed one counting 0
    assert metrics(qrels, run)["nDCG@10"] == pytest.approx(round(got.mean(), 4), abs=1e-4)


def test_metrics_keep_each_judged_querys_ndcg_beside_the_aggregates():
    qrels = {"q1": {"a": 1}, "q2": {"b": 2, "c": 1}, "q3": {"d": 1}}
    run = {"q1": {"x": 2.0, "a": 1.0}, "q2": {"b": 3.0, "c": 2.0}, "q9": {"a": 1.0}}  # q9 is not judged
    m = metrics(qrels, run)
    assert isinstance(m, Scores) and set(m) == {"nDCG@10", "RR@10", "R@100"}
    assert m.per_query == pytest.approx({"q1": 1 / math.log2(3), "q2": 1.0, "q3": 0.0}, abs=1e-6)
    assert m["nDCG@10"] == pytest.approx(np.mean(list(m.per_query.values())), abs=1e-4)
    # a copy keeps them; the results files hold the aggregates alone
    assert m.copy().per_query == m.per_query and isinstance(m.copy(), Scores)
    assert json.loads(json.dumps(m)) == dict(m)


def test_one_se_choice_keeps_the_prior_unless_the_dev_slice_separates_the_settings():
    n = 80
    saturated = np.ones(n)
    one_query_worse = np.ones(n)
    one_query_worse[7] = 0.63  # one query of 80 loses 0.37: within one standard error
    assert one_se_choice({0.0: saturated, 0.5: one_query_worse, 1.0: one_query_worse - 0.2}, prior=0.5) == 0.5
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.9, n)
    clearly_better = base + 0.1  # every query gains: far beyond one standard error
    assert one_se_choice({0.5: base, 0.8: clearly_better}, prior=0.5) == 0.8
    # ties between qualifying settings equally far from the prior go to the higher mean
    assert one_se_choice({0.4: base, 0.6: base + 0.001}, prior=0.5) == 0.6
    with pytest.raises(ValueError):
        one_se_choice({}, prior=0.5)
