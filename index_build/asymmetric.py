"""Asymmetric distillation: a query encoder trained into the teacher's document space.

The teacher's dense members (bi-encoders) encode every document once; their normalized
embeddings, concatenated, are the document vectors the index holds (:class:`TeacherSpace`).
The teacher's own query vector in that space, ``[q_1; ...; q_m]``, scores a document with
the sum of the members' cosines. The student (:class:`index_build.students.AsymmetricStudent`)
learns to produce that vector from the query alone:

- ``alignment_mse`` to the teacher's query vector, and
- ``listwise_kl`` to the full teacher (BM25 included, per-query z-scores summed) over each
  training query's candidate pool (the union of the members' and BM25's top candidates), or
  (``kl_target = "dense"``) to its bi-encoder members alone (:func:`member_scores`), leaving
  BM25 to the per-part hybrid. The full teacher is the default: on Cranfield and SciFact it
  gives both the better student and the better hybrid, on the TREC DL pools the dense
  members alone give the better hybrid (``label-free.json``, the ``*-kldense`` entries).

Documents are fixed vectors, so a training step runs only short queries through the
network, and the student can see every pseudo-query a corpus yields.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from index_build.config import AsymmetricConfig
from index_build.teachers import BiEncoderTeacher
from models.dense_index import exact_search
from models.fusion import normalize
from models.sparse_index import BM25Index

if TYPE_CHECKING:
    from index_build.students import AsymmetricStudent


class TeacherSpace:
    """The document space of a teacher's dense members: per document, the concatenation of
    the members' (unit-norm) embeddings."""

    def __init__(self, members: Sequence[BiEncoderTeacher]) -> None:
        if not members:
            raise ValueError("a teacher space needs at least one bi-encoder member")
        self.members = list(members)

    @property
    def dims(self) -> list[int]:
        return [m.encoder.dim for m in self.members]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def doc_parts(self) -> list[np.ndarray]:
        """Each member's ``[n_docs, dim_i]`` document embeddings (encoded once, cached)."""
        return [np.ascontiguousarray(m.doc_embeddings, dtype=np.float32) for m in self.members]

    def doc_vectors(self) -> np.ndarray:
        """``[n_docs, sum(dims)]``: the members' document embeddings side by side."""
        return np.hstack(self.doc_parts())

    def doc_vectors_at(self, idx: np.ndarray) -> np.ndarray:
        """:meth:`doc_vectors`' rows ``idx``, encoding only those documents not yet encoded."""
        return np.hstack([m.embeddings(idx) for m in self.members])

    def query_parts(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(m.encode_queries(texts), dtype=np.float32) for m in self.members]

    def query_vectors(self, texts: list[str]) -> np.ndarray:
        """The teacher's query vectors: dotted with :meth:`doc_vectors`, the members' cosines summed."""
        return np.hstack(self.query_parts(texts))


def candidate_union(query_parts: list[np.ndarray], doc_parts: list[np.ndarray], bm25: BM25Index | None,
                    texts: list[str], depth: int) -> list[np.ndarray]:
    """Per query, the union (sorted corpus indices) of each dense member's top-``depth``
    documents and, with ``bm25``, BM25's."""
    tops = [exact_search(d, q, depth)[1] for q, d in zip(query_parts, doc_parts)]
    if bm25 is not None:
        _, bm_top = bm25.search(texts, depth)
        tops.append(bm_top)
    return [np.unique(np.concatenate([t[r][t[r] >= 0] for t in tops])).astype(np.int64) for r in range(len(texts))]


def member_scores(query_parts: list[np.ndarray], doc_parts: list[np.ndarray], pools: list[np.ndarray],
                  weights: Sequence[float]) -> list[np.ndarray]:
    """Per query, the teacher's score of each candidate without its BM25 term: its bi-encoder
    members' per-query z-scores over the pool, summed at the members' teacher ``weights``."""
    if len(weights) != len(query_parts):
        raise ValueError(f"{len(weights)} weights for {len(query_parts)} members")
    return [np.sum([w * normalize(d[pool] @ q[r]) for w, q, d in zip(weights, query_parts, doc_parts)],
                   axis=0).astype(np.float32)
            for r, pool in enumerate(pools)]


