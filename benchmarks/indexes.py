"""Index benchmarks: dense IVF-PQ, ColBERT residual compression, and a 1M-vector scale run.

Run from the repository root, after ``index-build all --config configs/scifact-full.toml``::

    .venv/bin/python benchmarks/indexes.py --config configs/scifact-full.toml
    .venv/bin/python benchmarks/indexes.py --config configs/scifact-full.toml --only scale_1m

Sections (``--only`` takes a comma-separated subset):

``ivfpq``
    The distilled dense student's SciFact corpus vectors in the default IVF-PQ
    (:func:`models.dense_index.ivfpq_factory`, as in the artifact): size, build time,
    recall@100 against exact search, nDCG@10 of its top-100, an ``nprobe`` sweep with
    single-query latency (one thread), and alternative PQ sizes.
``colbert``
    The ColBERT student's token vectors of the whole corpus in
    :class:`models.token_index.TokenIndex` at float16 and 1 / 2 / 4 residual bits: size,
    build time, nDCG@10 of reranking the dense student's exact top-100, rerank latency; and
    PLAID-style centroid-interaction candidates as a first stage (recall@100 vs dense).
``scale_1m``
    1,000,000 synthetic vectors (SciFact student vectors drawn with replacement, plus
    isotropic Gaussian noise, L2-normalized) in the default IVF-PQ for that size: train and
    add time, index memory, latency and recall@100 against brute force per ``nprobe``.

Results are merged into ``benchmarks/results/indexes.json`` (written atomically; sections
not run keep their previous values) and rendered to ``benchmarks/results/indexes.md``. A
failing section raises and nothing is written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

log = logging.getLogger("benchmarks.indexes")

SECTIONS = ("ivfpq", "colbert", "scale_1m")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
JSON_NAME = "indexes.json"
DEFAULT_CONFIG = Path("configs/scifact-full.toml")
MD_NAME = "indexes.md"
K = 100  # depth of every run and of recall against exact search ("recall@100_vs_exact")
SWEEP_NPROBES = (1, 2, 4, 8, 16, 32, 64, 128)
SCALE_NPROBES = (8, 16, 32, 64, 128)
SCALE_N = 1_000_000
COLBERT_BITS = (1, 2, 4)
CENTROID_NCELLS = (1, 2, 4, 8)
#: Targets of the indexes issue.
IVFPQ_MIN_RECALL = 0.95
IVFPQ_MAX_SIZE_RATIO = 1 / 8
COLBERT_MAX_SIZE_RATIO = 1 / 4
COLBERT_MAX_NDCG_DROP = 0.005

Qrels = dict[str, dict[str, int]]


# ------------------------------------------------------------------------------------ helpers
@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` FAISS OpenMP threads (and ``n`` BLAS threads for NumPy when
    ``threadpoolctl`` is installed), then restore the previous settings."""
    import faiss

    n = max(1, int(n))
    try:
        from threadpoolctl import threadpool_limits

        blas: AbstractContextManager[Any] = threadpool_limits(limits=n, user_api="blas")
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn (train extra)
        blas = nullcontext()
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        with blas:
            yield
    finally:
        faiss.omp_set_num_threads(old)


def _bar(items: Iterable, desc: str, progress: bool, total: int | None = None) -> Iterable:
    if not progress:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, leave=False)


