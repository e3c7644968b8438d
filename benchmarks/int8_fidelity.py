"""How close int8 bi-encoder graphs stay to fp32; writes ``benchmarks/results/int8-fidelity.json``
(+ ``int8-fidelity.md``).

    .venv/bin/python benchmarks/int8_fidelity.py [--models packaged:minilm,packaged:mpnet]

For each checkpoint, its fp32 ONNX export (the builder's cached one, as a teacher member or the
base model uses it) against int8 graphs (dynamic quantization of the MatMul weights):
``per-tensor`` (one weight scale per matrix), ``per-channel`` (one per output column, every
MatMul quantized) and ``per-channel-outliers-fp32``, what the builder exports: per channel, the
MatMuls whose input activations peak above ``OUTLIER_RATIO`` times their RMS on the calibration
passages left in fp32; and ``per-channel-outliers-smoothed``, those MatMuls smoothed instead
(SmoothQuant: the activations' outlier channels moved into the weights) and quantized like the
rest; ``per-channel-outliers-fp32-per-token``, the builder's graph with one activation
scale per token instead of per tensor (``export_int8_activations = "token"``); and
``per-channel-outliers-fp32-8bit-weights``, the builder's graph with 8-bit weights instead of
``INT8_WEIGHT_BITS`` (7): exact on CPUs with VNNI, saturating on those without (the result
records the CPU's flags). Every other int8 graph has 7-bit weights. On SciFact test
queries and corpus documents (the first ``--docs``):
cosine of each int8 embedding to the fp32 one (mean and minimum, queries and documents), the
share of each query's fp32 top-10 among the sampled documents that the int8 graph also ranks in
its top 10, the time to encode the documents and the queries (each graph run the same way,
one after another, the fastest of ``--repeats`` passes),
and the lowest cosine between a query encoded alone and in a batch (ONNX Runtime picks the
activation scale per batch, so an int8 embedding depends on its batch-mates; fp32 does not).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import typer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from index_build.calibration import CALIBRATION_TEXTS  # noqa: E402
from index_build.data import load_collection  # noqa: E402
from index_build.export import (  # noqa: E402
    DEFAULT_PARITY_TEXTS,
    INT8_NAME,
    INT8_WEIGHT_BITS,
    ONNX_NAME,
    OUTLIER_RATIO,
    base_dense_onnx,  # noqa: E402
    quantize_int8,
)
from index_build.metrics import write_json_atomic  # noqa: E402
from models.encoders import DenseEncoder  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "scifact"


def cpu_int8_features() -> list[str]:
    """The x86 flags that pick ONNX Runtime's integer GEMM kernel (Linux /proc/cpuinfo)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return []
    return sorted(f for f in set(flags) if f in {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"})


def fp32_matmuls(graph: Path) -> list[str]:
    """MatMul nodes of ``graph`` that still multiply by a float weight."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def fidelity(onnx_dir: Path, graphs: dict[str, Path], queries: list[str], docs: list[str],
             threads: int = 0, repeats: int = 1) -> dict[str, dict]:
    """Each int8 graph in ``graphs`` against ``onnx_dir``'s fp32 graph on ``queries`` and ``docs``."""
    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def timed(fn, *args) -> tuple[np.ndarray, float]:
        """``fn(*args)`` and its fastest wall time over ``repeats`` runs."""
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn(*args)
            best = min(best, time.perf_counter() - t0)
        return out, best

    def run(graph: Path) -> tuple[np.ndarray, np.ndarray, float, float, float]:
        enc = DenseEncoder(onnx_dir, onnx_file=str(graph), threads=threads)
        d, seconds = timed(enc.encode_docs, docs)
        q, q_seconds = timed(enc.encode_queries, queries)
        q = unit(q)
        # dynamic quantization scales activations per batch: the same query alone and in a batch
        alone = unit(np.concatenate([enc.encode_queries([t]) for t in queries]))
        return q, unit(d), seconds, q_seconds, float((alone * q).sum(1).min())

    q32, d32, s32, qs32, _ = run(onnx_dir / ONNX_NAME)
    k = min(10, len(docs))
    top32 = np.argsort(-(q32 @ d32.T), axis=1)[:, :k]
    rows: dict[str, dict] = {"fp32": {"docs_seconds": round(s32, 3), "queries_seconds": round(qs32, 3),
                                      "fp32_matmuls": len(fp32_matmuls(onnx_dir / ONNX_NAME))}}
    for label, graph in graphs.items():
        q, d, seconds, q_seconds, batch_cos = run(graph)
        cq, cd = (q * q32).sum(1), (d * d32).sum(1)
        top = np.argsort(-(q @ d.T), axis=1)[:, :k]
        overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(top, top32)])
        rows[label] = {"query_cos_mean": round(float(cq.mean()), 4), "query_cos_min": round(float(cq.min()), 4),
                       "doc_cos_mean": round(float(cd.mean()), 4), "doc_cos_min": round(float(cd.min()), 4),
                       f"top{k}_overlap": round(float(overlap), 4), "docs_seconds": round(seconds, 3),
                       "queries_seconds": round(q_seconds, 3),
                       "query_alone_vs_batched_cos_min": round(batch_cos, 4),
                       "fp32_matmuls": len(fp32_matmuls(graph))}
    return rows


