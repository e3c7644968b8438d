"""ColBERT token index: every document's token vectors, memory-mapped, for MaxSim reranking.

Two storage modes:

- ``bits=None``: the reference, tokens stored as float16 (``tokens_fp16.npy``).
- ``bits in {1, 2, 4}``: ColBERTv2-style residual compression (:class:`ResidualCodec`).
  Each token is stored as the id of its nearest centroid (``codes.npy``) plus its residual
  quantized to ``bits`` per dimension and bit-packed (``residuals.npy``). Unlike
  ColBERTv2's global cutoffs, bucket cutoffs and weights are computed per dimension.

Files in an index directory::

    token_index.json      bits, dim, n_docs, n_tokens, n_centroids, bytes (written last)
    offsets.npy           int64 [n_docs + 1]; doc i owns tokens offsets[i]:offsets[i+1]
    tokens_fp16.npy       float16 [n_tokens, dim]                  (bits=None)
    codes.npy             uint16 (or int32 for > 65536 centroids) [n_tokens]
    residuals.npy         uint8 [n_tokens, dim * bits / 8]
    centroids.npy         float32 [n_centroids, dim]
    bucket_cutoffs.npy    float32 [2**bits - 1, dim]
    bucket_weights.npy    float32 [2**bits, dim]
    ivf.npy, ivf_offsets.npy   centroid -> sorted doc ids (PLAID-style candidates)

Every file is written under a temporary name and moved into place with ``os.replace``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from models.encoders import maxsim

if TYPE_CHECKING:
    from models.maxsim_int8 import Int8MaxSim

META_NAME = "token_index.json"
OFFSETS_NAME = "offsets.npy"
FP16_NAME = "tokens_fp16.npy"
CODES_NAME = "codes.npy"
RESIDUALS_NAME = "residuals.npy"
CENTROIDS_NAME = "centroids.npy"
CUTOFFS_NAME = "bucket_cutoffs.npy"
WEIGHTS_NAME = "bucket_weights.npy"
IVF_NAME = "ivf.npy"
IVF_OFFSETS_NAME = "ivf_offsets.npy"
CODEC_FILES = (CENTROIDS_NAME, CUTOFFS_NAME, WEIGHTS_NAME)
FORMAT_VERSION = 1
_CHUNK_TOKENS = 65536
#: tokens decoded and scored at a time by :meth:`TokenIndex.rerank`: bounds the decoded buffer
#: (this many ``dim``-float rows) while keeping NumPy's per-call overhead small
RERANK_CHUNK_TOKENS = 8192
#: fewest candidate tokens per thread when :meth:`TokenIndex.rerank` splits one query's work
RERANK_MIN_SPLIT_TOKENS = 4096


class _Scratch(threading.local):
    """Per-thread reusable work arrays for :meth:`TokenIndex.rerank`.

    Decoding allocates several MiB per chunk; fresh allocations of that size are mapped and
    page-faulted by the C allocator on every call (and trimmed again when freed), which cost
    as much as the decode itself. Each thread keeps its own arrays (about 10 MiB at the
    default chunk size for dim 128), grown when a larger chunk needs them.
    """

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, size: int, dtype: Any) -> np.ndarray:
        """A flat array of at least ``size`` elements (contents undefined)."""
        arr = self.arrays.get(name)
        if arr is None or arr.size < size or arr.dtype != np.dtype(dtype):
            arr = self.arrays[name] = np.empty(max(size, 1), dtype)
        return arr[:size]


def _tmp_name(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary file in the same directory, then ``os.replace``."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, in place (``x`` must be a writable float array); returns ``x``."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    np.maximum(norms, 1e-12, out=norms)
    x /= norms[:, None]
    return x


def _inverse_norms(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``1 / ||row||`` of each row of ``x`` into ``out``; 0 for an all-zero row (which
    :func:`_normalize` leaves at zero, so it scores 0 either way)."""
    np.einsum("ij,ij->i", x, x, out=out)
    np.sqrt(out, out=out)
    nonzero = out > 1e-12
    np.divide(1.0, out, out=out, where=nonzero)
    out[~nonzero] = 0.0
    return out


#: k-means iterations of the codec's centroids: ColBERTv2's default (``kmeans_niters=4``);
#: more iterations cost time without improving the codec's fidelity
#: (``benchmarks/codec_kmeans.py``, ``benchmarks/results/codec-kmeans.json``).
KMEANS_NITER = 4


def _code_dtype(n_centroids: int) -> np.dtype:
    return np.dtype(np.uint16) if n_centroids <= 1 << 16 else np.dtype(np.int32)