def teacher_pools(query_parts: list[np.ndarray], doc_parts: list[np.ndarray], bm25: BM25Index,
                  texts: list[str], depth: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per query, :func:`candidate_union` and the full teacher's score of each candidate: the
    equal-weight sum of the members' and BM25's per-query z-scores over that pool."""
    pools = candidate_union(query_parts, doc_parts, bm25, texts, depth)
    dense = member_scores(query_parts, doc_parts, pools, [1.0] * len(query_parts))
    return pools, [(d + normalize(bm25.scores(text)[pool])).astype(np.float32)
                   for d, text, pool in zip(dense, texts, pools)]


def init_maps_by_ridge(student: AsymmetricStudent, texts: list[str], query_parts: list[np.ndarray],
                       batch: int = 128, head_epochs: int = 8, seed: int = 13,
                       progress: bool = False) -> dict[str, Any]:
    """Start the student's head on ``texts`` (:func:`fit_head` of the frozen model's
    :func:`pooled_features`)."""
    return fit_head(student, *pooled_features(student, texts, batch, progress), query_parts, head_epochs, seed,
                    progress)


def pooled_features(student: AsymmetricStudent, texts: list[str], batch: int = 128,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """What the head reads, per text: the pooled embedding ``u`` and, for a ``layers-mlp``
    head, every layer's pooled states (None for a linear head); in eval mode."""
    from tqdm import tqdm

    student.eval()
    pooled, feats = [], []
    for i in tqdm(range(0, len(texts), batch), desc="asymmetric student: frozen states", unit="batch",
                  disable=not progress):
        if student.residuals:
            u, f = student.encode_features(texts[i : i + batch])
            feats.append(f.numpy())
        else:
            u = student.encode_pooled(texts[i : i + batch])
        pooled.append(u.numpy())
    return np.concatenate(pooled), (np.concatenate(feats) if feats else None)


def fit_head(student: AsymmetricStudent, pooled: np.ndarray, features: np.ndarray | None,
             query_parts: list[np.ndarray], head_epochs: int = 8, seed: int = 13,
             progress: bool = False) -> dict[str, Any]:
    """Start each member's map at the ridge regression from the pooled query embeddings
    ``pooled`` to that member's query embeddings (:func:`index_build.students.ridge_map`);
    with the ``layers-mlp`` head, set the features' standardization from ``features`` and fit
    the residual MLPs for ``head_epochs`` passes (:func:`fit_residuals`). Returns the mean
    cosine of each part to the member's after each step (``ridge``, ``residual``)."""
    import torch

    from index_build.students import ridge_map

    maps = [ridge_map(pooled, part) for part in query_parts]
    student.set_maps(maps)
    record = {"ridge": [mean_cosine(pooled @ w, part) for w, part in zip(maps, query_parts)]}
    if student.residuals:
        if features is None:
            raise ValueError("a layers-mlp head needs the layer features")
        with torch.no_grad():
            student.feature_mean.copy_(torch.from_numpy(features.mean(0)))
            student.feature_scale.copy_(torch.from_numpy(features.std(0) + 1e-6))
        record["residual"] = fit_residuals(student, pooled, features, query_parts, head_epochs, seed,
                                           progress=progress)
    return record


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The mean cosine of the rows of ``a`` to those of ``b`` (4 decimals)."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return round(float(np.mean(np.sum(a * b, 1))), 4)


def fit_residuals(student: AsymmetricStudent, pooled: np.ndarray, features: np.ndarray,
                  query_parts: list[np.ndarray], epochs: int, seed: int = 13, batch: int = 256,
                  lr: float = 1e-3, progress: bool = False) -> list[float]:
    """Fit the student's residual MLPs with the transformer frozen (linear probing before
    fine-tuning, Kumar et al. 2022): on the frozen model's ``pooled`` embeddings and layer
    ``features`` (:func:`pooled_features`), maximize the cosine of each part to the member's
    query embedding in ``query_parts``, the maps fixed. About a minute for 20,000 queries on
    2 cores. Returns each part's mean cosine after fitting."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    u = torch.from_numpy(np.ascontiguousarray(pooled, dtype=np.float32))
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    x = (x - student.feature_mean) / student.feature_scale
    cosines: list[float] = []
    for m, r, part in zip(student.maps, student.residuals, query_parts):
        y = F.normalize(torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32)), dim=-1)
        with torch.no_grad():
            base = m(u)
        opt = torch.optim.AdamW(r.parameters(), lr=lr, weight_decay=0.01)
        r.train()
        for _ in tqdm(range(epochs), desc=f"asymmetric student: residual MLP {len(cosines) + 1}/{len(query_parts)}",
                      unit="pass", disable=not progress):
            for i in torch.randperm(len(u), generator=gen).split(batch):
                loss = (1 - (F.normalize(base[i] + r(x[i]), dim=-1) * y[i]).sum(-1)).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        r.eval()
        with torch.no_grad():
            cosines.append(round(float((F.normalize(base + r(x), dim=-1) * y).sum(-1).mean()), 4))
    return cosines


def encode_queries(student: AsymmetricStudent, texts: list[str], batch: int = 128) -> np.ndarray:
    """The student's query vectors (texts batched by length)."""
    import torch

    student.eval()
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), student.config.dim), np.float32)
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            idx = order[start : start + batch]
            out[idx] = student.encode_queries([texts[i] for i in idx]).numpy()
    return out


