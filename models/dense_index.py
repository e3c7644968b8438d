"""FAISS dense first stage: IVF-PQ for large corpora, exact ``Flat`` for small ones.

Vectors are L2-normalized embeddings, so every index uses the inner-product metric
(cosine similarity). The FAISS id of a vector is its row number, i.e. the document's
index in corpus order.

``faiss`` is imported lazily (inside functions) so that importing this module is cheap.
Searches pass ``nprobe`` per call through ``SearchParametersIVF``, so one loaded index can
be searched concurrently from several threads with different ``nprobe`` values.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: Corpora smaller than this get an exact ``Flat`` index (too few points to train IVF-PQ).
FLAT_THRESHOLD = 2000
#: Corpora whose float32 vectors take at most this many bytes get an exact ``Flat`` index:
#: at that size an exact scan is faster than IVF-PQ at the recall its calibration asks for
#: (SciFact, 5,183 x 384: exact 0.144 ms against IVF-PQ 0.843 ms at the calibrated nprobe,
#: benchmarks/results/indexes.md), and the memory IVF-PQ saves is small.
FLAT_MAX_BYTES = 64 << 20
#: FAISS wants at least this many training points per k-means centroid.
MIN_POINTS_PER_LIST = 39


def _faiss():
    import faiss

    return faiss


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1.0)))))


def _pow2_round(x: float) -> int:
    return 1 << max(0, int(round(math.log2(max(x, 1.0)))))


def default_nlist(n_docs: int) -> int:
    """Number of IVF lists: ``4 * sqrt(N)`` rounded to a power of two, with at least
    :data:`MIN_POINTS_PER_LIST` training points per list.

    >>> default_nlist(5183), default_nlist(100_000), default_nlist(10_000_000)
    (128, 1024, 16384)
    """
    nlist = _pow2_round(4.0 * math.sqrt(max(n_docs, 1)))
    cap = _pow2_floor(max(n_docs, 1) / MIN_POINTS_PER_LIST)
    return max(1, min(nlist, cap))


def default_pq_m(dim: int) -> int:
    """PQ sub-quantizers: ``dim / 2`` (2 dimensions per 8-bit code = 1/8 of float32).

    Measured on 5k synthetic 384-d normalized vectors with a power-law spectrum (a hard
    proxy for sentence embeddings): recall@100 against exact search at ``nprobe=32`` of 128
    lists was 0.96 with ``PQ192`` but only 0.90 with ``PQ96`` and 0.80 with ``PQ48``
    (PQ error, not IVF, was the limit). Pass ``pq_bytes`` to :func:`default_factory` to
    trade recall for memory. Falls back to the largest divisor of ``dim`` below ``dim / 2``.

    >>> default_pq_m(384), default_pq_m(768), default_pq_m(99)
    (192, 384, 33)
    """
    target = max(1, dim // 2)
    for m in range(target, 0, -1):
        if dim % m == 0:
            return m
    return 1


NPROBE_TARGET = 0.995


def default_nprobe_for(nlist: int) -> int:
    """Default lists probed per query: ``nlist / 4`` bounded to ``[8, 64]`` (and to ``nlist``).

    Generous for small ``nlist`` (where probing is cheap anyway) so that recall@100 against
    exact search stays high: 32 of 128 lists for a 5k-document corpus.

    >>> default_nprobe_for(128), default_nprobe_for(1024), default_nprobe_for(16)
    (32, 64, 8)
    """
    return int(min(nlist, max(8, min(64, nlist // 4))))


def default_factory(n_docs: int, dim: int, *, opq: bool = False, pq_bytes: int | None = None) -> str:
    """FAISS factory string for ``n_docs`` vectors of dimension ``dim``: exact ``"Flat"``
    below :data:`FLAT_THRESHOLD` documents or up to :data:`FLAT_MAX_BYTES` of float32
    vectors, otherwise :func:`ivfpq_factory`.

    >>> default_factory(1000, 384), default_factory(5183, 1152), default_factory(100_000, 384)
    ('Flat', 'Flat', 'IVF1024,PQ192x8')
    """
    if n_docs < 0 or dim <= 0:
        raise ValueError(f"invalid n_docs={n_docs}, dim={dim}")
    if n_docs < FLAT_THRESHOLD or n_docs * dim * 4 <= FLAT_MAX_BYTES:
        return "Flat"
    return ivfpq_factory(n_docs, dim, opq=opq, pq_bytes=pq_bytes)


def ivfpq_factory(n_docs: int, dim: int, *, opq: bool = False, pq_bytes: int | None = None) -> str:
    """IVF-PQ factory string for ``n_docs`` vectors of dimension ``dim``:
    ``IVF{nlist},PQ{M}x8`` (optionally with an ``OPQ{M}_{dim}`` rotation in front), with
    ``nlist`` from :func:`default_nlist` and ``M = pq_bytes`` or :func:`default_pq_m`.

    Parameters
    ----------
    n_docs, dim
        Corpus size and vector dimension.
    opq
        Prefix an OPQ rotation (slower to train, usually a little better recall).
    pq_bytes
        Bytes per vector (= PQ sub-quantizers at 8 bits). Must divide ``dim`` and be at
        most ``dim / 2`` (1/8 of float32).

    Returns
    -------
    str
        E.g. ``"IVF128,PQ192x8"`` for 5,183 documents of dimension 384.

    >>> ivfpq_factory(5183, 384)
    'IVF128,PQ192x8'
    >>> ivfpq_factory(5183, 384, opq=True, pq_bytes=48)
    'OPQ48_384,IVF128,PQ48x8'
    """
    if n_docs < 0 or dim <= 0:
        raise ValueError(f"invalid n_docs={n_docs}, dim={dim}")
    m = default_pq_m(dim) if pq_bytes is None else int(pq_bytes)
    if m <= 0 or dim % m != 0:
        raise ValueError(f"pq_bytes={m} must be a positive divisor of dim={dim}")
    if m * 8 > dim * 4:
        raise ValueError(f"pq_bytes={m} exceeds dim*4/8={dim // 2} bytes (1/8 of float32)")
    nlist = default_nlist(n_docs)
    prefix = f"OPQ{m}_{dim}," if opq else ""
    return f"{prefix}IVF{nlist},PQ{m}x8"


def _as_queries(x: np.ndarray, dim: int) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected vectors of shape [n, {dim}], got {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _fix_padding(scores: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    indices = indices.astype(np.int64, copy=False)
    scores = scores.astype(np.float32, copy=False)
    scores[indices < 0] = -np.inf
    indices[indices < 0] = -1
    return scores, indices


class DenseIndex:
    """A FAISS index over document vectors (id = row number in corpus order).

    Build with :meth:`build`, persist with :meth:`save`, reopen with :meth:`load`.
    """

    def __init__(self, index: Any, factory: str | None = None, *, default_nprobe: int | None = None) -> None:
        faiss = _faiss()
        self.index = index
        self._factory = factory or _describe(index)
        self._ivf = faiss.try_extract_index_ivf(index)
        if default_nprobe is None:
            default_nprobe = default_nprobe_for(int(self._ivf.nlist)) if self._ivf is not None else 1
        self._default_nprobe = int(default_nprobe)
        self._gpu_resources: Any = None
        #: a host copy of an index on a GPU, made by :meth:`enable_vectors` for :meth:`vectors`
        self._host_index: Any = None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        factory: str | None = None,
        *,
        train_sample: int = 100_000,
        batch_size: int = 65536,
        seed: int = 0,
        progress: bool = False,
    ) -> DenseIndex:
        """Train (on a random sample of at most ``train_sample`` rows) and add ``vectors``.

        Parameters
        ----------
        vectors
            ``[n_docs, dim]`` float32, L2-normalized, in corpus order.
        factory
            FAISS factory string; default :func:`default_factory` for this shape.
        train_sample, batch_size, seed, progress
            Training sample size, rows added per ``add`` call, sampling seed, tqdm bar.
        """
        faiss = _faiss()
        vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise ValueError(f"expected vectors of shape [n_docs, dim], got {vectors.shape}")
        n, dim = vectors.shape
        factory = factory or default_factory(n, dim)
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.cp.seed = seed
            inner = faiss.downcast_index(ivf)
            if hasattr(inner, "do_polysemous_training"):
                # Polysemous training (Hamming-ordered codes) is slow and unused here.
                inner.do_polysemous_training = False
            pq = getattr(inner, "pq", None)
            if pq is not None:
                # Small corpora: FAISS warns below 39 points per PQ centroid; training still works.
                pq.cp.min_points_per_centroid = 1
                pq.cp.seed = seed
        if not index.is_trained:
            if n == 0:
                raise ValueError(f"cannot train {factory!r} on an empty corpus")
            rng = np.random.default_rng(seed)
            if n > train_sample:
                sample_idx = np.sort(rng.choice(n, size=train_sample, replace=False))
                sample = vectors[sample_idx]
            else:
                sample = vectors
            index.train(np.ascontiguousarray(sample, dtype=np.float32))
        starts = range(0, n, batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc=f"add {factory}", unit="batch")  # type: ignore[assignment]
        for start in starts:
            index.add(np.ascontiguousarray(vectors[start : start + batch_size], dtype=np.float32))
        return cls(index, factory)

    def save(self, path: Path) -> None:
        """Write the index with ``faiss.write_index`` to a temporary file next to ``path``,
        then ``os.replace`` it into place (a reader never sees a half-written file)."""
        faiss = _faiss()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        index = self.index
        if self._gpu_resources is not None:
            index = faiss.index_gpu_to_cpu(index)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            faiss.write_index(index, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        use_gpu: bool = False,
        mmap: bool = False,
        default_nprobe: int | None = None,
    ) -> DenseIndex:
        """Read an index written by :meth:`save`.

        Parameters
        ----------
        use_gpu
            Move the index to GPU 0 when FAISS was built with GPU support and a GPU is
            visible; otherwise stay on CPU (logged).
        mmap
            Memory-map the file instead of reading it (``IO_FLAG_MMAP``); falls back to a
            normal read when FAISS cannot map this index type.
        default_nprobe
            Override the stored default (from :func:`default_nprobe_for`).
        """
        faiss = _faiss()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: FAISS index file missing")
        index = None
        if mmap:
            try:
                index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
            except RuntimeError as exc:  # pragma: no cover - depends on index type / faiss build
                logger.warning("%s: cannot mmap (%s); reading it into memory", path, exc)
        if index is None:
            index = faiss.read_index(str(path))
        out = cls(index, default_nprobe=default_nprobe)
        if use_gpu:
            if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
                res = faiss.StandardGpuResources()
                out.index = faiss.index_cpu_to_gpu(res, 0, index)
                out._gpu_resources = res
                out._ivf = faiss.try_extract_index_ivf(out.index)
            else:
                logger.warning("use_gpu requested but FAISS has no GPU support here; using CPU")
        return out

    @classmethod
    def load_entry(cls, root: Path, entry: Mapping[str, Any], *, use_gpu: bool = False) -> DenseIndex:
        """The index an artifact manifest's ``indexes.dense`` ``entry`` names (its ``path``
        relative to ``root``), with the ``default_nprobe`` the builder chose and recorded there."""
        stored = entry.get("default_nprobe")
        return cls.load(Path(root) / str(entry["path"]), use_gpu=use_gpu,
                        default_nprobe=int(stored) if stored else None)

    # -- search -------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` inner-product search.

        Parameters
        ----------
        queries
            ``[n, dim]`` (or ``[dim]``) float32.
        k
            Results per query.
        nprobe
            IVF lists to visit (default :attr:`default_nprobe`); ignored by flat indexes.

        Returns
        -------
        scores, indices
            ``[n, k]`` float32 and int64. Rows with fewer than ``k`` hits are padded with
            index ``-1`` and score ``-inf``.
        """
        faiss = _faiss()
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        q = _as_queries(queries, self.dim)
        if self.ntotal == 0:
            return np.full((q.shape[0], k), -np.inf, np.float32), np.full((q.shape[0], k), -1, np.int64)
        params = None
        if self._ivf is not None:
            nprobe = self._default_nprobe if nprobe is None else int(nprobe)
            nprobe = max(1, min(nprobe, int(self._ivf.nlist)))
            if self._gpu_resources is not None:
                faiss.extract_index_ivf(self.index).nprobe = nprobe  # GPU indexes take no params
            else:
                params = faiss.SearchParametersIVF(nprobe=nprobe)
        if params is not None:
            scores, indices = self.index.search(q, k, params=params)
        else:
            scores, indices = self.index.search(q, k)
        return _fix_padding(scores, indices)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The indexed vectors of documents ``ids``, ``[n, dim]`` float32: exact for a flat
        index, decoded from their codes (and the coarse centroid, the OPQ rotation undone) for
        a compressed one (from the host copy of an index moved to a GPU). An IVF index needs
        its id-to-list map (:meth:`enable_vectors`)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return np.zeros((0, self.dim), np.float32)
        index = self.index if self._host_index is None else self._host_index
        ivf = _faiss().try_extract_index_ivf(index)
        on_gpu_only = self._gpu_resources is not None and self._host_index is None
        if on_gpu_only or (ivf is not None and ivf.direct_map.type == 0):  # no id-to-list map
            raise RuntimeError("this index cannot decode its documents yet: call enable_vectors() first")
        return np.asarray(index.reconstruct_batch(ids), dtype=np.float32)

    def enable_vectors(self) -> None:
        """Make :meth:`vectors` able to decode any document: an IVF index's id-to-list map (8
        bytes a vector); for an index on a GPU, a host copy to decode from. Nothing to do for
        a flat index on the CPU."""
        faiss = _faiss()
        if self._gpu_resources is not None and self._host_index is None:
            self._host_index = faiss.index_gpu_to_cpu(self.index)
        ivf = faiss.try_extract_index_ivf(self.index if self._host_index is None else self._host_index)
        if ivf is not None and ivf.direct_map.type == 0:
            ivf.make_direct_map()

    # -- introspection ------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def factory(self) -> str:
        return self._factory

    @property
    def is_ivf(self) -> bool:
        return self._ivf is not None

    @property
    def default_nprobe(self) -> int:
        return self._default_nprobe

    @default_nprobe.setter
    def default_nprobe(self, value: int) -> None:
        if value <= 0:
            raise ValueError(f"nprobe must be positive, got {value}")
        self._default_nprobe = int(value)

    def calibrate_nprobe(self, vectors: np.ndarray, queries: np.ndarray, *, k: int = 100,
                         target: float = NPROBE_TARGET) -> dict[str, Any]:
        """Set :attr:`default_nprobe` to the smallest power of two (or ``nlist``) whose
        recall@``k`` against exact search reaches ``target`` times the recall of probing every
        list, measured on ``queries`` (held-out or pseudo-queries: never test queries).

        The ceiling is what the codes allow (PQ error); the coarse quantizer should lose at most
        ``1 - target`` of it. Returns the measured sweep, for the manifest.
        """
        if self._ivf is None:
            return {"method": "not-ivf"}
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[0] == 0:
            raise ValueError(f"calibration needs a non-empty [n, dim] query matrix, got {queries.shape}")
        k = min(k, self.ntotal)
        _, exact_ids = exact_search(vectors, queries, k)
        nlist = int(self._ivf.nlist)
        probes = sorted({min(nlist, 1 << i) for i in range(nlist.bit_length() + 1)})
        recalls = {p: recall_at_k(self.search(queries, k, nprobe=p)[1], exact_ids, k) for p in probes}
        ceiling = recalls[nlist]
        chosen = next(p for p in probes if recalls[p] >= target * ceiling)
        self.default_nprobe = chosen
        return {"method": f"smallest nprobe with recall@{k} >= {target} x recall at nprobe=nlist",
                "n_queries": int(queries.shape[0]), "k": int(k), "chosen": int(chosen),
                "recall_by_nprobe": {str(p): round(float(r), 4) for p, r in recalls.items()}}

    def bytes_per_vector(self) -> int:
        """Code bytes stored per vector: the IVF code size (PQ: ``M * nbits / 8``) or
        ``4 * dim`` for flat float32. IVF lists also store an 8-byte id per vector."""
        if self._ivf is not None:
            return int(self._ivf.code_size)
        code_size = getattr(_faiss().downcast_index(self.index), "code_size", None)
        return int(code_size) if code_size else 4 * self.dim

    def params(self) -> dict[str, Any]:
        """Build parameters, for the artifact manifest."""
        m, nbits = _pq_shape(self._ivf)
        return {
            "factory": self.factory,
            "metric": "inner_product",
            "nlist": int(self._ivf.nlist) if self._ivf is not None else None,
            "M": m,
            "nbits": nbits,
            "opq": "OPQ" in self.factory,
            "default_nprobe": self.default_nprobe if self._ivf is not None else None,
            "ntotal": self.ntotal,
            "dim": self.dim,
            "bytes_per_vector": self.bytes_per_vector(),
        }

    def __repr__(self) -> str:
        return f"DenseIndex({self.factory!r}, ntotal={self.ntotal}, dim={self.dim})"


