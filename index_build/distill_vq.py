"""Distill-VQ: learn the IVF centroids and PQ codebooks of a FAISS index by distillation.

Xiao et al., "Distill-VQ: Learning Retrieval Oriented Vector Quantization By Distilling
Knowledge from Dense Embeddings" (SIGIR 2022). FAISS trains IVF and PQ to minimize
reconstruction error; here the exact dense scores ``q . x`` are the teacher and the
centroids and codebooks are trained so that the scores of the *quantized* documents
(``q . x_hat``, and ``q . c(x)`` for the coarse stage) reproduce the teacher's ranking: a
listwise KL divergence over each query's candidates. No relevance labels are needed: the
queries may be training queries or pseudo-queries made from the corpus.

Candidates: on corpora up to :attr:`DistillVQConfig.full_corpus_max` documents every query
is scored against every document (the quantization errors that matter for recall@100 are
the far documents that climb into the top, which a top-k sample never shows); larger
corpora use the teacher's top-``n_top`` plus ``n_random`` random documents per query.

Assignments are hard in the forward pass (exactly what FAISS will store) with a
straight-through soft gradient. The learned parameters are written back into the same
FAISS index (``IndexIVFPQ``, optionally behind an OPQ rotation) and the documents are
re-added, so FAISS itself re-assigns the codes and the service loads a regular index.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

QUERY_SOURCES = ("auto", "pseudo")
#: Largest ``[documents, M, ksub]`` assignment tensor built per training step (float32
#: elements, 256 MiB; a step holds a few of them for autograd). Bounds full-corpus mode and
#: the query batch of sampled mode, e.g. for the default ``PQ192x8`` index.
MAX_ASSIGN_ELEMENTS = 64 * 2**20


@dataclass
class DistillVQConfig:
    """The ``distill-vq`` build step (``[index.distill_vq]`` in the build config)."""

    enabled: bool = False
    #: ``auto``: the training queries (pseudo-queries on a label-free build); ``pseudo``:
    #: titles and salient sentences of the documents (no queries or labels used at all).
    queries: str = "auto"
    max_queries: int = 20_000
    steps: int = 300
    batch_queries: int = 64
    full_corpus_max: int = 20_000
    n_top: int = 200            # larger corpora: the teacher's top-k per query ...
    n_random: int = 200         # ... plus random documents
    lr: float = 5e-4
    temperature: float = 0.3    # scores are cosines: divided by this before the softmax
    soft_temperature: float = 0.1  # of the soft assignments that carry the gradient
    coarse_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad setting (also run after a config file is merged)."""
        if self.queries not in QUERY_SOURCES:
            raise ValueError(f"distill_vq.queries must be one of {', '.join(QUERY_SOURCES)}, got {self.queries!r}")
        for name in ("max_queries", "steps", "batch_queries", "n_top"):
            if getattr(self, name) <= 0:
                raise ValueError(f"distill_vq.{name} must be positive, got {getattr(self, name)}")
        if self.temperature <= 0 or self.soft_temperature <= 0 or self.lr <= 0:
            raise ValueError("distill_vq: lr, temperature and soft_temperature must be positive")

    def training_settings(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "enabled"}


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


def _quantize(xd, C, P, soft_temperature: float):
    """``(x_hat, c_hat)`` of documents ``xd`` under centroids ``C`` and codebooks ``P``: hard
    assignments as FAISS makes them, with straight-through soft-assignment gradients."""
    import torch
    import torch.nn.functional as F

    m, ksub, dsub = P.shape
    logits_c = xd @ C.T
    hard_c = F.one_hot(logits_c.argmax(1), C.shape[0]).to(xd.dtype)
    soft_c = (logits_c / soft_temperature).softmax(1)
    c_hat = (hard_c + soft_c - soft_c.detach()) @ C
    residual = (xd - c_hat).view(len(xd), m, dsub)
    d2 = ((residual**2).sum(-1, keepdim=True) - 2 * torch.einsum("nmd,mkd->nmk", residual, P)
          + (P**2).sum(-1).unsqueeze(0))
    hard_p = F.one_hot(d2.argmin(-1), ksub).to(xd.dtype)
    soft_p = (-d2 / soft_temperature).softmax(-1)
    w = hard_p + soft_p - soft_p.detach()
    return c_hat + torch.einsum("nmk,mkd->nmd", w, P).reshape(len(xd), -1), c_hat


