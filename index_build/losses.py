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


def alignment_mse(student_queries: torch.Tensor, teacher_queries: torch.Tensor) -> torch.Tensor:
    """Squared distance between the student's and the teacher's query vectors, summed over
    dimensions and averaged over queries (KALE, Campos et al. 2023; query-encoder distillation
    by embedding alignment, Wang et al. 2023). For concatenated unit-norm parts it is
    ``sum_i 2 - 2 cos(s_i, t_i)``.

    >>> alignment_mse(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])).item()
    2.0
    """
    if student_queries.shape != teacher_queries.shape:
        raise ValueError(f"alignment_mse: student {tuple(student_queries.shape)} vs teacher "
                         f"{tuple(teacher_queries.shape)}")
    return ((student_queries - teacher_queries) ** 2).sum(-1).mean()


def listwise_kl(student_scores: torch.Tensor, teacher_scores: torch.Tensor, scale: float = 1.0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) between the softmax distributions over each query's candidates
    (``[batch, n]`` scores; the student's multiplied by ``scale``), averaged over queries.
    ``mask`` (``[batch, n]`` booleans) leaves padded candidates out.

    >>> listwise_kl(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 0.0]])).item()
    0.0
    """
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(f"listwise_kl: student {tuple(student_scores.shape)} vs teacher "
                         f"{tuple(teacher_scores.shape)}")
    s = scale * student_scores
    t = teacher_scores
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
        t = t.masked_fill(~mask, float("-inf"))
    log_p_t = F.log_softmax(t, dim=-1)
    log_p_s = F.log_softmax(s, dim=-1)
    terms = torch.where(torch.isfinite(log_p_t), log_p_t.exp() * (log_p_t - log_p_s), torch.zeros_like(t))
    return terms.sum(-1).mean()