def train_asymmetric(
    student: AsymmetricStudent, texts: list[str], q_teacher: np.ndarray, pools: list[np.ndarray],
    t_scores: list[np.ndarray], docs: np.ndarray, cfg: AsymmetricConfig,
    dev_eval: Callable[[AsymmetricStudent], float] | None, log: list[dict[str, Any]],
    progress: bool = False, draws: np.ndarray | None = None, sources: np.ndarray | None = None,
) -> dict[str, Any]:
    """Alignment MSE to ``q_teacher`` plus ``cfg.kl_weight`` times the listwise KL to the
    teacher's pool scores. Keeps (``cfg.checkpoint``) the parameters that scored best on
    ``dev_eval`` (without one, the last), or the average of those at the checks in the
    second half of training (its dev score logged as ``step: "average"``). A pass draws
    query ``i`` ``draws[i]`` times (default once each), in random order. ``sources[i]`` is
    the corpus index of the document pseudo-query ``i`` was cut from (-1: a real query); the
    KL of such a query follows ``cfg.pseudo_kl_pool`` and ``cfg.pseudo_kl_temperature``."""
    import torch
    from tqdm import tqdm

    from index_build.losses import alignment_mse, listwise_kl

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    docs_t = torch.from_numpy(np.ascontiguousarray(docs, dtype=np.float32))
    opt = torch.optim.AdamW([
        {"params": student.encoder.parameters(), "lr": cfg.lr},
        {"params": student.head_parameters(), "lr": cfg.lr * cfg.map_lr_factor},
    ], weight_decay=0.01)
    draws = np.ones(len(texts), np.int64) if draws is None else np.asarray(draws, np.int64)
    if draws.shape != (len(texts),) or (draws < 0).any():
        raise ValueError(f"draws must be {len(texts)} non-negative counts, one per query")
    sources = np.full(len(texts), -1, np.int64) if sources is None else np.asarray(sources, np.int64)
    if sources.shape != (len(texts),):
        raise ValueError(f"sources must be {len(texts)} corpus indices (-1: none), one per query")
    per_pass = np.repeat(np.arange(len(texts)), draws)
    steps = max(1, int(cfg.epochs * len(per_pass) / cfg.batch))
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (steps - s) / steps))
    best_dev, best_step, best_state = None, 0, None
    average = cfg.checkpoint == "average"
    if dev_eval is not None:
        best_dev = dev_eval(student)
        best_state = None if average else copy.deepcopy(student.state_dict())
        log.append({"step": 0, "dev_nDCG@10": best_dev})
    summed: dict[str, Any] = {}
    averaged_steps: list[int] = []
    started = time.perf_counter()
    order, pos = rng.permutation(per_pass), 0
    for step in tqdm(range(1, steps + 1), desc="asymmetric student: training steps", unit="step",
                     disable=not progress):
        if pos + cfg.batch > len(order):
            order, pos = rng.permutation(per_pass), 0
        idx = order[pos : pos + cfg.batch]
        pos += cfg.batch
        student.train()
        q = student.encode_queries([texts[i] for i in idx])
        loss = alignment_mse(q, torch.from_numpy(q_teacher[idx]))
        if cfg.kl_weight > 0:
            cand, target = _pool_batch(idx, pools, t_scores, cfg.pool_size, rng, sources,
                                       cfg.pseudo_kl_pool == "without-source", cfg.pseudo_kl_temperature)
            mask = cand >= 0
            s = torch.einsum("bnd,bd->bn", docs_t[torch.from_numpy(np.where(mask, cand, 0))], q)
            loss = loss + cfg.kl_weight * listwise_kl(s, torch.from_numpy(target), cfg.scale, torch.from_numpy(mask))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % cfg.eval_every == 0 or step == steps:
            entry: dict[str, Any] = {"step": step, "loss": round(float(loss.detach()), 4),
                                     "seconds": round(time.perf_counter() - started, 1)}
            if dev_eval is not None:
                entry["dev_nDCG@10"] = dev = dev_eval(student)
                if not average and (best_dev is None or dev > best_dev):
                    best_dev, best_step, best_state = dev, step, copy.deepcopy(student.state_dict())
            if average and in_average_window(step, steps):
                _accumulate(summed, student.state_dict())
                averaged_steps.append(step)
            log.append(entry)
    seconds = round(time.perf_counter() - started, 1)
    if average:
        student.load_state_dict({k: v / len(averaged_steps) if v.is_floating_point() else v for k, v in summed.items()})
        avg_dev = dev_eval(student) if dev_eval is not None else None
        log.append({"step": "average", "of_steps": averaged_steps,
                    **({"dev_nDCG@10": avg_dev} if avg_dev is not None else {})})
        return {"steps": steps, "checkpoint": "average", "averaged_steps": averaged_steps, "dev_nDCG@10": avg_dev,
                "train_seconds": seconds}
    if best_state is None:
        best_step = steps
    else:
        student.load_state_dict(best_state)
    return {"steps": steps, "best_step": best_step, "best_dev_nDCG@10": best_dev, "train_seconds": seconds}


