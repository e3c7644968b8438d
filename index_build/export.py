"""ONNX export of the students (dynamic batch and sequence axes), parity check against a
freshly loaded torch model, and optional int8 dynamic quantization; plus the exports of
untrained base checkpoints (teacher bi-encoders, the ``base-dense`` system), made once per
checkpoint into the cache dir (:func:`base_dense_onnx`)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from index_build.calibration import CALIBRATION_TEXTS
from models.encoders import ONNX_NAME, TOKEN_STATES, ColbertEncoder, CrossEncoderScorer, DenseEncoder, EncoderConfig
from models.sources import cache_dir, fingerprint, resolve_model

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
                   opset: int = 17, per_channel: bool = False, int8_activations: str = "tensor") -> ExportReport:
    """Export the saved student in ``student_dir`` to ``out_dir`` (model.onnx, tokenizer.json,
    encoder.json), check parity on ``parity_texts``, optionally add ``model.int8.onnx``."""
    import torch

    from index_build.students import AsymmetricStudent, WithTokenStates, load_student

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
        graph: torch.nn.Module = student
        outputs = [out_name]
        if isinstance(student, AsymmetricStudent):  # the query encoder: its token states too (one query pass)
            graph = WithTokenStates(student).eval()
            outputs.append(TOKEN_STATES)
            axes[TOKEN_STATES] = {0: "batch", 1: "sequence"}
        with torch.no_grad():
            torch.onnx.export(
                graph,
                tuple(sample[n] for n in names),
                str(tmp / ONNX_NAME),
                input_names=names,
                output_names=outputs,
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        shutil.copyfile(student_dir / "tokenizer.json", tmp / "tokenizer.json")
        student.config.save(tmp)
        texts = parity_texts or DEFAULT_PARITY_TEXTS
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
                                       calibration=calibration, activations=int8_activations)
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
#: levels. Some of all-mpnet-base-v2's FFN output projections exceed it (all-MiniLM-L6-v2 has
#: none); keeping them fp32 makes its int8 graph slower and closer to fp32
#: (``benchmarks/results/int8-fidelity.md``).
OUTLIER_RATIO = 128.0

#: bits of the int8 graphs' MatMul weights (``reduce_range``: values in [-64, 64]). ONNX
#: Runtime's u8 x s8 integer GEMM on x86 CPUs without VNNI (AVX2 or AVX-512 alone) adds the
#: products of adjacent byte pairs into int16 with saturation (VPMADDUBSW): 255 * 127 * 2
#: overflows it, 255 * 64 * 2 does not. With 8-bit weights an int8 graph that is exact on a
#: VNNI host gives garbage embeddings on an AVX2-only one; a graph must run on any host, so
#: the weights stay in 7 bits.
INT8_WEIGHT_BITS = 7
#: the mark of that width in cache keys (export stage, int8 teacher members)
INT8_WEIGHTS_MARK = f"weights-{INT8_WEIGHT_BITS}bit"


def matmul_input_stats(src: Path, feed: dict[str, np.ndarray]) -> dict[str, tuple[float, np.ndarray]]:
    """Per MatMul/Gemm node with a constant weight, over the real (unpadded) tokens of
    ``feed``: the peak of its input activations divided by their RMS, and each input
    channel's peak (``[K]``)."""
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
    out = {}
    for n in nodes:
        x = values[n.input[0]]
        if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
            x = x[mask.astype(bool)]
        x = np.abs(x.reshape(-1, x.shape[-1]))
        rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0
        out[n.name] = (float(x.max()) / rms if rms > 0 else 0.0, x.max(axis=0))
    return out


def outlier_matmuls(src: Path, feed: dict[str, np.ndarray], ratio: float = OUTLIER_RATIO) -> list[str]:
    """Names of the MatMul/Gemm nodes with a constant weight whose input activations, over
    the real (unpadded) tokens of ``feed``, peak above ``ratio`` times their RMS: the nodes
    a per-tensor activation scale would wreck (outlier features, as in LLM.int8())."""
    return [name for name, (peak, _) in matmul_input_stats(src, feed).items() if peak > ratio]