def latency_ms(call: Callable[[int], object], n: int, *, warmup: int = 20) -> dict[str, float]:
    """p50 / p99 wall time in milliseconds of ``call(i)`` for ``i`` in ``range(n)``.

    The first ``warmup`` calls are made once untimed first (caches, memory maps, lazy
    allocations), then every call is timed.

    >>> sorted(latency_ms(lambda i: None, 5, warmup=1))
    ['p50_ms', 'p99_ms']
    """
    if n <= 0:
        raise ValueError("latency needs at least one call")
    for i in range(min(warmup, n)):
        call(i)
    times = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        call(i)
        times[i] = time.perf_counter() - t0
    p50, p99 = np.percentile(times * 1e3, [50, 99])
    return {"p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3)}


def _rss() -> int | None:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is in the train extra
        return None
    return int(psutil.Process().memory_info().rss)


def _round(x: float, digits: int = 4) -> float:
    return round(float(x), digits)


@dataclass
class Judged:
    """Test queries with qrels, for :func:`index_build.metrics.metrics` on index runs."""

    qids: list[str]
    doc_ids: list[str]
    qrels: Qrels

    def score(self, scores: np.ndarray, indices: np.ndarray) -> dict[str, float]:
        from index_build.metrics import metrics, run_from_arrays

        return metrics(self.qrels, run_from_arrays(self.qids, self.doc_ids, scores, indices))

    def score_lists(self, ranked: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
        """Metrics of one ``(doc_indices, scores)`` pair per query (any lengths)."""
        from index_build.metrics import metrics

        run = {q: {self.doc_ids[int(d)]: float(s) for d, s in zip(docs, sc)}
               for q, (docs, sc) in zip(self.qids, ranked)}
        return metrics(self.qrels, run)


# ------------------------------------------------------------------------------------ ivfpq
def alternative_factories(n_docs: int, dim: int) -> list[str]:
    """Dense indexes to compare with the default: the default's PQ codes without IVF (every
    code scanned), then PQ with ``dim / 4`` and ``dim / 8`` bytes (1/16 and 1/32 of
    float32), each with and without an OPQ rotation.

    >>> alternative_factories(5183, 384)
    ['PQ192x8np', 'IVF128,PQ96x8', 'OPQ96_384,IVF128,PQ96x8', 'IVF128,PQ48x8', 'OPQ48_384,IVF128,PQ48x8']
    """
    from models.dense_index import default_pq_m, ivfpq_factory

    out = [f"PQ{default_pq_m(dim)}x8np"]  # np: no polysemous training (slow, unused)
    for m in (dim // 4, dim // 8):
        if m > 0 and dim % m == 0:
            out += [ivfpq_factory(n_docs, dim, pq_bytes=m), ivfpq_factory(n_docs, dim, pq_bytes=m, opq=True)]
    return out


def measure_ivfpq(
    corpus: np.ndarray,
    queries: np.ndarray,
    judged: Judged,
    *,
    nprobes: Sequence[int] = SWEEP_NPROBES,
    alternatives: Sequence[str] | None = None,
    calibration_queries: np.ndarray | None = None,
    build_threads: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """The default IVF-PQ on ``corpus`` against exact search: size, recall, nDCG, latency.

    Batch searches use ``build_threads`` threads; latencies are single-query with one
    thread, over every query, warm. ``alternatives`` (FAISS factory strings) defaults to
    :func:`alternative_factories`.
    """
    from models.dense_index import DenseIndex, exact_search, ivfpq_factory, recall_at_k

    corpus = np.ascontiguousarray(corpus, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n, dim = corpus.shape
    nq = len(queries)
    with cpu_threads(build_threads):
        exact_s, exact_i = exact_search(corpus, queries, K)
    exact_m = judged.score(exact_s, exact_i)
    factory = ivfpq_factory(n, dim)
    with cpu_threads(build_threads):
        t0 = time.perf_counter()
        index = DenseIndex.build(corpus, factory, seed=seed)
        build_s = time.perf_counter() - t0
        calibration = None
        if calibration_queries is not None:
            # the default nprobe as the builder chooses it: on training queries, never on these
            calibration = index.calibrate_nprobe(corpus, calibration_queries, k=K)
        s, i = index.search(queries, K)
    nlist = int(index.params()["nlist"] or 1)
    with cpu_threads(build_threads):
        _, i_all = index.search(queries, K, nprobe=nlist)
    m = judged.score(s, i)
    bpv = index.bytes_per_vector()
    out: dict[str, Any] = {
        "factory": factory,
        "n_docs": n,
        "dim": dim,
        "n_queries": nq,
        "nlist": nlist,
        "bytes_per_vector": bpv,
        "float32_bytes_per_vector": 4 * dim,
        "size_ratio_vs_float32": _round(bpv / (4 * dim)),
        "build_s": _round(build_s, 2),
        "nprobe": index.default_nprobe,
        "nprobe_calibration": calibration,
        "recall@100_vs_exact": _round(recall_at_k(i, exact_i, K)),
        "recall@100_vs_exact_all_lists": _round(recall_at_k(i_all, exact_i, K)),
        "nDCG@10": m["nDCG@10"],
        "R@100": m["R@100"],
        "nDCG@10_exact": exact_m["nDCG@10"],
        "R@100_exact": exact_m["R@100"],
    }
    import faiss

    flat = faiss.IndexFlatIP(dim)
    flat.add(corpus)
    with cpu_threads(1):
        out["exact_latency"] = latency_ms(lambda r: flat.search(queries[r : r + 1], K), nq)
    sweep = []
    for nprobe in _bar([p for p in nprobes if p <= nlist], f"nprobe sweep {factory}", progress):
        with cpu_threads(build_threads):
            ps, pi = index.search(queries, K, nprobe=nprobe)
        pm = judged.score(ps, pi)
        with cpu_threads(1):

            def one(r: int, p: int = nprobe) -> object:
                return index.search(queries[r : r + 1], K, nprobe=p)

            lat = latency_ms(one, nq)
        sweep.append({"nprobe": int(nprobe), "recall@100_vs_exact": _round(recall_at_k(pi, exact_i, K)),
                      "nDCG@10": pm["nDCG@10"], **lat})
    out["sweep"] = sweep
    alts = []
    factories = alternative_factories(n, dim) if alternatives is None else alternatives
    for alt_factory in _bar(factories, "alternative indexes", progress):
        with cpu_threads(build_threads):
            t0 = time.perf_counter()
            alt = DenseIndex.build(corpus, alt_factory, seed=seed)
            alt_build_s = time.perf_counter() - t0
            a_s, a_i = alt.search(queries, K)
            _, a_all = alt.search(queries, K, nprobe=nlist)
        with cpu_threads(1):

            def one_alt(r: int, a: DenseIndex = alt) -> object:
                return a.search(queries[r : r + 1], K)

            alt_lat = latency_ms(one_alt, nq)
        alts.append({
            "factory": alt_factory,
            "bytes_per_vector": alt.bytes_per_vector(),
            "size_ratio_vs_float32": _round(alt.bytes_per_vector() / (4 * dim)),
            "build_s": _round(alt_build_s, 2),
            "nprobe": alt.default_nprobe if alt.is_ivf else None,
            "recall@100_vs_exact": _round(recall_at_k(a_i, exact_i, K)),
            "recall@100_vs_exact_all_lists": _round(recall_at_k(a_all, exact_i, K)),
            "nDCG@10": judged.score(a_s, a_i)["nDCG@10"],
            **alt_lat,
        })
    out["alternatives"] = alts
    return out


# ------------------------------------------------------------------------------------ colbert
def measure_colbert(
    doc_tokens: Sequence[np.ndarray],
    query_vectors: np.ndarray,
    candidates: np.ndarray,
    judged: Judged,
    workdir: Path,
    *,
    bits: Sequence[int] = COLBERT_BITS,
    first_stage_bits: int | None = 2,
    ncells: Sequence[int] = CENTROID_NCELLS,
    first_stage_reference: dict[str, float] | None = None,
    build_threads: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """TokenIndex at float16 and at each residual width in ``bits``: size, build time,
    nDCG@10 of MaxSim reranking ``candidates`` (``[n_queries, k]`` doc indices, ``-1`` =
    empty), rerank latency. With ``first_stage_bits`` in ``bits``, also centroid-interaction
    candidate generation on that index (returned second).
    """
    from models.token_index import TokenIndex

    query_vectors = np.asarray(query_vectors, dtype=np.float32)
    cands = [np.asarray(row[row >= 0], dtype=np.int64) for row in np.asarray(candidates)]
    nq = len(cands)
    out: dict[str, Any] = {}
    first_stage: dict[str, Any] | None = None
    fp16: dict[str, Any] = {}
    for b in [None, *bits]:
        name = "fp16" if b is None else str(b)
        with cpu_threads(build_threads):
            t0 = time.perf_counter()
            ti = TokenIndex.build(doc_tokens, Path(workdir) / name, bits=b, seed=seed, progress=progress)
            build_s = time.perf_counter() - t0
        ranked = [(c, ti.rerank(query_vectors[r], c)) for r, c in enumerate(_bar(cands, f"rerank {name}", progress))]
        m = judged.score_lists(ranked)
        with cpu_threads(1):

            def one(r: int, t: TokenIndex = ti) -> object:
                return t.rerank(query_vectors[r], cands[r])

            lat = latency_ms(one, nq)
        entry = {
            "bytes_per_token": ti.bytes_per_token(),
            "index_bytes": ti.index_bytes(),
            "token_bytes": int(ti.meta["token_bytes"]),
            "n_centroids": int(ti.meta.get("n_centroids") or 0),
            "build_s": _round(build_s, 2),
            "nDCG@10": m["nDCG@10"],
            "RR@10": m["RR@10"],
            "rerank_p50_ms": lat["p50_ms"],
            "rerank_p99_ms": lat["p99_ms"],
        }
        if b is None:
            fp16 = entry
            out.update({"n_docs": ti.n_docs, "n_tokens": ti.n_tokens, "dim": ti.dim, "n_queries": nq,
                        "candidates_per_query": int(max((len(c) for c in cands), default=0)),
                        "fp16_nDCG@10": m["nDCG@10"], "fp16_RR@10": m["RR@10"],
                        "fp16_index_bytes": entry["index_bytes"], "fp16_bytes_per_token": entry["bytes_per_token"],
                        "fp16_build_s": entry["build_s"], "fp16_rerank_p50_ms": entry["rerank_p50_ms"]})
        else:
            entry["fp16_index_bytes"] = fp16["index_bytes"]
            entry["size_ratio_vs_fp16"] = _round(entry["index_bytes"] / fp16["index_bytes"])
            entry["nDCG@10_delta_vs_fp16"] = _round(entry["nDCG@10"] - fp16["nDCG@10"])
            out[name] = entry
            if b == first_stage_bits:
                first_stage = measure_centroid_candidates(ti, query_vectors, judged, ncells=ncells,
                                                          reference=first_stage_reference, progress=progress)
        del ti
    return out, first_stage


def measure_centroid_candidates(
    index: Any,
    query_vectors: np.ndarray,
    judged: Judged,
    *,
    ncells: Sequence[int] = CENTROID_NCELLS,
    reference: dict[str, float] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """PLAID-style first stage (:meth:`TokenIndex.centroid_candidates`, top-100) per
    ``ncells``: R@100 and nDCG@10 of the centroid-only scores and after exact MaxSim
    reranking of the candidates, and latency of candidate generation."""
    nq = len(query_vectors)
    sweep = []
    for c in _bar(ncells, "centroid candidates", progress):
        found = [index.centroid_candidates(query_vectors[r], K, ncells=c) for r in range(nq)]
        approx = judged.score_lists(found)
        reranked = judged.score_lists([(d, index.rerank(query_vectors[r], d)) for r, (d, _) in enumerate(found)])

        def one(r: int, c: int = c) -> object:
            return index.centroid_candidates(query_vectors[r], K, ncells=c)

        with cpu_threads(1):
            lat = latency_ms(one, nq)
        sweep.append({"ncells": int(c), "R@100": approx["R@100"], "nDCG@10_centroid_only": approx["nDCG@10"],
                      "nDCG@10_reranked": reranked["nDCG@10"], **lat})
    out: dict[str, Any] = {"bits": index.bits, "k": K, "sweep": sweep}
    if reference is not None:
        out["dense_R@100"] = reference["R@100"]
        out["dense_nDCG@10"] = reference["nDCG@10"]
    return out


# ------------------------------------------------------------------------------------ scale
def synthetic_vectors(
    base: np.ndarray, n: int, *, noise_ratio: float = 0.4, seed: int = 0, chunk: int = 100_000
) -> tuple[np.ndarray, float]:
    """``n`` vectors: rows of ``base`` drawn with replacement plus isotropic Gaussian noise,
    L2-normalized. Returns the vectors and the noise standard deviation per dimension,
    chosen so that the expected noise norm is ``noise_ratio`` times the mean norm of
    ``base``. Generated in chunks of ``chunk`` rows.
    """
    base = np.asarray(base, dtype=np.float32)
    dim = base.shape[1]
    sigma = float(noise_ratio * np.linalg.norm(base, axis=1).mean() / math.sqrt(dim))
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = base[rng.integers(0, len(base), m)]
        x += sigma * rng.standard_normal((m, dim), dtype=np.float32)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        out[start : start + m] = x
    return out, sigma


def exact_topk_chunked(
    vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 131_072
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` by brute force, a flat index per chunk of ``chunk``
    rows, merged (so only one chunk is copied into FAISS at a time)."""
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    nq, dim = queries.shape
    best_s = np.full((nq, 0), -np.inf, np.float32)
    best_i = np.full((nq, 0), -1, np.int64)
    for start in range(0, len(vectors), chunk):
        flat = faiss.IndexFlatIP(dim)
        flat.add(np.ascontiguousarray(vectors[start : start + chunk], dtype=np.float32))
        s, i = flat.search(queries, min(k, flat.ntotal))
        best_s = np.concatenate([best_s, s], axis=1)
        best_i = np.concatenate([best_i, i + start], axis=1)
        if best_s.shape[1] > k:
            top = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
            best_s, best_i = np.take_along_axis(best_s, top, 1), np.take_along_axis(best_i, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def measure_scale(
    vectors: np.ndarray,
    queries: np.ndarray,
    *,
    nprobes: Sequence[int] = SCALE_NPROBES,
    train_sample: int = 100_000,
    build_threads: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """The default IVF-PQ for ``len(vectors)`` vectors: train and add time, memory, and per
    ``nprobe`` single-query latency (one thread) and recall@100 against brute force.

    Training goes through :meth:`DenseIndex.build` on a ``train_sample``-row sample (so with
    the artifact's settings); the index is then emptied and all vectors added, timed. The
    build on the sample also adds the sample once: ``train_s`` subtracts that part,
    estimated from the measured add rate.
    """
    import faiss

    from models.dense_index import DenseIndex, ivfpq_factory, recall_at_k

    n, dim = vectors.shape
    factory = ivfpq_factory(n, dim)
    with cpu_threads(build_threads):
        t0 = time.perf_counter()
        exact_s, exact_i = exact_topk_chunked(vectors, queries, K)
        exact_search_s = time.perf_counter() - t0
    rss0 = _rss()
    rng = np.random.default_rng(seed)
    n_train = min(train_sample, n)
    sample = vectors[np.sort(rng.choice(n, size=n_train, replace=False))]
    with cpu_threads(build_threads):
        t0 = time.perf_counter()
        index = DenseIndex.build(sample, factory, train_sample=n_train, seed=seed)
        sample_build_s = time.perf_counter() - t0
        del sample
        index.index.reset()
        batch = 65536
        t0 = time.perf_counter()
        for start in _bar(range(0, n, batch), f"add {factory}", progress, total=math.ceil(n / batch)):
            index.index.add(np.ascontiguousarray(vectors[start : start + batch], dtype=np.float32))
        add_s = time.perf_counter() - t0
    rss1 = _rss()
    train_s = max(0.0, sample_build_s - add_s * n_train / n)
    nlist = int(index.params()["nlist"] or 1)
    memory_bytes = int(faiss.serialize_index(index.index).size)
    out: dict[str, Any] = {
        "factory": factory,
        "n": n,
        "dim": dim,
        "n_queries": len(queries),
        "nlist": nlist,
        "train_sample": n_train,
        "build_s": _round(train_s + add_s, 2),
        "train_s": _round(train_s, 2),
        "add_s": _round(add_s, 2),
        "memory_bytes": memory_bytes,
        "code_bytes": int(index.bytes_per_vector()) * n,
        "memory_bytes_per_vector": _round(memory_bytes / n, 2),
        "rss_delta_bytes": (rss1 - rss0) if rss0 is not None and rss1 is not None else None,
        "exact_search_s": _round(exact_search_s, 2),
        "default_nprobe": index.default_nprobe,
        "p50_ms": {},
        "p99_ms": {},
        "recall@100_vs_exact": {},
    }
    for nprobe in _bar([p for p in nprobes if p <= nlist], "nprobe sweep (1M)", progress):
        with cpu_threads(build_threads):
            _, pi = index.search(queries, K, nprobe=nprobe)
        with cpu_threads(1):

            def one(r: int, p: int = nprobe) -> object:
                return index.search(queries[r : r + 1], K, nprobe=p)

            lat = latency_ms(one, len(queries))
        key = str(nprobe)
        out["p50_ms"][key] = lat["p50_ms"]
        out["p99_ms"][key] = lat["p99_ms"]
        out["recall@100_vs_exact"][key] = _round(recall_at_k(pi, exact_i, K))
    return out


# ------------------------------------------------------------------------------------ inputs
class SciFactInputs:
    """The collection, the students' exported encoders and their cached corpus vectors."""

    def __init__(self, config: Path, progress: bool = True) -> None:
        from index_build.config import load_config
        from index_build.stages import Pipeline

        self.cfg = load_config(config)
        self.pipeline = Pipeline(self.cfg, progress=progress)
        self.progress = progress

    def _require_export(self, kind: str) -> Path:
        stage = self.pipeline.work / f"export-{kind}" / "stage.json"
        if not stage.is_file():
            raise FileNotFoundError(f"{stage} missing: run `index-build all --config ...` before the benchmarks")
        return self.pipeline.onnx_dir(kind)

    @cached_property
    def test_queries(self) -> dict[str, str]:
        col = self.pipeline.collection
        queries = col.split_queries(self.cfg.data.test_split)
        if not queries:
            raise ValueError(f"{self.cfg.data.path}: no judged queries in split {self.cfg.data.test_split!r}")
        return queries

    @cached_property
    def judged(self) -> Judged:
        col = self.pipeline.collection
        return Judged(list(self.test_queries), col.doc_ids, col.qrels[self.cfg.data.test_split])

    @cached_property
    def dense_corpus(self) -> np.ndarray:
        self._require_export("dense")
        return np.ascontiguousarray(self.pipeline.dense_corpus(), dtype=np.float32)

    @cached_property
    def calibration_queries(self) -> np.ndarray:
        """Training (or pseudo-) queries for the default nprobe, as the builder uses them."""
        from index_build.package import calibration_queries

        self._require_export("dense")
        return calibration_queries(self.pipeline)

    @cached_property
    def dense_queries(self) -> np.ndarray:
        from models.encoders import DenseEncoder

        enc = DenseEncoder(self._require_export("dense"), threads=self.cfg.threads)
        return np.ascontiguousarray(enc.encode_queries(list(self.test_queries.values())), dtype=np.float32)

    def colbert_tokens(self) -> list[np.ndarray]:
        self._require_export("colbert")
        toks = self.pipeline.colbert_corpus()
        return [toks[i] for i in range(len(self.pipeline.corpus_texts))]

    def colbert_queries(self) -> np.ndarray:
        from models.encoders import ColbertEncoder

        enc = ColbertEncoder(self._require_export("colbert"), threads=self.cfg.threads)
        return enc.encode_queries(list(self.test_queries.values()))


def run_ivfpq(inputs: SciFactInputs, threads: int, seed: int) -> dict[str, Any]:
    return measure_ivfpq(inputs.dense_corpus, inputs.dense_queries, inputs.judged, build_threads=threads,
                         calibration_queries=inputs.calibration_queries, seed=seed,
                         progress=inputs.progress)


def run_colbert(inputs: SciFactInputs, threads: int, seed: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    from models.dense_index import exact_search

    with cpu_threads(threads):
        d_s, d_i = exact_search(inputs.dense_corpus, inputs.dense_queries, K)
    dense_m = inputs.judged.score(d_s, d_i)
    tokens = inputs.colbert_tokens()
    qv = inputs.colbert_queries()
    with tempfile.TemporaryDirectory(prefix="bench-colbert-") as tmp:
        colbert, first = measure_colbert(
            tokens, qv, d_i, inputs.judged, Path(tmp), first_stage_bits=inputs.cfg.index.colbert_bits,
            first_stage_reference=dense_m, build_threads=threads, seed=seed, progress=inputs.progress)
    colbert["dense_nDCG@10"] = dense_m["nDCG@10"]
    colbert["candidates"] = f"dense student, exact top-{K}"
    return colbert, first


def run_scale(inputs: SciFactInputs, threads: int, seed: int, *, n_queries: int, noise_ratio: float,
              train_sample: int) -> dict[str, Any]:
    base = inputs.dense_corpus
    t0 = time.perf_counter()
    vectors, sigma = synthetic_vectors(base, SCALE_N, noise_ratio=noise_ratio, seed=seed)
    generate_s = time.perf_counter() - t0
    queries = inputs.dense_queries[:n_queries]
    out = measure_scale(vectors, queries, train_sample=train_sample, build_threads=threads, seed=seed,
                        progress=inputs.progress)
    out["data"] = {
        "base": f"{len(base)} SciFact dense-student corpus vectors, drawn with replacement",
        "noise": "isotropic Gaussian, then L2-normalized",
        "noise_ratio": noise_ratio,
        "sigma": _round(sigma, 5),
        "queries": f"first {len(queries)} SciFact test queries, dense student",
        "generate_s": _round(generate_s, 2),
    }
    return out


# ------------------------------------------------------------------------------------ output
def environment() -> dict[str, Any]:
    """Machine description and library versions."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for dist in ("numpy", "faiss-cpu", "onnxruntime", "tokenizers", "ir-measures"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None  # type: ignore[assignment]
    import faiss

    versions["faiss_compile_options"] = str(faiss.get_compile_options())  # SIMD level actually loaded
    cpu_model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    machine: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
    }
    try:
        import psutil

        machine["memory_bytes"] = int(psutil.virtual_memory().total)
    except ImportError:  # pragma: no cover
        pass
    return {"machine": machine, "versions": versions}


def checks(data: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, evaluated on the sections present in ``data``."""
    out: dict[str, Any] = {}
    iv = data.get("ivfpq")
    if iv:
        ratio = iv["bytes_per_vector"] / iv["float32_bytes_per_vector"]
        out["ivfpq"] = {
            "target": f"recall@100 vs exact >= {IVFPQ_MIN_RECALL} at <= 1/8 of float32 size (default nprobe)",
            "recall@100_vs_exact": iv["recall@100_vs_exact"],
            "size_ratio_vs_float32": _round(ratio),
            "met": bool(iv["recall@100_vs_exact"] >= IVFPQ_MIN_RECALL and ratio <= IVFPQ_MAX_SIZE_RATIO),
        }
    cb = data.get("colbert")
    if cb and "2" in cb:
        two = cb["2"]
        ratio = two["index_bytes"] / cb["fp16_index_bytes"]
        drop = cb["fp16_nDCG@10"] - two["nDCG@10"]
        out["colbert_2bit"] = {
            "target": f"2-bit index <= 1/4 of fp16 bytes and nDCG@10 within {COLBERT_MAX_NDCG_DROP} of fp16",
            "size_ratio_vs_fp16": _round(ratio),
            "nDCG@10_drop_vs_fp16": _round(drop),
            "size_met": bool(ratio <= COLBERT_MAX_SIZE_RATIO),
            "quality_met": bool(drop <= COLBERT_MAX_NDCG_DROP),
            "met": bool(ratio <= COLBERT_MAX_SIZE_RATIO and drop <= COLBERT_MAX_NDCG_DROP),
        }
    return out


def merge_results(path: Path, sections: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Existing ``path`` (if any) updated with ``sections`` and ``meta``, checks recomputed."""
    data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    data.update(meta)
    data.update(sections)
    data["checks"] = checks(data)
    return data


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def markdown(data: dict[str, Any]) -> str:
    """Markdown tables of every section present in ``data``."""
    lines = ["# Index benchmarks", "", f"Command: `{data.get('command', '')}`", ""]
    m = data.get("machine", {})
    lines += [f"Machine: {m.get('cpu', '?')}, {m.get('cpu_count', '?')} CPUs, {m.get('platform', '?')}. "
              f"Versions: " + ", ".join(f"{k} {v}" for k, v in data.get("versions", {}).items()), ""]
    for name, c in data.get("checks", {}).items():
        lines.append(f"- **{name}**: {c['target']}: {'met' if c['met'] else 'NOT met'} "
                     f"({', '.join(f'{k}={v}' for k, v in c.items() if k not in {'target', 'met'})})")
    if data.get("checks"):
        lines.append("")
    iv = data.get("ivfpq")
    if iv:
        lines += [
            f"## Dense IVF-PQ on SciFact ({iv['n_docs']} docs, dim {iv['dim']}, {iv['n_queries']} test queries)",
            "",
            f"Default `{iv['factory']}`: {iv['bytes_per_vector']} B/vector "
            f"({iv['size_ratio_vs_float32']:.3f} of float32's {iv['float32_bytes_per_vector']} B), "
            f"build {iv['build_s']} s, default nprobe {iv['nprobe']}: recall@100 vs exact "
            f"{iv['recall@100_vs_exact']:.4f} (all lists: {iv['recall@100_vs_exact_all_lists']:.4f}), "
            f"nDCG@10 {iv['nDCG@10']:.4f} (exact {iv['nDCG@10_exact']:.4f}). Exact flat search: "
            f"p50 {iv['exact_latency']['p50_ms']} ms.",
            "",
            *([f"The default nprobe is calibrated at build time on training queries (never test): "
               f"{iv['nprobe_calibration']['method']}, over {iv['nprobe_calibration']['n_queries']} queries: "
               f"{iv['nprobe_calibration']['recall_by_nprobe']}.", ""] if iv.get("nprobe_calibration") else []),
            "| nprobe | recall@100 vs exact | nDCG@10 | p50 ms | p99 ms |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {r['nprobe']} | {r['recall@100_vs_exact']:.4f} | {r['nDCG@10']:.4f} | {r['p50_ms']} | "
                  f"{r['p99_ms']} |" for r in iv["sweep"]]
        lines += ["", "Alternatives (IVF at its default nprobe; 'all lists' = every list probed):", "",
                  "| factory | B/vector | of float32 | recall@100 vs exact | all lists | nDCG@10 | p50 ms | build s |",
                  "|---|---|---|---|---|---|---|---|"]
        at_default = {r["nprobe"]: r for r in iv["sweep"]}.get(iv["nprobe"], {})
        rows = [{**iv, "p50_ms": at_default.get("p50_ms", "")}, *iv.get("alternatives", [])]
        lines += [f"| `{r['factory']}` | {r['bytes_per_vector']} | {r['size_ratio_vs_float32']:.4f} | "
                  f"{r['recall@100_vs_exact']:.4f} | {r['recall@100_vs_exact_all_lists']:.4f} | "
                  f"{r['nDCG@10']:.4f} | {r.get('p50_ms', '')} | {r['build_s']} |" for r in rows]
        lines.append("")
    cb = data.get("colbert")
    if cb:
        lines += [
            f"## ColBERT token index on SciFact ({cb['n_docs']} docs, {cb['n_tokens']} tokens, dim {cb['dim']})",
            "",
            f"Reranking the {cb.get('candidates', 'dense top-100')} (dense alone: nDCG@10 "
            f"{cb.get('dense_nDCG@10', float('nan')):.4f}).",
            "",
            "| storage | B/token | index size | of fp16 | build s | nDCG@10 | Δ vs fp16 | rerank p50 ms |",
            "|---|---|---|---|---|---|---|---|",
            f"| fp16 | {cb['fp16_bytes_per_token']} | {_fmt_bytes(cb['fp16_index_bytes'])} | 1 | {cb['fp16_build_s']} "
            f"| {cb['fp16_nDCG@10']:.4f} | 0 | {cb['fp16_rerank_p50_ms']} |",
        ]
        for b in sorted((k for k in cb if k.isdigit()), key=int):
            e = cb[b]
            lines.append(f"| {b}-bit | {e['bytes_per_token']} | {_fmt_bytes(e['index_bytes'])} | "
                         f"{e['size_ratio_vs_fp16']:.3f} | {e['build_s']} | {e['nDCG@10']:.4f} | "
                         f"{e['nDCG@10_delta_vs_fp16']:+.4f} | {e['rerank_p50_ms']} |")
        lines.append("")
    fs = data.get("colbert_first_stage")
    if fs:
        ref = (f" Dense first stage: R@100 {fs['dense_R@100']:.4f}, nDCG@10 {fs['dense_nDCG@10']:.4f}."
               if "dense_R@100" in fs else "")
        lines += [f"## ColBERT centroid-interaction candidates ({fs['bits']}-bit index, top-{fs['k']})", "",
                  ref.strip(), "",
                  "| cells per query token | R@100 | nDCG@10 (centroids) | nDCG@10 (reranked) | p50 ms | p99 ms |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['ncells']} | {r['R@100']:.4f} | {r['nDCG@10_centroid_only']:.4f} | "
                  f"{r['nDCG@10_reranked']:.4f} | {r['p50_ms']} | {r['p99_ms']} |" for r in fs["sweep"]]
        lines.append("")
    sc = data.get("scale_1m")
    if sc:
        d = sc.get("data", {})
        lines += [
            f"## {sc['n']:,} synthetic vectors (dim {sc['dim']}), `{sc['factory']}`",
            "",
            f"{d.get('base', '')} plus {d.get('noise', '')} (noise norm ≈ {d.get('noise_ratio')} × vector norm); "
            f"queries: {d.get('queries', '')}. Trained on {sc['train_sample']:,} vectors.",
            "",
            f"Build {sc['build_s']} s (train {sc['train_s']} s, add {sc['add_s']} s); index "
            f"{_fmt_bytes(sc['memory_bytes'])} serialized ({sc['memory_bytes_per_vector']} B/vector), RSS delta "
            f"{_fmt_bytes(sc['rss_delta_bytes']) if sc.get('rss_delta_bytes') is not None else 'n/a'}; "
            f"default nprobe {sc['default_nprobe']}.",
            "",
            "| nprobe | recall@100 vs exact | p50 ms | p99 ms |",
            "|---|---|---|---|",
        ]
        lines += [f"| {p} | {sc['recall@100_vs_exact'][p]:.4f} | {sc['p50_ms'][p]} | {sc['p99_ms'].get(p, '')} |"
                  for p in sc["p50_ms"]]
        lines.append("")
    timings = {k: v.get("seconds") for k, v in data.items() if isinstance(v, dict) and "seconds" in v}
    if timings:
        lines += ["Section wall times (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()), ""]
    lines.append("Latencies: one query at a time, one thread (FAISS OpenMP and NumPy BLAS), warm, over all queries.")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, data: dict[str, Any]) -> None:
    from index_build.metrics import write_json_atomic

    write_json_atomic(out_dir / JSON_NAME, data)
    md = out_dir / MD_NAME
    tmp = md.with_name(md.name + f".tmp-{os.getpid()}")
    tmp.write_text(markdown(data))
    tmp.replace(md)


def parse_only(only: str) -> list[str]:
    """``"ivfpq,colbert"`` -> section names, checked.

    >>> parse_only("scale_1m, ivfpq")
    ['ivfpq', 'scale_1m']
    """
    names = [s.strip() for s in only.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown or not names:
        raise ValueError(f"--only: unknown or empty sections {unknown}; choose from {', '.join(SECTIONS)}")
    return [s for s in SECTIONS if s in names]


# ------------------------------------------------------------------------------------ CLI
def main(
    config: Annotated[Path, typer.Option("--config", "-c", help="build config (TOML/YAML)")] = DEFAULT_CONFIG,
    only: Annotated[str, typer.Option(help=f"comma-separated sections: {','.join(SECTIONS)}")] = ",".join(SECTIONS),
    out_dir: Annotated[Path, typer.Option(help="results folder")] = RESULTS_DIR,
    threads: Annotated[int, typer.Option(help="FAISS threads for builds and batch searches")] = os.cpu_count() or 1,
    seed: Annotated[int, typer.Option(help="sampling and training seed")] = 0,
    scale_queries: Annotated[int, typer.Option(help="test queries for scale_1m")] = 200,
    noise_ratio: Annotated[float, typer.Option(help="scale_1m: noise norm / vector norm")] = 0.4,
    train_sample: Annotated[int, typer.Option(help="scale_1m: IVF-PQ training sample (artifact default)")] = 100_000,
    progress: Annotated[bool, typer.Option(help="progress bars")] = True,
) -> None:
    """Measure the dense and ColBERT indexes; merge into benchmarks/results/indexes.json."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sections = parse_only(only)
    inputs = SciFactInputs(config, progress=progress)
    command = ".venv/bin/python " + shlex.join(["benchmarks/indexes.py", *sys.argv[1:]])
    results: dict[str, Any] = {}
    for name in sections:
        log.info("section %s: running", name)
        t0 = time.perf_counter()
        if name == "ivfpq":
            results["ivfpq"] = run_ivfpq(inputs, threads, seed)
        elif name == "colbert":
            results["colbert"], first = run_colbert(inputs, threads, seed)
            if first is not None:
                results["colbert_first_stage"] = first
        elif name == "scale_1m":
            results["scale_1m"] = run_scale(inputs, threads, seed, n_queries=scale_queries, noise_ratio=noise_ratio,
                                            train_sample=train_sample)
        seconds = round(time.perf_counter() - t0, 1)
        results[name]["seconds"] = seconds
        results[name]["command"] = command
        results[name]["date"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
        log.info("section %s: done in %.1f s", name, seconds)
    meta = {"command": f".venv/bin/python benchmarks/indexes.py --config {shlex.quote(str(config))}",
            "threads": threads, **environment()}
    path = Path(out_dir) / JSON_NAME
    data = merge_results(path, results, meta)
    write_outputs(Path(out_dir), data)
    for name, c in data["checks"].items():
        log.info("check %s: %s (%s)", name, "met" if c["met"] else "NOT MET", c)
    log.info("wrote %s and %s", path, Path(out_dir) / MD_NAME)


if __name__ == "__main__":
    typer.run(main)
