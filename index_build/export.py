"""ONNX export of the students (dynamic batch and sequence axes), parity check against a
freshly loaded torch model, and optional int8 dynamic quantization."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from index_build.calibration import CALIBRATION_TEXTS
from models.encoders import ONNX_NAME, ColbertEncoder, CrossEncoderScorer, DenseEncoder, EncoderConfig

INT8_NAME = "model.int8.onnx"
_OUTPUT_NAMES = {"dense": "embeddings", "colbert": "token_embeddings", "cross-encoder": "scores"}
_RUNTIME = {"dense": DenseEncoder, "colbert": ColbertEncoder, "cross-encoder": CrossEncoderScorer}


@dataclass
class ExportReport:
    directory: str
    max_abs_diff: float
    int8: bool
    int8_max_abs_diff: float | None = None
    #: MatMuls the int8 graph keeps in fp32 (their inputs have outliers: :func:`outlier_matmuls`)
    int8_fp32_nodes: list[str] = field(default_factory=list)


def export_student(student_dir: Path, out_dir: Path, *, int8: bool = True, parity_texts: list[str] | None = None,
                   opset: int = 17, per_channel: bool = False) -> ExportReport:
    """Export the saved student in ``student_dir`` to ``out_dir`` (model.onnx, tokenizer.json,
    encoder.json), check parity on ``parity_texts``, optionally add ``model.int8.onnx``."""
    import torch

    from index_build.students import load_student

    student_dir, out_dir = Path(student_dir), Path(out_dir)
    student = load_student(student_dir)
    kind = student.config.kind
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        sample = _sample_batch(student, ["a short query", "another, slightly longer example sentence"])
        names = ["input_ids", "attention_mask", "token_type_ids"]
        axes = {n: {0: "batch", 1: "sequence"} for n in names}
        out_name = _OUTPUT_NAMES[kind]
        axes[out_name] = {0: "batch", 1: "sequence"} if kind == "colbert" else {0: "batch"}
        with torch.no_grad():
            torch.onnx.export(
                student,
                tuple(sample[n] for n in names),
                str(tmp / ONNX_NAME),
                input_names=names,
                output_names=[out_name],
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        shutil.copyfile(student_dir / "tokenizer.json", tmp / "tokenizer.json")
        student.config.save(tmp)
        texts = parity_texts or _DEFAULT_PARITY_TEXTS
        diff = parity(student, tmp, texts)
        int8_diff, fp32_nodes = None, []
        if int8:
            # realistic full-length passages besides the parity texts: short ones understate the peaks
            # within the checkpoint's positions (a tiny test model may have fewer than max_doc_len),
            # a cross-encoder's query and special tokens included
            positions = getattr(student.encoder.config, "max_position_embeddings", None)
            room = positions - student.config.max_query_len - 4 if positions else None
            calibration = {k: v.numpy() for k, v in _sample_batch(
                student, [*CALIBRATION_TEXTS, *texts], max_len=room).items()}
            fp32_nodes = quantize_int8(tmp / ONNX_NAME, tmp / INT8_NAME, per_channel=per_channel,
                                       calibration=calibration)
            int8_diff = parity(student, tmp, texts, onnx_file=INT8_NAME)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportReport(str(out_dir), diff, int8, int8_diff, fp32_nodes)


#: a MatMul whose input activations on the calibration texts peak above this many times their
#: RMS keeps fp32 weights in the int8 graph. ONNX Runtime's dynamic quantization gives each
#: activation tensor one scale, so at a peak/RMS ratio r a typical value spans about 255 / (2r)
#: levels. Measured on 16 SciFact abstracts: all-mpnet-base-v2's FFN output projections in layers
#: 6-10 reach 174-293 (every other MatMul input there, and every one of all-MiniLM-L6-v2, at most
#: 94); quantizing them anyway left its int8 query embeddings at mean cosine 0.88 to fp32 (0.99
#: with them kept fp32, at about the same speed).
OUTLIER_RATIO = 128.0


def outlier_matmuls(src: Path, feed: dict[str, np.ndarray], ratio: float = OUTLIER_RATIO) -> list[str]:
    """Names of the MatMul/Gemm nodes with a constant weight whose input activations, over
    the real (unpadded) tokens of ``feed``, peak above ``ratio`` times their RMS: the nodes
    a per-tensor activation scale would wreck (outlier features, as in LLM.int8())."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(str(src))
    weights = {t.name for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    known = {o.name for o in model.graph.output}
    for tensor in dict.fromkeys(n.input[0] for n in nodes):
        if tensor not in known:
            model.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.onnx"
        onnx.save(model, str(probe), save_as_external_data=True, location="probe.data")
        session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
        inputs = {i.name for i in session.get_inputs()}
        names = [o.name for o in session.get_outputs()]
        values = dict(zip(names, session.run(None, {k: v for k, v in feed.items() if k in inputs})))
    mask = feed.get("attention_mask")
    out = []
    for n in nodes:
        x = values[n.input[0]]
        if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
            x = x[mask.astype(bool)]
        rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0
        if rms > 0 and float(np.abs(x).max()) > ratio * rms:
            out.append(n.name)
    return out


def quantize_int8(src: Path, dst: Path, *, per_channel: bool = False,
                  calibration: dict[str, np.ndarray] | None = None) -> list[str]:
    """Dynamic int8 quantization of the MatMul weights (onnxruntime.quantization); returns
    the nodes kept in fp32.

    ``per_channel``: one scale per output column instead of one per weight matrix. Same speed;
    it matters for models with outlier columns: all-mpnet-base-v2 reranking DL19's BM25 top-100
    scores nDCG@10 0.6812 in fp32, 0.6229 per tensor, 0.6586 per channel
    (``benchmarks/results/teachers.json``, ``dl19.mpnet_precision``).
    ``calibration``: a model input (as the graph takes it); the MatMuls whose inputs have
    outliers on it (:func:`outlier_matmuls`) are left in fp32.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    keep = outlier_matmuls(src, calibration) if calibration is not None else []
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                     op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=keep)
    return keep


def parity(student, onnx_dir: Path, texts: list[str], onnx_file: str = ONNX_NAME) -> float:
    """Max abs difference between the torch student and the ONNX graph on ``texts``."""
    import torch

    kind = student.config.kind
    runtime: Any = _RUNTIME[kind](onnx_dir, onnx_file=onnx_file)
    with torch.no_grad():
        if kind == "dense":
            ref = student.encode_docs(texts).numpy()
            got = runtime.encode_docs(texts)
            return float(np.abs(ref - got).max())
        if kind == "colbert":
            ref_t, keep = student.encode_docs(texts)
            ref_list = [ref_t[i][keep[i]].numpy() for i in range(len(texts))]
            got_list = runtime.encode_docs(texts)
            q_ref = student.encode_queries(texts[:4]).numpy()
            q_got = runtime.encode_queries(texts[:4])
            d = max(float(np.abs(a - b).max()) for a, b in zip(ref_list, got_list))
            return max(d, float(np.abs(q_ref - q_got).max()))
        queries = [texts[-1]] * len(texts)
        ref = student.score_pairs(queries, texts).numpy()
        got = runtime.score_pairs(queries, texts)
        return float(np.abs(ref - got).max())


def _sample_batch(student, texts: list[str], max_len: int | None = None):
    """A model input of ``texts`` as documents (pairs for a cross-encoder), at most
    ``max_len`` (default: the config's document length) word pieces each."""
    from index_build.students import to_torch

    cfg: EncoderConfig = student.config
    tok = student.tokenizer
    doc_len = min(cfg.max_doc_len, max_len or cfg.max_doc_len)
    if cfg.kind == "colbert":
        batch = tok.encode_colbert_docs(texts, doc_len)
    elif cfg.kind == "cross-encoder":
        batch = tok.encode_pairs(texts, texts[::-1], doc_len, cfg.max_query_len)
    else:
        batch = tok.encode(texts, doc_len)
    return to_torch(batch)


_DEFAULT_PARITY_TEXTS = [
    "Vitamin D deficiency is associated with an increased risk of fractures in older adults.",
    "The mitochondrial genome encodes thirteen proteins of the respiratory chain.",
    "What is the capital of France?",
    "Randomized controlled trials show no effect of the intervention on mortality, "
    "although observational studies suggested a benefit; bias and confounding explain part of it.",
    "ONNX Runtime runs exported graphs on CPU and GPU.",
]
