from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from index_build.losses import in_batch_negatives, margin_mse  # noqa: E402


def test_margin_mse_matches_hand_computation():
    s_pos = torch.tensor([[2.0, 2.0], [1.0, 1.0]])
    s_neg = torch.tensor([[1.0, 0.0], [3.0, 1.0]])
    t_pos = torch.tensor([[4.0, 4.0], [0.0, 0.0]])
    t_neg = torch.tensor([[2.0, 3.0], [1.0, -1.0]])
    # student margins 1, 2, -2, 0; teacher margins 2, 1, -1, 1 -> errors -1, 1, -1, -1 -> mean of squares 1
    assert margin_mse(s_pos, s_neg, t_pos, t_neg).item() == pytest.approx(1.0)
    s_neg2 = torch.tensor([[0.0, 0.0], [3.0, 1.0]])  # first error becomes 0: (0 + 1 + 1 + 1) / 4
    assert margin_mse(s_pos, s_neg2, t_pos, t_neg).item() == pytest.approx(0.75)


def test_margin_mse_checks_shapes():
    with pytest.raises(ValueError, match="same shape"):
        margin_mse(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(2))


def test_margin_mse_is_zero_for_shifted_scores():
    s = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.0])
    t = (s[0] + 10, s[1] + 10)  # the same margins on another scale offset
    assert margin_mse(*s, *t).item() == pytest.approx(0.0)


def test_in_batch_negatives_prefers_diagonal():
    q = torch.eye(3)
    good = in_batch_negatives(q, torch.eye(3), torch.arange(3))
    bad = in_batch_negatives(q, torch.eye(3)[[1, 2, 0]], torch.arange(3))
    assert good < bad


def test_inverse_cloze_cuts_the_query_out_of_the_positive_only():
    import random

    import numpy as np

    from index_build.sampling import Example
    from index_build.train import batch_inputs

    texts = ["Heart study. Aspirin lowers risk in adults. Trial of 400 people.", "Aspirin lowers risk in adults.",
             "Other paper. Aspirin lowers risk in adults. Unrelated.", "Nothing here."]
    ex = Example("p1", "Aspirin lowers risk in adults.", pool=np.array([0, 2, 3]), teacher=np.array([3.0, 1.0, 0.5]),
                 positives=[0], negatives=[1, 2])
    kept, _ = batch_inputs([ex], texts, 2, random.Random(0))
    assert kept[0][0] == texts[0]
    cut, teacher = batch_inputs([ex], texts, 2, random.Random(0), ict_remove=1.0)
    assert cut[0][0] == "Heart study. Trial of 400 people."
    assert sorted(cut[0][1:]) == sorted(texts[2:4])  # negatives keep their copy
    assert teacher[0][0] == 3.0
    # a positive that is only the query is left whole (no empty document)
    whole = Example("p2", texts[1], pool=np.array([1, 3]), teacher=np.array([2.0, 0.0]), positives=[0], negatives=[1])
    assert batch_inputs([whole], texts, 1, random.Random(0), ict_remove=1.0)[0][0][0] == texts[1]
    # about ict_remove of the batches are cut
    rng = random.Random(1)
    n_cut = sum(batch_inputs([ex], texts, 2, rng, ict_remove=0.5)[0][0][0] != texts[0] for _ in range(400))
    assert 150 < n_cut < 250