def in_average_window(step: int, steps: int) -> bool:
    """Whether a check at ``step`` (of ``steps``) is among those ``checkpoint = "average"``
    averages: the trained ones in the second half."""
    return step > 0 and 2 * step >= steps


def _accumulate(summed: dict[str, Any], state: dict[str, Any]) -> None:
    """Add ``state``'s floating-point tensors into ``summed`` (copies on first use); other
    tensors (integer buffers) keep their latest value."""
    for k, v in state.items():
        if k in summed and v.is_floating_point():
            summed[k] += v
        else:
            summed[k] = v.detach().clone()


def _pool_batch(idx: np.ndarray, pools: list[np.ndarray], t_scores: list[np.ndarray], size: int,
                rng: np.random.Generator, sources: np.ndarray | None = None, drop_source: bool = False,
                temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``[batch, size]`` candidates (-1: padding) and teacher scores for the queries ``idx``:
    a pool larger than ``size`` keeps the teacher's top half and a random sample of the rest.
    A pseudo-query (``sources[i] >= 0``) loses its source document with ``drop_source`` and has
    its teacher scores divided by ``temperature``."""
    cand = np.full((len(idx), size), -1, np.int64)
    target = np.zeros((len(idx), size), np.float32)
    for row, i in enumerate(idx):
        pool, ts = pools[i], t_scores[i]
        if sources is not None and sources[i] >= 0:
            if drop_source:
                keep = pool != sources[i]
                pool, ts = pool[keep], ts[keep]
            ts = ts / temperature
        if len(pool) > size:
            top = np.argsort(-ts)[: size // 2]
            rest = rng.choice(np.setdiff1d(np.arange(len(pool)), top), size - len(top), replace=False)
            keep = np.concatenate([top, rest])
            pool, ts = pool[keep], ts[keep]
        cand[row, : len(pool)] = pool
        target[row, : len(pool)] = ts
    return cand, target


def aligned_query_tokens(states: Sequence[np.ndarray], colbert_queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of rows for the same token: a dense query encoder's last-layer states of
    ``[CLS] query [SEP]`` (per query ``[n_i + 2, hidden]``, real tokens only) and the ColBERT
    encoder's rows of ``[CLS] [Q] query [SEP] [MASK]...`` (``[n, query_len, dim]``): [CLS]
    with ColBERT's row 0, each word piece ColBERT keeps (``query_len - 3`` at most) and [SEP]
    with ColBERT's row one further on (after its [Q] marker). ColBERT's [Q] and [MASK] rows
    have no counterpart."""
    q_len = colbert_queries.shape[1]
    xs, ys = [], []
    for h, q in zip(states, colbert_queries):
        pieces = min(len(h) - 2, q_len - 3)
        xs.append(h[np.r_[np.arange(pieces + 1), len(h) - 1]])
        ys.append(q[np.r_[0, np.arange(2, pieces + 3)]])
    return np.concatenate(xs), np.concatenate(ys)


def fit_query_token_map(states: Sequence[np.ndarray], colbert_queries: np.ndarray,
                        alpha: float = 1.0) -> tuple[np.ndarray, float]:
    """The linear map (``[hidden, dim]``, ridge regression) from a dense query encoder's token
    states to the ColBERT encoder's query tokens (:func:`aligned_query_tokens`), and the mean
    cosine of its normalized predictions to those tokens. With it, ColBERT's query side is
    projected from the dense encoder's own pass (:func:`models.encoders.project_query_tokens`)."""
    from index_build.students import ridge_map

    x, y = aligned_query_tokens(states, colbert_queries)
    w = ridge_map(x, y, alpha)
    pred = x @ w
    pred /= np.maximum(np.linalg.norm(pred, axis=1, keepdims=True), 1e-12)
    cos = np.sum(pred * y, axis=1) / np.maximum(np.linalg.norm(y, axis=1), 1e-12)
    return w, float(cos.mean())