class ResidualCodec:
    """Centroid + per-dimension quantized residual (ColBERTv2 compression).

    Parameters
    ----------
    centroids
        ``[n_centroids, dim]`` float32, L2-normalized.
    cutoffs
        ``[2**bits - 1, dim]`` bucket boundaries of the residual, per dimension.
    weights
        ``[2**bits, dim]`` value decoded for each bucket, per dimension.
    """

    def __init__(self, centroids: np.ndarray, cutoffs: np.ndarray, weights: np.ndarray) -> None:
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.cutoffs = np.ascontiguousarray(cutoffs, dtype=np.float32)
        self.weights = np.ascontiguousarray(weights, dtype=np.float32)
        n_buckets = self.weights.shape[0]
        bits = int(round(math.log2(n_buckets))) if n_buckets > 0 else 0
        if bits not in (1, 2, 4) or 1 << bits != n_buckets:
            raise ValueError(f"bucket weights must have 2, 4 or 16 rows, got {n_buckets}")
        if self.cutoffs.shape != (n_buckets - 1, self.dim) or self.weights.shape[1] != self.dim:
            raise ValueError(
                f"codec shapes disagree: centroids {self.centroids.shape}, cutoffs {self.cutoffs.shape}, "
                f"weights {self.weights.shape}"
            )
        if (self.dim * bits) % 8:
            raise ValueError(f"dim * bits must be a multiple of 8 (dim={self.dim}, bits={bits})")
        self.bits = bits
        self._centroid_index: Any = None
        # residual decode table, flattened to rows ``byte_position * 256 + byte_value``
        self._lut = self._byte_lut().reshape(self.packed_dim * 256, 8 // bits)
        row_dtype = np.uint16 if self.packed_dim * 256 <= 1 << 16 else np.intp
        self._lut_base = (np.arange(self.packed_dim, dtype=row_dtype) * 256)[None, :]

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def n_centroids(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def packed_dim(self) -> int:
        """Bytes per packed residual row: ``dim * bits / 8``."""
        return self.dim * self.bits // 8

    @property
    def code_dtype(self) -> np.dtype:
        return _code_dtype(self.n_centroids)

    # -- training -----------------------------------------------------------------------------
    @classmethod
    def train(cls, sample: np.ndarray, n_centroids: int, bits: int, seed: int = 0,
              niter: int = KMEANS_NITER) -> ResidualCodec:
        """Spherical k-means centroids (``niter`` iterations), then per-dimension residual quantiles.

        Cutoffs sit at the quantiles ``i / 2**bits`` (``i = 1 .. 2**bits - 1``) of each
        dimension's residual on ``sample``; weights at the mid-quantiles
        ``(i + 0.5) / 2**bits`` (``i = 0 .. 2**bits - 1``).
        """
        import faiss

        if bits not in (1, 2, 4):
            raise ValueError(f"bits must be 1, 2 or 4, got {bits}")
        if niter < 1:
            raise ValueError(f"niter must be at least 1, got {niter}")
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        if sample.ndim != 2 or sample.shape[0] == 0:
            raise ValueError(f"need a non-empty [n, dim] sample, got {sample.shape}")
        n, dim = sample.shape
        n_centroids = int(max(1, min(n_centroids, n)))
        kmeans = faiss.Kmeans(dim, n_centroids, niter=niter, seed=seed, spherical=True, verbose=False)
        kmeans.cp.min_points_per_centroid = 1
        kmeans.train(sample)
        centroids = _normalize(np.array(kmeans.centroids, dtype=np.float32).reshape(n_centroids, dim))
        n_buckets = 1 << bits
        dummy = cls(centroids, np.zeros((n_buckets - 1, dim), np.float32), np.zeros((n_buckets, dim), np.float32))
        residuals = sample - centroids[dummy.assign(sample)]
        cut_q = np.arange(1, n_buckets) / n_buckets
        weight_q = (np.arange(n_buckets) + 0.5) / n_buckets
        cutoffs = np.quantile(residuals, cut_q, axis=0).astype(np.float32)
        weights = np.quantile(residuals, weight_q, axis=0).astype(np.float32)
        return cls(centroids, cutoffs, weights)

    # -- encode / decode ----------------------------------------------------------------------
    def assign(self, vectors: np.ndarray) -> np.ndarray:
        """Nearest centroid (max inner product) per vector, as :attr:`code_dtype`."""
        import faiss

        if self._centroid_index is None:
            index = faiss.IndexFlatIP(self.dim)
            index.add(self.centroids)
            self._centroid_index = index
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape[0] == 0:
            return np.zeros(0, self.code_dtype)
        _, ids = self._centroid_index.search(vectors, 1)
        return ids[:, 0].astype(self.code_dtype)

    def compress(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[n, dim]`` float -> (centroid ids ``[n]``, packed residuals uint8 ``[n, dim*bits/8]``)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected [n, {self.dim}] vectors, got {vectors.shape}")
        n = vectors.shape[0]
        codes = np.zeros(n, self.code_dtype)
        packed = np.zeros((n, self.packed_dim), np.uint8)
        step = max(1, _CHUNK_TOKENS // max(1, self.cutoffs.shape[0]))
        for start in range(0, n, step):
            chunk = vectors[start : start + step]
            c = self.assign(chunk)
            residual = chunk - self.centroids[c]
            # bucket = number of cutoffs below the value: [m, dim] in [0, 2**bits)
            buckets = (residual[:, :, None] > self.cutoffs.T[None, :, :]).sum(axis=2, dtype=np.uint8)
            codes[start : start + step] = c
            packed[start : start + step] = self._pack(buckets)
        return codes, packed

    def decompress(self, codes: np.ndarray, packed: np.ndarray, normalize: bool = True,
                   scratch: _Scratch | None = None) -> np.ndarray:
        """Centroid + bucket weights, L2-normalized (or not, with ``normalize=False``):
        ``[n, dim]`` float32. With ``scratch`` the result and temporaries live in that
        thread's reusable arrays (valid until its next use)."""
        codes = np.asarray(codes)
        packed = np.asarray(packed, dtype=np.uint8)
        if packed.ndim != 2 or packed.shape != (codes.shape[0], self.packed_dim):
            raise ValueError(f"packed residuals must be [{codes.shape[0]}, {self.packed_dim}], got {packed.shape}")
        n, per_byte = codes.shape[0], 8 // self.bits
        rows: np.ndarray[Any, np.dtype[np.integer]]
        if scratch is None:
            out = np.empty((n, self.dim), np.float32)
            rows = np.empty(packed.shape, self._lut_base.dtype)
            residual = np.empty((n, self.packed_dim, per_byte), np.float32)
        else:
            out = scratch.get("decoded", n * self.dim, np.float32).reshape(n, self.dim)
            rows = scratch.get("rows", packed.size, self._lut_base.dtype).reshape(packed.shape)
            residual = scratch.get("residual", n * self.dim, np.float32).reshape(n, self.packed_dim, per_byte)
        # (indices are valid by construction: mode="clip" skips numpy's bounds-check copy of out)
        np.take(self.centroids, codes.astype(np.intp, copy=False), axis=0, out=out, mode="clip")
        # one gather per packed byte: the byte's value decodes all the dimensions it holds
        # (np.take on flat row numbers is several times faster than 2-D fancy indexing;
        # the row numbers fit 16 bits for any dim * bits <= 2048, 4x less to write than intp)
        np.add(packed, self._lut_base, out=rows)
        np.take(self._lut, rows, axis=0, out=residual, mode="clip")
        out += residual.reshape(n, self.dim)
        return _normalize(out) if normalize else out

    def _byte_lut(self) -> np.ndarray:
        """``[packed_dim, 256, 8 // bits]``: the residual values a packed byte decodes to at each
        byte position (the layout of :meth:`_pack`: dimensions in order, most significant bit first)."""
        per_byte = 8 // self.bits
        values = np.arange(256, dtype=np.uint16)
        shifts = 8 - self.bits * (np.arange(per_byte) + 1)
        buckets = (values[:, None] >> shifts[None, :]) & ((1 << self.bits) - 1)  # [256, per_byte]
        dims = np.arange(self.packed_dim)[:, None] * per_byte + np.arange(per_byte)[None, :]  # [packed_dim, per]
        return np.ascontiguousarray(self.weights[buckets[None, :, :], dims[:, None, :]], dtype=np.float32)

    def _pack(self, buckets: np.ndarray) -> np.ndarray:
        n = buckets.shape[0]
        shifts = np.arange(self.bits - 1, -1, -1, dtype=np.uint8)
        bit_planes = (buckets[:, :, None] >> shifts) & 1  # [n, dim, bits], most significant first
        return np.packbits(bit_planes.reshape(n, self.dim * self.bits), axis=1)

    def _unpack(self, packed: np.ndarray) -> np.ndarray:
        n = packed.shape[0]
        bit_planes = np.unpackbits(packed, axis=1).reshape(n, self.dim, self.bits)
        if self.bits == 1:
            return bit_planes[:, :, 0]
        powers = (1 << np.arange(self.bits - 1, -1, -1)).astype(np.uint8)
        return (bit_planes * powers).sum(axis=2, dtype=np.uint8)

    # -- persistence --------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write ``centroids.npy``, ``bucket_cutoffs.npy``, ``bucket_weights.npy``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_npy_atomic(directory / CENTROIDS_NAME, self.centroids)
        save_npy_atomic(directory / CUTOFFS_NAME, self.cutoffs)
        save_npy_atomic(directory / WEIGHTS_NAME, self.weights)

    @classmethod
    def load(cls, directory: Path) -> ResidualCodec:
        directory = Path(directory)
        arrays = []
        for name in CODEC_FILES:
            try:
                arrays.append(np.load(directory / name, allow_pickle=False))
            except FileNotFoundError:
                raise FileNotFoundError(f"{directory / name}: residual codec file missing") from None
        return cls(*arrays)


def default_n_centroids(n_tokens: int) -> int:
    """ColBERTv2's rule: ``2 ** floor(log2(16 * sqrt(n_tokens)))``, at most ``n_tokens``.

    >>> default_n_centroids(1_000_000), default_n_centroids(500), default_n_centroids(3)
    (8192, 256, 3)
    """
    if n_tokens <= 0:
        return 1
    n = 1 << int(math.floor(math.log2(16 * math.sqrt(n_tokens))))
    return int(max(1, min(n, n_tokens)))


def _doc_chunks(offsets: np.ndarray, chunk_tokens: int, first: int = 0,
                last: int | None = None) -> Iterator[tuple[int, int]]:
    """Consecutive ``[doc_start, doc_end)`` ranges of about ``chunk_tokens`` tokens each,
    covering documents ``[first, last)`` (default: all)."""
    n_docs = len(offsets) - 1 if last is None else last
    start = first
    while start < n_docs:
        end = int(np.searchsorted(offsets, offsets[start] + chunk_tokens, side="right")) - 1
        end = min(max(end, start + 1), n_docs)
        yield start, end
        start = end


def _gather_index(offsets: np.ndarray, doc_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token rows of ``doc_indices`` back to back, and their offsets (no per-token loop)."""
    starts = offsets[doc_indices]
    lengths = offsets[doc_indices + 1] - starts
    out_offsets = np.zeros(len(doc_indices) + 1, np.int64)
    np.cumsum(lengths, out=out_offsets[1:])
    total = int(out_offsets[-1])
    rows = np.arange(total, dtype=np.int64) + np.repeat(starts - out_offsets[:-1], lengths)
    return rows, out_offsets


_SCRATCH = _Scratch()


class TokenIndex:
    """Memory-mapped token store with MaxSim reranking (see the module docstring for files)."""

    def __init__(
        self,
        path: Path,
        meta: dict[str, Any],
        offsets: np.ndarray,
        *,
        tokens: np.ndarray | None = None,
        codes: np.ndarray | None = None,
        residuals: np.ndarray | None = None,
        codec: ResidualCodec | None = None,
        ivf: np.ndarray | None = None,
        ivf_offsets: np.ndarray | None = None,
    ) -> None:
        self.path = Path(path)
        self.meta = meta
        self.offsets = offsets
        self.tokens = tokens
        self.codes = codes
        self.residuals = residuals
        self.codec = codec
        self.ivf = ivf
        self.ivf_offsets = ivf_offsets
        #: int8 tokens in RAM (:meth:`to_memory`); when set, :meth:`rerank` scores with them
        self.int8: Int8MaxSim | None = None

    # -- build --------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        doc_vectors: Sequence[np.ndarray],
        path: Path,
        *,
        bits: int | None = 2,
        n_centroids: int | None = None,
        sample_tokens: int = 200_000,
        kmeans_niter: int = KMEANS_NITER,
        seed: int = 0,
        progress: bool = False,
    ) -> TokenIndex:
        """Write a token index for ``doc_vectors`` into directory ``path``.

        Parameters
        ----------
        doc_vectors
            One ``[n_tokens_i, dim]`` float array (L2-normalized rows) per document, in
            corpus order; a document may have zero tokens.
        path
            Output directory (created; existing index files in it are replaced).
        bits
            Residual bits per dimension (1, 2 or 4), or ``None`` for float16 storage.
        n_centroids
            Codec centroids; default :func:`default_n_centroids` of the token count.
        sample_tokens
            Tokens (sampled uniformly) used to train the codec.
        kmeans_niter
            K-means iterations of the codec's centroids (:data:`KMEANS_NITER`).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if bits not in (None, 1, 2, 4):
            raise ValueError(f"bits must be None, 1, 2 or 4, got {bits}")
        dim, offsets = _token_layout(doc_vectors)
        n_tokens = int(offsets[-1])
        chunks = list(_doc_chunks(offsets, _CHUNK_TOKENS))

        def concat(a: int, b: int) -> np.ndarray:
            parts = [np.asarray(v, dtype=np.float32) for v in doc_vectors[a:b]]
            return np.concatenate(parts, axis=0) if parts else np.zeros((0, dim), np.float32)

        def bar(items: list, desc: str):
            if not progress:
                return items
            from tqdm import tqdm

            return tqdm(items, desc=desc, unit="chunk")

        for stale in (FP16_NAME, CODES_NAME, RESIDUALS_NAME, IVF_NAME, IVF_OFFSETS_NAME, *CODEC_FILES):
            (path / stale).unlink(missing_ok=True)
        (path / META_NAME).unlink(missing_ok=True)
        payload: dict[str, np.ndarray] = {}
        writers = _TmpArrays(path)
        try:
            codec: ResidualCodec | None = None
            if bits is None:
                tokens = writers.new(FP16_NAME, (n_tokens, dim), np.float16)
                for a, b in bar(chunks, "token index (fp16)"):
                    tokens[offsets[a] : offsets[b]] = concat(a, b)
                n_centroids_used = 0
            else:
                if n_tokens == 0:
                    raise ValueError("cannot train a residual codec without tokens; use bits=None")
                sample = _sample_tokens(concat, chunks, offsets, sample_tokens, seed)
                k = default_n_centroids(n_tokens) if n_centroids is None else int(n_centroids)
                codec = ResidualCodec.train(sample, min(k, len(sample)), bits, seed=seed, niter=kmeans_niter)
                del sample
                codes = writers.new(CODES_NAME, (n_tokens,), codec.code_dtype)
                residuals = writers.new(RESIDUALS_NAME, (n_tokens, codec.packed_dim), np.uint8)
                for a, b in bar(chunks, f"token index ({bits}-bit)"):
                    c, r = codec.compress(concat(a, b))
                    codes[offsets[a] : offsets[b]] = c
                    residuals[offsets[a] : offsets[b]] = r
                payload[IVF_NAME], payload[IVF_OFFSETS_NAME] = _build_ivf(np.asarray(codes), offsets, codec.n_centroids)
                n_centroids_used = codec.n_centroids
                codec.save(path)
            save_npy_atomic(path / OFFSETS_NAME, offsets)
            for name, array in payload.items():
                save_npy_atomic(path / name, array)
            writers.commit()
        finally:
            writers.discard()
        _write_meta(path, bits, dim, len(doc_vectors), n_tokens, n_centroids_used, kmeans_niter)
        return cls.load(path)

    # -- load ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path, mmap: bool = True) -> TokenIndex:
        """Open an index directory; arrays are memory-mapped read-only unless ``mmap=False``."""
        path = Path(path)
        meta_path = path / META_NAME
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{meta_path}: token index metadata missing (incomplete build?)") from None
        mode: Literal["r"] | None = "r" if mmap else None

        def arr(name: str) -> np.ndarray:
            try:
                return np.load(path / name, mmap_mode=mode, allow_pickle=False)
            except FileNotFoundError:
                raise FileNotFoundError(f"{path / name}: token index file missing") from None

        offsets = np.asarray(arr(OFFSETS_NAME), dtype=np.int64)
        n_docs, n_tokens, dim = int(meta["n_docs"]), int(meta["n_tokens"]), int(meta["dim"])
        if offsets.shape != (n_docs + 1,) or int(offsets[-1]) != n_tokens:
            raise ValueError(f"{path / OFFSETS_NAME}: shape {offsets.shape} disagrees with {META_NAME}")
        if meta["bits"] is None:
            tokens = arr(FP16_NAME)
            if tokens.shape != (n_tokens, dim):
                raise ValueError(f"{path / FP16_NAME}: shape {tokens.shape}, expected {(n_tokens, dim)}")
            return cls(path, meta, offsets, tokens=tokens)
        codec = ResidualCodec.load(path)
        codes, residuals = arr(CODES_NAME), arr(RESIDUALS_NAME)
        if codes.shape != (n_tokens,) or residuals.shape != (n_tokens, codec.packed_dim):
            raise ValueError(f"{path}: codes {codes.shape} / residuals {residuals.shape} disagree with {META_NAME}")
        ivf = ivf_offsets = None
        if (path / IVF_NAME).exists():
            ivf, ivf_offsets = arr(IVF_NAME), np.asarray(arr(IVF_OFFSETS_NAME))
        return cls(path, meta, offsets, codes=codes, residuals=residuals, codec=codec, ivf=ivf, ivf_offsets=ivf_offsets)

    # -- properties ---------------------------------------------------------------------------
    @property
    def n_docs(self) -> int:
        return int(self.meta["n_docs"])

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def bits(self) -> int | None:
        return self.meta["bits"]

    @property
    def in_memory(self) -> str:
        """How reranking reads tokens: ``"compressed"`` / ``"float16"`` (the files),
        ``"float32"`` or ``"int8"`` (decoded into RAM by :meth:`to_memory`)."""
        if self.int8 is not None:
            return "int8"
        if self.tokens is not None and self.tokens.dtype == np.float32:
            return "float32"
        return "float16" if self.tokens is not None else "compressed"

    def decoded_chunks(self, progress: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """``(first_token, float32 [m, dim])`` runs of L2-normalized token vectors, in order."""
        starts: Any = range(0, self.n_tokens, _CHUNK_TOKENS)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="decode ColBERT tokens", unit="chunk")
        for start in starts:
            end = min(start + _CHUNK_TOKENS, self.n_tokens)
            if self.tokens is not None:
                yield start, np.asarray(self.tokens[start:end], dtype=np.float32)
            else:
                assert self.codec is not None and self.codes is not None and self.residuals is not None
                yield start, self.codec.decompress(self.codes[start:end], self.residuals[start:end])

    def to_memory(self, mode: str, threads: int = 1, progress: bool = False) -> TokenIndex:
        """This index with every token decoded once into RAM, so reranking skips the per-query
        residual decode (same files; :meth:`centroid_candidates` unchanged):

        - ``"float32"``: L2-normalized float32, ``4 * dim`` bytes a token (534 MiB for
          SciFact's 1.09 M tokens at dim 128); the same scores up to float rounding.
        - ``"int8"``: per-token int8 + scale, ``dim + 4`` bytes a token (138 MiB for SciFact),
          scored with ONNX Runtime's integer GEMM (:class:`models.maxsim_int8.Int8MaxSim`,
          ``threads`` intra-op threads); scores within int8 rounding of the decoded ones.
        - ``"compressed"``: this index unchanged.
        """
        if mode == "compressed":
            return self
        if mode not in ("float32", "int8"):
            raise ValueError(f"unknown in-memory token mode {mode!r}: compressed, float32 or int8")

        def copy(tokens: np.ndarray | None) -> TokenIndex:
            return TokenIndex(self.path, self.meta, self.offsets, tokens=tokens, codes=self.codes,
                              residuals=self.residuals, codec=self.codec, ivf=self.ivf, ivf_offsets=self.ivf_offsets)

        if mode == "float32":
            tokens = np.empty((self.n_tokens, self.dim), np.float32)
            for start, chunk in self.decoded_chunks(progress):
                tokens[start : start + len(chunk)] = chunk
            return copy(tokens)
        from models.maxsim_int8 import Int8MaxSim

        index = copy(self.tokens)
        index.int8 = Int8MaxSim.from_chunks(self.offsets, self.dim, self.decoded_chunks(progress), threads=threads)
        return index

    def bytes_per_token(self) -> int:
        """On-disk payload bytes per token: code + packed residual, or ``2 * dim`` for fp16."""
        return _bytes_per_token(self.bits, self.dim, int(self.meta.get("n_centroids") or 0))

    def index_bytes(self) -> int:
        """Total size of the files in the index directory."""
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def params(self) -> dict[str, Any]:
        """Build parameters and sizes, for the artifact manifest."""
        return {
            "type": "colbert-token-index",
            "bits": self.bits,
            "dim": self.dim,
            "n_docs": self.n_docs,
            "n_tokens": self.n_tokens,
            "n_centroids": int(self.meta.get("n_centroids") or 0),
            **({"kmeans_niter": int(self.meta["kmeans_niter"])} if "kmeans_niter" in self.meta else {}),
            "bytes_per_token": self.bytes_per_token(),
            "index_bytes": self.index_bytes(),
        }

    # -- access -------------------------------------------------------------------------------
    def _checked(self, doc_indices: np.ndarray) -> np.ndarray:
        docs = np.asarray(doc_indices, dtype=np.int64).reshape(-1)
        if docs.size and (docs.min() < 0 or docs.max() >= self.n_docs):
            raise IndexError(f"document index out of range [0, {self.n_docs})")
        return docs

    def _rows(self, doc_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token rows of ``doc_indices`` back to back and their offsets (indices checked)."""
        return _gather_index(self.offsets, self._checked(doc_indices))

    def doc_tokens(self, doc_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token vectors of ``doc_indices`` back to back (float32 ``[T, dim]``) and their
        offsets ``[len(doc_indices) + 1]``; only those documents' rows are read."""
        rows, out_offsets = self._rows(doc_indices)
        if self.tokens is not None:
            return np.asarray(self.tokens[rows], dtype=np.float32), out_offsets
        assert self.codec is not None and self.codes is not None and self.residuals is not None
        return self.codec.decompress(self.codes[rows], self.residuals[rows]), out_offsets

    def rerank(self, query_vectors: np.ndarray, doc_indices: np.ndarray, *,
               executor: Executor | None = None, parts: int = 1) -> np.ndarray:
        """MaxSim score (:func:`models.encoders.maxsim`) of one query ``[Lq, dim]`` against
        each of ``doc_indices``; float32 ``[len(doc_indices)]`` in the given order.

        Documents are scored in runs of about :data:`RERANK_CHUNK_TOKENS` tokens, so the
        decoded vectors stay in cache between decode and MaxSim (or by the int8 scorer, after
        :meth:`to_memory` with ``"int8"``). Compressed tokens are decoded
        without normalizing them; their inverse norms scale the ``[Lq, T]`` similarities
        instead (the same scores, a quarter of the writes).

        With an ``executor`` and ``parts > 1`` the candidates are split into ``parts`` runs of
        about equal token counts: this thread scores the first and the executor's threads the
        others (NumPy releases the GIL), so one query's rerank can use idle cores. Candidates
        with fewer than :data:`RERANK_MIN_SPLIT_TOKENS` tokens per part are scored here alone.
        """
        query = np.asarray(query_vectors, dtype=np.float32)
        if query.ndim != 2 or query.shape[1] != self.dim:
            raise ValueError(f"query must be [Lq, {self.dim}], got {query.shape}")
        docs = self._checked(doc_indices)
        if self.int8 is None:
            rows, offsets = _gather_index(self.offsets, docs)
        else:  # the int8 scorer gathers its own rows: only the token counts are needed here
            rows = np.zeros(0, np.int64)
            offsets = np.concatenate([[0], np.cumsum(self.offsets[docs + 1] - self.offsets[docs])])
        scores = np.zeros(len(offsets) - 1, np.float32)
        parts = max(1, min(int(parts), int(offsets[-1]) // RERANK_MIN_SPLIT_TOKENS))
        if executor is None or parts == 1:
            self._rerank_docs(query, docs, rows, offsets, 0, len(scores), scores)
            return scores
        # document boundaries closest to equal token shares
        cuts = np.searchsorted(offsets, offsets[-1] * np.arange(1, parts) / parts)
        bounds = [0, *sorted({int(c) for c in cuts if 0 < c < len(scores)}), len(scores)]
        pending = [executor.submit(self._rerank_docs, query, docs, rows, offsets, a, b, scores)
                   for a, b in zip(bounds[1:-1], bounds[2:])]
        try:
            self._rerank_docs(query, docs, rows, offsets, bounds[0], bounds[1], scores)
        finally:
            for f in pending:  # every part finishes (or raises) before ``scores`` is returned
                f.result()
        return scores

    def _rerank_docs(self, query: np.ndarray, docs: np.ndarray, rows: np.ndarray, offsets: np.ndarray,
                     first: int, last: int, scores: np.ndarray) -> None:
        """Write the MaxSim scores of candidates ``docs[first:last]`` (token ``rows`` back to
        back, at ``offsets``) into ``scores[first:last]``, decoding with the calling thread's
        scratch arrays, or with the int8 scorer when the tokens are in RAM as int8."""
        if self.int8 is not None:
            scores[first:last] = self.int8.score(query, docs[first:last])
            return
        for a, b in _doc_chunks(offsets, RERANK_CHUNK_TOKENS, first, last):
            lo, hi = int(offsets[a]), int(offsets[b])
            chunk_offsets = offsets[a : b + 1] - lo
            if self.tokens is not None:
                if self.tokens.dtype == np.float32:  # in RAM (decompressed): gather into scratch
                    tokens = _SCRATCH.get("decoded", (hi - lo) * self.dim, np.float32).reshape(hi - lo, self.dim)
                    np.take(self.tokens, rows[lo:hi], axis=0, out=tokens, mode="clip")
                else:
                    tokens = np.asarray(self.tokens[rows[lo:hi]])
                sims = _SCRATCH.get("sims", query.shape[0] * (hi - lo), np.float32).reshape(query.shape[0], hi - lo)
                scores[a:b] = maxsim(query, tokens, chunk_offsets, out=sims)
                continue
            assert self.codec is not None and self.codes is not None and self.residuals is not None
            decoded = self.codec.decompress(self.codes[rows[lo:hi]], self.residuals[rows[lo:hi]], normalize=False,
                                            scratch=_SCRATCH)
            inverse = _inverse_norms(decoded, _SCRATCH.get("inverse", hi - lo, np.float32))
            sims = _SCRATCH.get("sims", query.shape[0] * (hi - lo), np.float32).reshape(query.shape[0], hi - lo)
            scores[a:b] = maxsim(query, decoded, chunk_offsets, token_scale=inverse, out=sims)

    def centroid_candidates(self, query_vectors: np.ndarray, k: int, ncells: int = 4) -> tuple[np.ndarray, np.ndarray]:
        """PLAID-style first stage from centroid interaction alone (no residuals read).

        Each query token probes its ``ncells`` best centroids; documents with a token in
        any probed cell are candidates, scored by MaxSim over their tokens' *centroid*
        scores. Returns the top-``k`` ``(doc_indices int64, approx_scores float32)``.
        Needs a compressed index (``bits`` set).
        """
        if self.codec is None or self.ivf is None or self.ivf_offsets is None or self.codes is None:
            raise ValueError("centroid_candidates needs a compressed token index (bits set)")
        query = np.asarray(query_vectors, dtype=np.float32)
        cscores = query @ self.codec.centroids.T  # [Lq, C]
        ncells = max(1, min(ncells, cscores.shape[1]))
        cells = np.unique(np.argpartition(-cscores, ncells - 1, axis=1)[:, :ncells])
        positions, _ = _gather_index(np.asarray(self.ivf_offsets), cells)
        docs = np.unique(np.asarray(self.ivf)[positions]).astype(np.int64)
        if docs.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        rows, offsets = _gather_index(self.offsets, docs)
        token_scores = cscores.T[np.asarray(self.codes[rows], dtype=np.int64)]  # [T, Lq]
        lengths = np.diff(offsets)
        approx = np.zeros((len(docs), query.shape[0]), np.float32)
        nonempty = lengths > 0
        approx[nonempty] = np.maximum.reduceat(token_scores, offsets[:-1][nonempty], axis=0)
        total = approx.sum(axis=1)
        k = min(k, len(docs))
        top = np.argpartition(-total, k - 1)[:k]
        top = top[np.argsort(-total[top], kind="stable")]
        return docs[top], total[top]

    def __repr__(self) -> str:
        return f"TokenIndex({self.path}, bits={self.bits}, n_docs={self.n_docs}, n_tokens={self.n_tokens})"


class _TmpArrays:
    """``.npy`` files filled in place through ``open_memmap`` under temporary names, then
    moved into place together by :meth:`commit` (or deleted by :meth:`discard`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pending: dict[str, tuple[Path, np.ndarray]] = {}

    def new(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        tmp = _tmp_name(self.directory / name)
        if int(np.prod(shape)) == 0:  # numpy cannot map an empty array
            array = np.zeros(shape, dtype)
        else:
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        self.pending[name] = (tmp, array)
        return array

    def commit(self) -> None:
        for name, (tmp, array) in list(self.pending.items()):
            if isinstance(array, np.memmap):
                array.flush()
            else:
                with open(tmp, "wb") as fh:
                    np.save(fh, array, allow_pickle=False)
            os.replace(tmp, self.directory / name)
            del self.pending[name]

    def discard(self) -> None:
        for tmp, _ in self.pending.values():
            tmp.unlink(missing_ok=True)
        self.pending.clear()


def _bytes_per_token(bits: int | None, dim: int, n_centroids: int) -> int:
    if bits is None:
        return 2 * dim
    return _code_dtype(n_centroids).itemsize + dim * bits // 8


def _build_ivf(codes: np.ndarray, offsets: np.ndarray, n_centroids: int) -> tuple[np.ndarray, np.ndarray]:
    """Centroid -> sorted unique doc ids (``ivf``), with ``ivf_offsets [n_centroids + 1]``."""
    n_docs = len(offsets) - 1
    doc_of_token = np.repeat(np.arange(n_docs, dtype=np.int64), np.diff(offsets))
    keys = np.unique(codes.astype(np.int64) * n_docs + doc_of_token)
    cells, docs = np.divmod(keys, n_docs)
    ivf_offsets = np.zeros(n_centroids + 1, np.int64)
    np.cumsum(np.bincount(cells, minlength=n_centroids), out=ivf_offsets[1:])
    doc_dtype = np.int32 if n_docs < 2**31 else np.int64
    return docs.astype(doc_dtype), ivf_offsets


def _token_layout(doc_vectors: Sequence[np.ndarray]) -> tuple[int, np.ndarray]:
    """The common token dimension of ``doc_vectors`` (one ``[n_tokens_i, dim]`` array per
    document) and the ``[n_docs + 1]`` token offsets of the documents."""
    if len(doc_vectors) == 0:
        raise ValueError("no documents")
    dims = {int(np.shape(v)[1]) for v in doc_vectors if np.ndim(v) == 2}
    if len(dims) != 1 or any(np.ndim(v) != 2 for v in doc_vectors):
        raise ValueError(f"every document needs a [n_tokens, dim] array with one common dim, got dims {dims}")
    lengths = np.fromiter((len(v) for v in doc_vectors), dtype=np.int64, count=len(doc_vectors))
    offsets = np.zeros(len(doc_vectors) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return dims.pop(), offsets


def _sample_tokens(concat, chunks: list[tuple[int, int]], offsets: np.ndarray, n_sample: int,
                   seed: int) -> np.ndarray:
    """``n_sample`` tokens (at most all of them) drawn uniformly without replacement, read
    chunk by chunk (``concat(a, b)``: the tokens of documents ``a..b-1``), to train the codec."""
    n_tokens = int(offsets[-1])
    picked = np.sort(np.random.default_rng(seed).choice(n_tokens, size=min(n_sample, n_tokens), replace=False))
    parts = []
    for a, b in chunks:
        lo, hi = np.searchsorted(picked, [offsets[a], offsets[b]])
        if hi > lo:
            parts.append(concat(a, b)[picked[lo:hi] - offsets[a]])
    return np.concatenate(parts, axis=0)


def _write_meta(path: Path, bits: int | None, dim: int, n_docs: int, n_tokens: int, n_centroids: int,
                kmeans_niter: int) -> None:
    """Write the index's ``meta.json`` (atomically), sizes measured from the files written."""
    token_bytes = sum((path / n).stat().st_size for n in (FP16_NAME, CODES_NAME, RESIDUALS_NAME) if (path / n).exists())
    meta = {
        "format_version": FORMAT_VERSION, "type": "colbert-token-index", "bits": bits, "dim": dim,
        "n_docs": n_docs, "n_tokens": n_tokens, "n_centroids": n_centroids,
        "bytes_per_token": _bytes_per_token(bits, dim, n_centroids), "token_bytes": token_bytes,
        "bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name != META_NAME),
        "compression": "per-dimension residual quantiles" if bits else "float16",
    }
    if bits is not None:
        meta["kmeans_niter"] = int(kmeans_niter)
    tmp = _tmp_name(path / META_NAME)
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path / META_NAME)