def distill(index, vectors: np.ndarray, queries: np.ndarray, cfg: DistillVQConfig | None = None,
            progress: bool = False) -> dict[str, Any]:
    """Learn the index's centroids and codebooks from ``queries`` against ``vectors`` (the
    documents in id order, as added to ``index``); writes them back in place and returns a
    record of the training (settings, loss at the start and the end, seconds)."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from models.dense_index import exact_search

    cfg = cfg or DistillVQConfig()
    parts = index_parts(index)
    if len(vectors) != parts.index.ntotal:
        raise ValueError(f"{len(vectors)} vectors for an index holding {parts.index.ntotal}")
    if len(queries) == 0:
        raise ValueError("distill-vq needs at least one query")
    t0 = time.perf_counter()
    x_np = parts.apply_transform(vectors)
    q_np = parts.apply_transform(queries)
    n = len(x_np)
    m, ksub = parts.ivf.pq.M, parts.ivf.pq.ksub
    full = n <= cfg.full_corpus_max and n * m * ksub <= MAX_ASSIGN_ELEMENTS
    batch = cfg.batch_queries
    if not full:
        batch = max(1, min(batch, MAX_ASSIGN_ELEMENTS // ((cfg.n_top + cfg.n_random) * m * ksub)))
        if batch < cfg.batch_queries:
            log.warning("distill-vq: %d queries per step instead of %d (memory bound for PQ%dx%d)",
                        batch, cfg.batch_queries, m, parts.ivf.pq.nbits)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    x = torch.from_numpy(x_np)
    q_all = torch.from_numpy(q_np)
    top = None if full else torch.from_numpy(exact_search(x_np, q_np, min(cfg.n_top, n))[1])
    C = torch.nn.Parameter(torch.from_numpy(parts.centroids().copy()))
    P = torch.nn.Parameter(torch.from_numpy(parts.codebooks()))
    opt = torch.optim.Adam([C, P], lr=cfg.lr)
    history: list[float] = []
    order = rng.permutation(len(q_np))
    cursor = 0
    bar = tqdm(range(cfg.steps), desc="distill-vq", disable=not progress)
    for _step in bar:
        if cursor + batch > len(order) and cursor > 0:
            order, cursor = rng.permutation(len(q_np)), 0
        qi = torch.from_numpy(order[cursor : cursor + batch])
        cursor += batch
        qb = q_all[qi]
        if full:
            x_hat, c_hat = _quantize(x, C, P, cfg.soft_temperature)
            t, s, sc = qb @ x.T, qb @ x_hat.T, qb @ c_hat.T
        else:
            assert top is not None
            rand = torch.from_numpy(rng.integers(0, n, size=(len(qi), cfg.n_random)))
            cand = torch.cat([top[qi], rand], dim=1)                            # [B, K]
            docs, pos = torch.unique(cand, return_inverse=True)
            x_hat, c_hat = _quantize(x[docs], C, P, cfg.soft_temperature)
            t = torch.einsum("bd,bkd->bk", qb, x[cand])
            s = torch.gather(qb @ x_hat.T, 1, pos)
            sc = torch.gather(qb @ c_hat.T, 1, pos)
        p_t = (t / cfg.temperature).softmax(1)
        loss = F.kl_div((s / cfg.temperature).log_softmax(1), p_t, reduction="batchmean")
        loss = loss + cfg.coarse_weight * F.kl_div((sc / cfg.temperature).log_softmax(1), p_t,
                                                   reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(history[-20:]):.4f}")
    write_back(parts, C.detach().numpy(), P.detach().numpy(), vectors)
    window = max(1, len(history) // 10)
    return {"method": "distill-vq", "settings": cfg.training_settings(), "n_queries": int(len(q_np)),
            "candidates": "all documents" if full else f"teacher top-{cfg.n_top} + {cfg.n_random} random",
            "batch_queries": batch, "steps": len(history), "loss_start": float(np.mean(history[:window])),
            "loss_end": float(np.mean(history[-window:])), "seconds": round(time.perf_counter() - t0, 1)}
