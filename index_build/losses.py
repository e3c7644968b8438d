"""Distillation losses as pure functions on score tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def margin_mse(student_pos: torch.Tensor, student_neg: torch.Tensor,
               teacher_pos: torch.Tensor, teacher_neg: torch.Tensor) -> torch.Tensor:
    """Margin-MSE (Hofstätter et al. 2020, arXiv 2010.02666).

    ``mean(((s_pos - s_neg) - (t_pos - t_neg)) ** 2)`` over all pairs; the four tensors
    must have the same shape (e.g. ``[batch]`` or ``[batch, n_negatives]``).

    >>> margin_mse(torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([5.0]), torch.tensor([4.0])).item()
    1.0
    """
    shapes = {t.shape for t in (student_pos, student_neg, teacher_pos, teacher_neg)}
    if len(shapes) != 1:
        raise ValueError(
            "margin_mse: all inputs must have the same shape, got "
            f"s_pos {tuple(student_pos.shape)}, s_neg {tuple(student_neg.shape)}, "
            f"t_pos {tuple(teacher_pos.shape)}, t_neg {tuple(teacher_neg.shape)}"
        )
    return F.mse_loss(student_pos - student_neg, teacher_pos - teacher_neg)


def in_batch_negatives(query_emb: torch.Tensor, doc_emb: torch.Tensor, positive_index: torch.Tensor,
                       scale: float = 20.0) -> torch.Tensor:
    """Cross-entropy of each query against every document in the batch (InfoNCE).

    ``query_emb [B, d]``, ``doc_emb [N, d]``, ``positive_index [B]`` (row of each query's positive).
    """
    if query_emb.shape[0] != positive_index.shape[0]:
        raise ValueError("in_batch_negatives: one positive index per query is required")
    logits = scale * query_emb @ doc_emb.T
    return F.cross_entropy(logits, positive_index)