def smooth_matmuls(src: Path, dst: Path, channel_peaks: dict[str, np.ndarray], alpha: float = 0.5) -> list[str]:
    """SmoothQuant (Xiao et al. 2022, arXiv 2211.10438) on the named MatMuls: ``x W`` becomes
    ``(x / s) (diag(s) W)`` with ``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)`` (``channel_peaks``
    holds each node's ``max|x_j|``), so the activations' outlier channels move into weight rows,
    which a per-column weight scale absorbs. An elementwise Mul is inserted before each. Returns
    the nodes smoothed (a weight shared with another node is left alone)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    nodes, done = [], []
    for node in model.graph.node:
        peaks = channel_peaks.get(node.name)
        if peaks is not None and node.op_type == "MatMul" and uses.get(node.input[1]) == 1 and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)  # [K, N]
            scale = (np.maximum(peaks, 1e-5) ** alpha / np.maximum(np.abs(w).max(axis=1), 1e-5) ** (1 - alpha))
            scale = scale.astype(np.float32)
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(w * scale[:, None], node.input[1]))
            inv = numpy_helper.from_array((1.0 / scale).astype(np.float32), f"{node.name}/smooth_inv")
            model.graph.initializer.append(inv)
            smoothed = f"{node.name}/smoothed_input"
            nodes.append(helper.make_node("Mul", [node.input[0], inv.name], [smoothed], name=f"{node.name}/smooth"))
            node.input[0] = smoothed
            done.append(node.name)
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(dst))
    return done


#: how an int8 graph quantizes the activations entering its MatMuls: ``"tensor"``, ONNX
#: Runtime's dynamic quantization (one scale per tensor, so for the whole batch), or
#: ``"token"`` (one per row: :func:`per_token_activations`)
INT8_ACTIVATIONS = ("tensor", "token")


def per_token_activations(src: Path, dst: Path) -> int:
    """Rewrite the dynamically quantized graph ``src`` so that each token (row) of a MatMul's
    input gets its own activation scale; returns how many quantization points changed.

    ONNX Runtime's ``DynamicQuantizeLinear`` takes one scale and zero point over the whole
    input tensor: every padded batch-mate and padding position moves it, so a text's int8
    embedding depends on what it was batched with. Here each is replaced by symmetric per-row
    quantization, ``round(127 x / max|x_row|) + 128`` as uint8 with the scalar zero point 128
    (which ``MatMulInteger`` requires), and the row scale ``max|x_row| / 127`` multiplies the
    result after the MatMul: the scale product ONNX Runtime's ``MatMulIntegerToFloat`` fusion
    takes must stay scalar, so that product gets 1.0 (the fusion misreads a per-row one).
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    quantizers = [n for n in graph.node if n.op_type == "DynamicQuantizeLinear"]
    if not quantizers:
        onnx.save(model, str(dst))
        return 0
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    one, eps, qmax, unit, zero = "per_token/one", "per_token/eps", "per_token/qmax", "per_token/unit", "per_token/zp"
    graph.initializer.extend([
        numpy_helper.from_array(np.array(1.0, np.float32), one),
        numpy_helper.from_array(np.array(1e-12, np.float32), eps),
        numpy_helper.from_array(np.array(127.0, np.float32), qmax),
        numpy_helper.from_array(np.array(1.0 / 127.0, np.float32), unit),
        numpy_helper.from_array(np.array(128, np.uint8), zero),
    ])
    if opset >= 18:
        graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "per_token/axes"))

    def reduce(op: str, x: str, y: str, name: str) -> Any:
        if opset >= 18:
            return helper.make_node(op, [x, "per_token/axes"], [y], name=name, keepdims=1)
        return helper.make_node(op, [x], [y], name=name, axes=[-1], keepdims=1)

    replace: dict[str, list[Any]] = {}
    after: dict[str, str] = {}  # output-scaling Mul -> the row scale it must still apply
    for dq in quantizers:
        x: str = dq.input[0]
        q, scale, zp = (str(name) for name in dq.output)
        p = dq.name
        replace[p] = [
            reduce("ReduceMax", x, f"{p}/row_max", f"{p}/RowMax"),
            reduce("ReduceMin", x, f"{p}/row_min", f"{p}/RowMin"),
            helper.make_node("Neg", [f"{p}/row_min"], [f"{p}/row_neg_min"], name=f"{p}/Neg"),
            helper.make_node("Max", [f"{p}/row_max", f"{p}/row_neg_min", eps], [f"{p}/row_absmax"], name=f"{p}/AbsMax"),
            helper.make_node("Div", [f"{p}/row_absmax", qmax], [scale], name=f"{p}/RowScale"),
            helper.make_node("Div", [x, f"{p}/row_absmax"], [f"{p}/unit"], name=f"{p}/Normalize"),
            helper.make_node("QuantizeLinear", [f"{p}/unit", unit, zero], [q], name=f"{p}/Quantize"),
            helper.make_node("Identity", [zero], [zp], name=f"{p}/ZeroPoint"),
        ]
        for use in consumers.get(scale, []):
            # ORT's pattern: Mul(a_scale, b_scale) -> Mul(Cast(MatMulInteger(...)), that product)
            outs = consumers.get(use.output[0], []) if use.op_type == "Mul" else []
            if use.op_type != "Mul" or not outs or any(o.op_type != "Mul" for o in outs):
                raise ValueError(f"per_token_activations: unexpected use of {scale!r} by {use.op_type} {use.name!r}")
            use.input[list(use.input).index(scale)] = one
            for out in outs:
                after[out.name] = scale
    nodes: list[Any] = []
    for node in graph.node:
        if node.name in replace:
            nodes.extend(replace[node.name])
            continue
        nodes.append(node)
        if node.name in after:
            y = node.output[0]
            node.output[0] = f"{y}/before_row_scale"
            nodes.append(helper.make_node("Mul", [node.output[0], after[node.name]], [y], name=f"{node.name}/RowScale"))
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(dst))
    return len(quantizers)


