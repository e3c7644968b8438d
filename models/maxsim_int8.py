"""ColBERT MaxSim over int8 token vectors, scored by ONNX Runtime's integer GEMM.

Decoding the compressed token index for every query (centroid + residual look-up) costs
more CPU than the MaxSim itself. :class:`Int8MaxSim` instead holds every document token in
RAM as int8 with one float scale per token (``dim + 4`` bytes a token: 138 MiB for
SciFact's 1.09 M tokens at dim 128, about a quarter of float32),
and scores a query in one ONNX Runtime call per run of candidates: ``MatMulInteger`` (VNNI
/ AMX kernels where the CPU has them), then the per-token scales, the max over each
document's tokens and the sum over query tokens.

Quantization is symmetric and per vector: ``x ~ scale * round(x / scale)`` with
``scale = max|x| / 127``. Document tokens are stored offset by :data:`ZERO_POINT` as
``uint8`` (the fast ``u8 x s8`` GEMM); the query is quantized per query token at search
time, in 7 bits (:data:`QUERY_LEVELS`). Candidates are scored in runs of similar length,
each padded to its longest document; padded rows get a large negative bias so they never
win a max.

The graph is shipped as ``maxsim_int8.onnx`` beside this module (the service has no
``onnx`` package); :func:`build_graph` rebuilds it and a test checks that the two agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

GRAPH_FILE = Path(__file__).with_name("maxsim_int8.onnx")
ZERO_POINT = 128
#: bias of padded rows: below any similarity of unit vectors times any scale
PAD_BIAS = -1.0e4
#: padded token rows scored per ONNX call (bounds the working set, as in TokenIndex.rerank)
CHUNK_ROWS = 16384
#: the query's int8 range, 7 bits: ONNX Runtime's u8 x s8 GEMM on x86 CPUs without VNNI (AVX2
#: or AVX-512 alone) sums pairs of byte products in int16 with saturation; 255 * 127 * 2
#: overflows it, 255 * 63 * 2 does not (see index_build.export.INT8_WEIGHT_BITS)
QUERY_LEVELS = 63
OPSET = 13


def build_graph() -> Any:
    """The scoring graph (an ``onnx.ModelProto``; needs the ``onnx`` package).

    Inputs: ``docs`` uint8 ``[N*L, dim]`` (tokens + :data:`ZERO_POINT`, documents padded
    to ``L`` rows each), ``query`` int8 ``[dim, Lq]``, ``doc_scale`` and ``doc_bias`` float
    ``[N*L, 1]``, ``shape`` int64 ``[N, L, Lq]``, ``query_scale`` float ``[Lq]``.
    Output: ``scores`` float ``[N]``.
    """
    import onnx
    from onnx import TensorProto, helper

    inputs = [
        helper.make_tensor_value_info("docs", TensorProto.UINT8, ["rows", "dim"]),
        helper.make_tensor_value_info("query", TensorProto.INT8, ["dim", "lq"]),
        helper.make_tensor_value_info("doc_scale", TensorProto.FLOAT, ["rows", 1]),
        helper.make_tensor_value_info("doc_bias", TensorProto.FLOAT, ["rows", 1]),
        helper.make_tensor_value_info("shape", TensorProto.INT64, [3]),
        helper.make_tensor_value_info("query_scale", TensorProto.FLOAT, ["lq"]),
    ]
    outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n"])]
    init = [
        helper.make_tensor("zero_point", TensorProto.UINT8, [], [ZERO_POINT]),
        helper.make_tensor("sum_axes", TensorProto.INT64, [1], [1]),
    ]
    nodes = [
        helper.make_node("MatMulInteger", ["docs", "query", "zero_point"], ["dots"]),  # int32 [rows, Lq]
        helper.make_node("Cast", ["dots"], ["dots_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["dots_f", "doc_scale"], ["sims"]),
        helper.make_node("Add", ["sims", "doc_bias"], ["sims_b"]),
        helper.make_node("Reshape", ["sims_b", "shape"], ["sims_3d"]),  # [N, L, Lq]
        helper.make_node("ReduceMax", ["sims_3d"], ["best"], axes=[1], keepdims=0),  # [N, Lq]
        helper.make_node("Mul", ["best", "query_scale"], ["best_scaled"]),
        helper.make_node("ReduceSum", ["best_scaled", "sum_axes"], ["scores"], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "colbert_maxsim_int8", inputs, outputs, initializer=init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="neural-retrieval-service")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def quantize_rows(x: np.ndarray, levels: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: ``(q int8 [n, dim], scale float32 [n])`` with
    ``x ~ q * scale[:, None]`` and ``|q| <= levels``; all-zero rows get scale 0.

    >>> q, s = quantize_rows(np.array([[0.5, -1.0], [0.0, 0.0]], np.float32))
    >>> q.tolist(), [round(float(v), 6) for v in s]
    ([[64, -127], [0, 0]], [0.007874, 0.0])
    """
    x = np.asarray(x, dtype=np.float32)
    peak = np.abs(x).max(axis=1)
    scale = (peak / float(levels)).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / safe[:, None]), -levels, levels).astype(np.int8)
    return q, scale


