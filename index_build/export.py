"""ONNX export of the students (dynamic batch and sequence axes), parity check against a
freshly loaded torch model, and optional int8 dynamic quantization."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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
        int8_diff = None
        if int8:
            quantize_int8(tmp / ONNX_NAME, tmp / INT8_NAME, per_channel=per_channel)
            int8_diff = parity(student, tmp, texts, onnx_file=INT8_NAME)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportReport(str(out_dir), diff, int8, int8_diff)


def quantize_int8(src: Path, dst: Path, *, per_channel: bool = False) -> None:
    """Dynamic int8 quantization of the MatMul weights (onnxruntime.quantization).

    ``per_channel``: one scale per output column instead of one per weight matrix. Same speed;
    it matters for models with outlier columns: all-mpnet-base-v2 reranking DL19's BM25 top-100
    scores nDCG@10 0.6812 in fp32, 0.6229 per tensor, 0.6586 per channel
    (``benchmarks/results/teachers.json``, ``dl19.mpnet_precision``).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                     op_types_to_quantize=["MatMul", "Gemm"])


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


def _sample_batch(student, texts: list[str]):
    from index_build.students import to_torch

    cfg: EncoderConfig = student.config
    tok = student.tokenizer
    if cfg.kind == "colbert":
        batch = tok.encode_colbert_docs(texts, cfg.max_doc_len)
    elif cfg.kind == "cross-encoder":
        batch = tok.encode_pairs(texts, texts[::-1], cfg.max_doc_len, cfg.max_query_len)
    else:
        batch = tok.encode(texts, cfg.max_doc_len)
    return to_torch(batch)


_DEFAULT_PARITY_TEXTS = [
    "Vitamin D deficiency is associated with an increased risk of fractures in older adults.",
    "The mitochondrial genome encodes thirteen proteins of the respiratory chain.",
    "What is the capital of France?",
    "Randomized controlled trials show no effect of the intervention on mortality, "
    "although observational studies suggested a benefit; bias and confounding explain part of it.",
    "ONNX Runtime runs exported graphs on CPU and GPU.",
]
