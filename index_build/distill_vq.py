"""Distill-VQ: learn the IVF centroids and PQ codebooks of a FAISS index by distillation.

Xiao et al., "Distill-VQ: Learning Retrieval Oriented Vector Quantization By Distilling
Knowledge from Dense Embeddings" (SIGIR 2022). FAISS trains IVF and PQ to minimize
reconstruction error; here the exact dense scores ``q . x`` are the teacher and the
centroids and codebooks are trained so that the scores of the *quantized* documents
(``q . x_hat``, and ``q . c(x)`` for the coarse stage) reproduce the teacher's ranking:
a listwise KL divergence over each query's candidates (the teacher's top-k plus random
documents). No relevance labels are needed: the queries may be training queries or
pseudo-queries made from the corpus.

Assignments are hard in the forward pass (exactly what FAISS will store) with a
straight-through soft gradient. The learned parameters are written back into the same
FAISS index (``IndexIVFPQ``, optionally behind an OPQ rotation) and the documents are
re-added, so FAISS itself re-assigns the codes and the service loads a regular index.

Status: the mechanics (differentiable IVF-PQ with straight-through hard codes, write-back,
FAISS re-assignment, save/load) are tested; on the synthetic problems tried so far the
learned codebooks do not yet rank better than FAISS's own training, so this stage is not
wired into the default build.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class DistillVQConfig:
    epochs: int = 30
    batch_queries: int = 64
    n_top: int = 100            # teacher top-k candidates per query
    n_random: int = 100         # plus random documents (the coarse stage must push those down)
    lr: float = 2e-3
    temperature: float = 0.05   # scores are cosines: divide by this before the softmax
    soft_temperature: float = 0.1  # of the soft assignments that carry the gradient
    coarse_weight: float = 1.0
    seed: int = 0


@dataclass
class IVFPQParts:
    """Views of an IVF-PQ index (behind an optional OPQ/linear pre-transform)."""

    index: Any
    ivf: Any
    transform: Any  # faiss.LinearTransform or None

    def apply_transform(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.transform.apply(x) if self.transform is not None else x

    def centroids(self) -> np.ndarray:
        return self.ivf.quantizer.reconstruct_n(0, self.ivf.nlist)

    def codebooks(self) -> np.ndarray:
        import faiss

        pq = self.ivf.pq
        return faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub).copy()


def index_parts(index) -> IVFPQParts:
    import faiss

    transform = None
    if isinstance(index, faiss.IndexPreTransform):
        chain: Any = index.chain
        if chain.size() != 1:
            raise ValueError("distill-vq supports at most one pre-transform (OPQ)")
        transform = faiss.downcast_VectorTransform(chain.at(0))
    found = faiss.try_extract_index_ivf(index)
    ivf = faiss.downcast_index(found) if found is not None else None
    if not isinstance(ivf, faiss.IndexIVFPQ) or not ivf.by_residual:
        raise ValueError(f"distill-vq needs an IndexIVFPQ encoding residuals, got {type(index).__name__}")
    if ivf.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError("distill-vq expects an inner-product index")
    return IVFPQParts(index, ivf, transform)


def assign(x: np.ndarray, centroids: np.ndarray, codebooks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FAISS's own assignment for an inner-product IVF-PQ: the list is the centroid with the
    largest inner product; each residual sub-vector takes its nearest (L2) codeword."""
    lists = np.argmax(x @ centroids.T, axis=1)
    residual = x - centroids[lists]
    m, _, dsub = codebooks.shape
    codes = np.empty((len(x), m), dtype=np.int64)
    for j in range(m):
        r = residual[:, j * dsub : (j + 1) * dsub]
        d2 = (r**2).sum(1, keepdims=True) - 2 * r @ codebooks[j].T + (codebooks[j] ** 2).sum(1)[None]
        codes[:, j] = np.argmin(d2, axis=1)
    return lists, codes


def reconstruct(centroids: np.ndarray, codebooks: np.ndarray, lists: np.ndarray, codes: np.ndarray) -> np.ndarray:
    m = codebooks.shape[0]
    parts = [codebooks[j][codes[:, j]] for j in range(m)]
    return centroids[lists] + np.concatenate(parts, axis=1)


def stored_codes(parts: IVFPQParts) -> tuple[np.ndarray, np.ndarray]:
    """``(list, codes)`` per document id, read from the index's inverted lists."""
    import faiss

    ivf = parts.ivf
    n = ivf.ntotal
    lists = np.full(n, -1, dtype=np.int64)
    codes = np.zeros((n, ivf.pq.M), dtype=np.int64)
    inv = ivf.invlists
    for lst in range(ivf.nlist):
        size = inv.list_size(lst)
        if not size:
            continue
        ids = faiss.rev_swig_ptr(inv.get_ids(lst), size).copy()
        raw = faiss.rev_swig_ptr(inv.get_codes(lst), size * ivf.code_size).copy().reshape(size, ivf.code_size)
        lists[ids] = lst
        codes[ids] = raw[:, : ivf.pq.M] if ivf.pq.nbits == 8 else _unpack(raw, ivf.pq.M, ivf.pq.nbits)
    return lists, codes