class Int8MaxSim:
    """MaxSim scorer over int8 document tokens (see the module docstring).

    Parameters
    ----------
    offsets
        ``int64 [n_docs + 1]``: document ``i`` owns token rows ``offsets[i]:offsets[i+1]``.
    tokens
        ``uint8 [n_tokens + 1, dim]``: quantized tokens plus :data:`ZERO_POINT`, and one last
        padding row (all :data:`ZERO_POINT`).
    scales
        ``float32 [n_tokens + 1]``: per-token scale (0 for the padding row).
    threads
        ONNX Runtime intra-op threads (0: its default).
    """

    def __init__(self, offsets: np.ndarray, tokens: np.ndarray, scales: np.ndarray, threads: int = 1) -> None:
        import onnxruntime as ort

        self.offsets = np.asarray(offsets, dtype=np.int64)
        n_tokens = int(self.offsets[-1])
        if tokens.dtype != np.uint8 or tokens.ndim != 2 or tokens.shape[0] != n_tokens + 1:
            raise ValueError(f"tokens must be uint8 [{n_tokens + 1}, dim], got {tokens.dtype} {tokens.shape}")
        if scales.shape != (n_tokens + 1,):
            raise ValueError(f"scales must be [{n_tokens + 1}], got {scales.shape}")
        self.tokens = tokens
        self.scales = np.asarray(scales, dtype=np.float32)
        self.pad_row = n_tokens
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(GRAPH_FILE.read_bytes(), sess_options=opts,
                                            providers=["CPUExecutionProvider"])

    @property
    def dim(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.tokens.nbytes + self.scales.nbytes)

    @classmethod
    def from_chunks(cls, offsets: np.ndarray, dim: int, chunks: Iterable[tuple[int, np.ndarray]],
                    threads: int = 1) -> Int8MaxSim:
        """Quantize float token vectors given as ``(first_token, [m, dim])`` runs covering
        every token once (e.g. :meth:`models.token_index.TokenIndex.decoded_chunks`), so the
        float vectors never need to be in memory all at once."""
        n_tokens = int(np.asarray(offsets)[-1])
        tokens = np.full((n_tokens + 1, dim), ZERO_POINT, np.uint8)  # + the padding row
        scales = np.zeros(n_tokens + 1, np.float32)
        for start, chunk in chunks:
            q, scale = quantize_rows(chunk)
            np.add(q.view(np.uint8), ZERO_POINT, out=tokens[start : start + len(chunk)], casting="unsafe")
            scales[start : start + len(chunk)] = scale
        return cls(offsets, tokens, scales, threads=threads)

    @classmethod
    def from_vectors(cls, offsets: np.ndarray, vectors: np.ndarray, threads: int = 1) -> Int8MaxSim:
        """Quantize float token vectors ``[n_tokens, dim]``."""
        return cls.from_chunks(offsets, vectors.shape[1], [(0, vectors)], threads=threads)

    def score(self, query: np.ndarray, doc_indices: np.ndarray) -> np.ndarray:
        """MaxSim of ``query`` (float ``[Lq, dim]``) against each of ``doc_indices``;
        float32 ``[len(doc_indices)]`` in the given order."""
        docs = np.asarray(doc_indices, dtype=np.int64).reshape(-1)
        out = np.zeros(len(docs), np.float32)
        if not len(docs):
            return out
        q, q_scale = quantize_rows(np.asarray(query, dtype=np.float32), levels=QUERY_LEVELS)
        q_t = np.ascontiguousarray(q.T)
        starts = self.offsets[docs]
        lengths = self.offsets[docs + 1] - starts
        order = np.argsort(-lengths, kind="stable")  # longest first: runs of similar length
        i = 0
        while i < len(order):
            width = max(1, int(lengths[order[i]]))
            n = max(1, min(len(order) - i, CHUNK_ROWS // width))
            run = order[i : i + n]
            cols = np.arange(width, dtype=np.int64)
            rows = starts[run, None] + cols[None, :]
            pad = cols[None, :] >= lengths[run, None]
            rows[pad] = self.pad_row
            flat = rows.reshape(-1)
            feed = {
                "docs": np.take(self.tokens, flat, axis=0),
                "query": q_t,
                "doc_scale": np.take(self.scales, flat)[:, None],
                "doc_bias": np.where(pad, np.float32(PAD_BIAS), np.float32(0.0)).reshape(-1, 1),
                "shape": np.array([n, width, q.shape[0]], np.int64),
                "query_scale": q_scale,
            }
            out[run] = self.session.run(None, feed)[0]
            i += n
        out[lengths == 0] = 0.0  # as models.encoders.maxsim: a document without tokens scores 0
        return out
