"""benchmarks/kl_targets.py: the teacher's softmax over a pool, against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.kl_targets import distribution_stats, matching_temperature


def test_distribution_stats_match_hand_computations():
    t = [np.array([2.0, 0.0, 0.0]), np.array([0.0, 0.0])]
    s = [np.array([0.0, 0.0, 0.0]), np.array([0.0, 0.0])]
    pools = [np.array([7, 3, 5]), np.array([1, 2])]
    r = distribution_stats(t, s, pools, sources=[3, 1])
    p = np.exp([2.0, 0.0, 0.0]) / np.exp([2.0, 0.0, 0.0]).sum()
    ent = -(p * np.log(p)).sum()
    assert r["queries"] == 2 and r["pool"] == 2.5
    assert r["top1_mass"] == pytest.approx((p[0] + 0.5) / 2, abs=1e-4)
    assert r["entropy"] == pytest.approx((ent + np.log(2)) / 2, abs=1e-4)
    assert r["effective_candidates"] == pytest.approx((np.exp(ent) + 2) / 2, abs=1e-4)
    # KL to a uniform student: log(n) - entropy per query
    assert r["kl_to_base"] == pytest.approx((np.log(3) - ent + 0.0) / 2, abs=1e-4)
    # source 3 is second in the first pool, source 1 ties first in the second (argmax: the first)
    assert r["source_first"] == 0.5 and r["source_mass"] == pytest.approx((p[1] + 0.5) / 2, abs=1e-4)
    assert "source_first" not in distribution_stats(t, s, pools, None)
    # a higher temperature flattens the teacher
    assert distribution_stats(t, s, pools, None, temperature=4.0)["top1_mass"] < r["top1_mass"]


def test_matching_temperature_brings_the_top1_mass_to_the_target():
    rng = np.random.default_rng(0)
    peaked = [np.concatenate([[12.0], rng.normal(0, 1, 99)]) for _ in range(20)]
    temp = matching_temperature(peaked, 0.3)
    assert temp > 1
    at = distribution_stats(peaked, peaked, [np.arange(100)] * 20, None, temp)
    assert at["top1_mass"] == pytest.approx(0.3, abs=1e-3)