def _unpack(raw: np.ndarray, m: int, nbits: int) -> np.ndarray:
    bits = np.unpackbits(raw, axis=1, bitorder="little")[:, : m * nbits].reshape(len(raw), m, nbits)
    return (bits * (1 << np.arange(nbits))).sum(-1)


def write_back(parts: IVFPQParts, centroids: np.ndarray, codebooks: np.ndarray, vectors: np.ndarray) -> None:
    """Install learned centroids/codebooks and re-add ``vectors`` (FAISS re-assigns codes)."""
    import faiss

    ivf = parts.ivf
    ivf.quantizer.reset()
    ivf.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    faiss.copy_array_to_vector(np.ascontiguousarray(codebooks, dtype=np.float32).ravel(), ivf.pq.centroids)
    if hasattr(ivf.pq, "sync_transposed_centroids"):
        ivf.pq.sync_transposed_centroids()
    ivf.precomputed_table.resize(0)
    parts.index.reset()
    parts.index.add(np.ascontiguousarray(vectors, dtype=np.float32))


def distill(index, vectors: np.ndarray, queries: np.ndarray, cfg: DistillVQConfig | None = None,
            progress: bool = False) -> dict:
    """Learn the index's centroids and codebooks from ``queries`` against ``vectors`` (the
    documents in id order, as added to ``index``); writes them back in place."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    cfg = cfg or DistillVQConfig()
    parts = index_parts(index)
    x_np = parts.apply_transform(vectors)
    q_np = parts.apply_transform(queries)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    x = torch.from_numpy(x_np)
    q_all = torch.from_numpy(q_np)
    C = torch.nn.Parameter(torch.from_numpy(parts.centroids().copy()))
    P = torch.nn.Parameter(torch.from_numpy(parts.codebooks()))
    m, ksub, dsub = P.shape
    opt = torch.optim.Adam([C, P], lr=cfg.lr)
    n_top = min(cfg.n_top, len(x_np))
    teacher_all = q_all @ x.T
    top = torch.topk(teacher_all, n_top, dim=1).indices
    history = []
    steps_per_epoch = math.ceil(len(q_np) / cfg.batch_queries)
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="distill-vq", disable=not progress)
    for _epoch in range(cfg.epochs):
        order = rng.permutation(len(q_np))
        for start in range(0, len(order), cfg.batch_queries):
            qi = torch.from_numpy(order[start : start + cfg.batch_queries])
            rand = torch.from_numpy(rng.integers(0, len(x_np), size=(len(qi), cfg.n_random)))
            cand = torch.cat([top[qi], rand], dim=1)                      # [B, K]
            docs = torch.unique(cand)
            pos = torch.searchsorted(docs, cand)
            xd = x[docs]                                                   # [D, d]
            # coarse: hard argmax list (what FAISS stores) with a soft straight-through gradient
            logits_c = xd @ C.T / cfg.soft_temperature
            hard_c = F.one_hot(logits_c.argmax(1), C.shape[0]).to(xd.dtype)
            soft_c = logits_c.softmax(1)
            c_hat = (hard_c + soft_c - soft_c.detach()) @ C                 # [D, d]
            residual = (xd - c_hat).view(len(docs), m, dsub)
            d2 = ((residual**2).sum(-1, keepdim=True) - 2 * torch.einsum("nmd,mkd->nmk", residual, P)
                  + (P**2).sum(-1).unsqueeze(0))                             # [D, m, ksub]
            hard_p = F.one_hot(d2.argmin(-1), ksub).to(xd.dtype)
            soft_p = (-d2 / cfg.soft_temperature).softmax(-1)
            w = hard_p + soft_p - soft_p.detach()
            r_hat = torch.einsum("nmk,mkd->nmd", w, P).reshape(len(docs), -1)
            x_hat = c_hat + r_hat
            qb = q_all[qi]                                                 # [B, d]
            t = torch.gather(teacher_all[qi], 1, cand) / cfg.temperature
            s = torch.gather(qb @ x_hat.T, 1, pos) / cfg.temperature
            sc = torch.gather(qb @ c_hat.T, 1, pos) / cfg.temperature
            p_t = t.softmax(1)
            loss = F.kl_div(s.log_softmax(1), p_t, reduction="batchmean")
            loss = loss + cfg.coarse_weight * F.kl_div(sc.log_softmax(1), p_t, reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(history[-steps_per_epoch:]):.4f}")
    bar.close()
    write_back(parts, C.detach().numpy(), P.detach().numpy(), vectors)
    return {"config": asdict(cfg), "steps": len(history), "loss_first_epoch": float(np.mean(history[:steps_per_epoch])),
            "loss_last_epoch": float(np.mean(history[-steps_per_epoch:]))}