def main(models: str = typer.Option("packaged:minilm,packaged:mpnet", help="comma-separated checkpoints"),
         queries: int = typer.Option(256, help="SciFact test queries"),
         docs: int = typer.Option(128, help="SciFact corpus documents (the first ones)"),
         threads: int = typer.Option(2, help="ONNX Runtime threads"),
         repeats: int = typer.Option(2, help="timed encoding passes per graph (the fastest is reported)"),
         calibration_len: int = typer.Option(256, help="word pieces per calibration passage (at most)"),
         data: Path = typer.Option(DATA, help="a BEIR corpus with a test split"),
         results_dir: Path = typer.Option(REPO / "benchmarks" / "results", help="where int8-fidelity.json/.md go")
         ) -> None:
    col = load_collection(data)
    qs = list(col.split_queries("test").values())[:queries]
    ds = col.doc_texts()[:docs]
    out = results_dir / "int8-fidelity.json"
    result: dict = {"command": "python benchmarks/int8_fidelity.py", "outlier_ratio": OUTLIER_RATIO,
                    "int8_weight_bits": INT8_WEIGHT_BITS, "cpu_int8_features": cpu_int8_features(),
                    "queries": len(qs), "docs": len(ds), "timing_repeats": repeats, "models": {}}
    for ref in [m.strip() for m in models.split(",") if m.strip()]:
        onnx_dir, _ = base_dense_onnx(ref)
        with tempfile.TemporaryDirectory() as tmp:
            enc = DenseEncoder(onnx_dir)
            feed = enc.tokenizer.encode([*CALIBRATION_TEXTS, *DEFAULT_PARITY_TEXTS],
                                        min(enc.config.max_doc_len, calibration_len)).as_dict()
            graphs = {"per-tensor": Path(tmp) / "per-tensor.onnx", "per-channel": Path(tmp) / "per-channel.onnx"}
            quantize_int8(onnx_dir / ONNX_NAME, graphs["per-tensor"], per_channel=False)
            quantize_int8(onnx_dir / ONNX_NAME, graphs["per-channel"], per_channel=True)
            graphs["per-channel-outliers-fp32"] = onnx_dir / INT8_NAME
            # the same with 8-bit weights (the builder's graph before INT8_WEIGHT_BITS): exact
            # where the CPU has VNNI, saturating int16 sums where it has not (see export.py)
            graphs["per-channel-outliers-fp32-8bit-weights"] = Path(tmp) / "8bit.onnx"
            quantize_int8(onnx_dir / ONNX_NAME, graphs["per-channel-outliers-fp32-8bit-weights"], per_channel=True,
                          calibration=feed, weight_bits=8)
            # the alternative: the same outlier MatMuls smoothed (SmoothQuant), then all int8
            graphs["per-channel-outliers-smoothed"] = Path(tmp) / "smoothed.onnx"
            quantize_int8(onnx_dir / ONNX_NAME, graphs["per-channel-outliers-smoothed"], per_channel=True,
                          calibration=feed, outliers="smooth")
            # the builder's graph with one activation scale per token instead of per batch
            graphs["per-channel-outliers-fp32-per-token"] = Path(tmp) / "per-token.onnx"
            quantize_int8(onnx_dir / ONNX_NAME, graphs["per-channel-outliers-fp32-per-token"], per_channel=True,
                          calibration=feed, activations="token")
            result["models"][ref] = fidelity(onnx_dir, graphs, qs, ds, threads=threads, repeats=repeats)
        print(ref, json.dumps(result["models"][ref], indent=1))
    write_json_atomic(out, result)
    md = f"# int8 against fp32 ({len(qs)} SciFact test queries, {len(ds)} documents)\n"
    for ref, rows in result["models"].items():
        cols = sorted({c for r in rows.values() for c in r}, key=lambda c: (c.endswith("_seconds"), c))
        md += f"\n## {ref}\n\n| graph | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
        md += "".join(f"| {g} | " + " | ".join(str(r.get(c, "")) for c in cols) + " |\n" for g, r in rows.items())
    out.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    typer.run(main)