def _pq_shape(ivf: Any) -> tuple[int | None, int | None]:
    if ivf is None:
        return None, None
    pq = getattr(_faiss().downcast_index(ivf), "pq", None)
    if pq is None:
        return None, None
    return int(pq.M), int(pq.nbits)


def _describe(index: Any) -> str:
    """Reconstruct a factory string from a loaded index (FAISS files do not store it)."""
    faiss = _faiss()
    index = faiss.downcast_index(index)
    prefix = ""
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(vt, faiss.OPQMatrix):
                prefix += f"OPQ{vt.M}_{vt.d_out},"
            else:
                prefix += f"{type(vt).__name__},"
        index = faiss.downcast_index(index.index)
    if isinstance(index, faiss.IndexFlat):
        return prefix + "Flat"
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        m, nbits = _pq_shape(ivf)
        body = f"PQ{m}x{nbits}" if m is not None else type(faiss.downcast_index(ivf)).__name__
        return f"{prefix}IVF{ivf.nlist},{body}"
    return prefix + type(index).__name__


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` with a flat index (the reference for recall).

    Returns ``[n, k]`` float32 scores and int64 indices, padded with ``-1`` / ``-inf``.
    """
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected vectors of shape [n_docs, dim], got {vectors.shape}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    scores, indices = index.search(_as_queries(queries, vectors.shape[1]), k)
    return _fix_padding(scores, indices)


def recall_at_k(approx_indices: np.ndarray, exact_indices: np.ndarray, k: int) -> float:
    """Mean over queries of ``|approx top-k ∩ exact top-k| / k`` (``-1`` padding ignored).

    >>> recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 2, 9]]), 3)
    0.6666666666666666
    """
    a = np.asarray(approx_indices)[:, :k]
    e = np.asarray(exact_indices)[:, :k]
    if a.shape[0] != e.shape[0]:
        raise ValueError(f"different numbers of queries: {a.shape[0]} vs {e.shape[0]}")
    if a.shape[0] == 0:
        return 0.0
    hits = [np.intersect1d(ar[ar >= 0], er[er >= 0]).size for ar, er in zip(a, e)]
    return float(np.mean(hits) / k)