#: the start of the warning ``onnxruntime.quantization`` logs for every graph it quantizes
#: (its pre-processing is shape inference and graph optimization for static, calibrated
#: quantization; this dynamic quantization does not need it)
PREPROCESS_HINT = "Please consider to run pre-processing before quantization"


@contextlib.contextmanager
def _root_info_dropped() -> Iterator[None]:
    """Drop INFO/DEBUG records logged on the root logger itself while the block runs, and the
    pre-processing hint (:data:`PREPROCESS_HINT`): ``onnxruntime.quantization`` reports every
    node it leaves alone that way (about 200 lines for one int8 all-mpnet-base-v2 export). A
    logger's filter sees only its own records, so named loggers' records, which propagate to
    the root's handlers, still pass, and so do the root's other warnings."""
    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and not record.getMessage().startswith(PREPROCESS_HINT)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def quantize_int8(src: Path, dst: Path, *, per_channel: bool = False,
                  calibration: dict[str, np.ndarray] | None = None,
                  outliers: Literal["fp32", "smooth"] = "fp32",
                  activations: str = "tensor", weight_bits: int = INT8_WEIGHT_BITS) -> list[str]:
    """Dynamic int8 quantization of the MatMul weights (onnxruntime.quantization), in
    ``weight_bits`` bits (7 or 8; see :data:`INT8_WEIGHT_BITS`); returns the nodes kept in fp32.

    ``per_channel``: one scale per output column instead of one per weight matrix. Same speed;
    it matters for models with outlier columns: all-mpnet-base-v2 reranking DL19's BM25 top-100
    scores nDCG@10 0.6812 in fp32, 0.6229 per tensor, 0.6586 per channel
    (``benchmarks/results/teachers.json``, ``dl19.mpnet_precision``).
    ``calibration``: a model input (as the graph takes it); the MatMuls whose inputs have
    outliers on it (:func:`outlier_matmuls`) are left in fp32, or with ``outliers="smooth"``
    smoothed (:func:`smooth_matmuls`) and quantized like the rest.
    ``activations``: ``"token"`` gives each row of a MatMul input its own scale
    (:func:`per_token_activations`): embeddings no longer depend on batch-mates, at some speed.
    """
    if weight_bits not in (7, 8):
        raise ValueError(f"int8 weights take 7 or 8 bits, got {weight_bits}")
    if activations not in INT8_ACTIVATIONS:
        raise ValueError(f"int8 activations must be one of {', '.join(INT8_ACTIVATIONS)}, got {activations!r}")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    stats = matmul_input_stats(src, calibration) if calibration is not None else {}
    flagged = {name: peaks for name, (peak, peaks) in stats.items() if peak > OUTLIER_RATIO}
    keep = list(flagged) if outliers == "fp32" else []
    with tempfile.TemporaryDirectory() as tmp, _root_info_dropped():
        if outliers == "smooth" and flagged:
            smoothed = Path(tmp) / "smoothed.onnx"
            keep = [n for n in flagged if n not in smooth_matmuls(src, smoothed, flagged)]
            src = smoothed
        target = Path(tmp) / "per_tensor.onnx" if activations == "token" else dst
        quantize_dynamic(str(src), str(target), weight_type=QuantType.QInt8, per_channel=per_channel,
                         reduce_range=weight_bits == 7,
                         op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=keep)
        if activations == "token":
            per_token_activations(target, dst)
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


DEFAULT_PARITY_TEXTS = [
    "Vitamin D deficiency is associated with an increased risk of fractures in older adults.",
    "The mitochondrial genome encodes thirteen proteins of the respiratory chain.",
    "What is the capital of France?",
    "Randomized controlled trials show no effect of the intervention on mortality, "
    "although observational studies suggested a benefit; bias and confounding explain part of it.",
    "ONNX Runtime runs exported graphs on CPU and GPU.",
]


def base_dense_onnx(model_ref: str, *, max_doc_len: int = 256, activations: str = "tensor") -> tuple[Path, str]:
    """``(dir, fingerprint)`` of a dense ONNX export of ``model_ref`` without training; its
    int8 graph (an int8 teacher member's) is quantized per channel, outlier MatMuls kept fp32,
    activations scaled as ``activations`` says (:func:`quantize_int8`)."""
    path = resolve_model(model_ref)
    fp = fingerprint(path)
    # "-pc-o<ratio>-w<bits>": int8 per channel, MatMuls with outlier inputs kept fp32
    # (export.OUTLIER_RATIO), weights in export.INT8_WEIGHT_BITS bits; "-a<mode>" unless per tensor
    suffix = "" if activations == "tensor" else f"-a{activations}"
    out = cache_dir() / "onnx" / f"dense-{fp}-{max_doc_len}-pc-o{OUTLIER_RATIO:g}-w{INT8_WEIGHT_BITS}{suffix}"
    if (out / "model.onnx").is_file():
        return out, fp
    from index_build.students import new_student

    staging = out.with_name(out.name + f".staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        new_student("dense", path, max_doc_len=max_doc_len).save(staging / "student")
        export_student(staging / "student", staging / "onnx", int8=True, per_channel=True, int8_activations=activations)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staging / "onnx", out)
        except OSError:
            if not (out / "model.onnx").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out, fp
