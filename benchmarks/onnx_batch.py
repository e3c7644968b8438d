"""Document-side ONNX throughput by batch size: the dense and ColBERT document encoders and the
cross-encoder, fp32 and int8, on SciFact documents; writes ``benchmarks/results/onnx-batch.json``
(+ ``.md``).

    .venv/bin/python benchmarks/onnx_batch.py [--docs 384] [--repeats 3]

The graphs are the base model's (all-MiniLM-L6-v2) exported as each student kind without
training: speed does not depend on the weights. Texts are the first ``--docs`` SciFact
documents (title + abstract, truncated at 256 tokens like the students); the cross-encoder
pairs each with one claim. Every (model, precision, batch size) cell is timed ``--repeats``
times in one run, interleaved, and reports the median documents per second; ratios are
against the library default batch size (32).
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import typer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from index_build.metrics import write_json_atomic  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
DEFAULT = 32


def export_kinds(root: Path, kinds: list[str], model: str, max_len: int) -> dict[str, Path]:
    from index_build.export import export_student
    from index_build.students import new_student
    from models.sources import resolve_model

    base = resolve_model(model)
    out = {}
    for kind in kinds:
        new_student(kind, base, max_doc_len=max_len).save(root / kind / "student")
        export_student(root / kind / "student", root / kind / "onnx", int8=True)
        out[kind] = root / kind / "onnx"
    return out


def main(docs: int = typer.Option(128, help="SciFact documents to encode per cell"),
         repeats: int = typer.Option(2, help="timings per cell (median reported)"),
         model: str = typer.Option("packaged:minilm", help="checkpoint exported as each kind"),
         max_len: int = typer.Option(256, help="document tokens (the students' max_doc_len)"),
         data: Path = typer.Option(REPO.parent / "shared" / "data" / "scifact", help="a BEIR corpus"),
         threads: int = typer.Option(0, help="ONNX Runtime intra-op threads (0: library default)"),
         results_dir: Path = typer.Option(RESULTS, help="where onnx-batch.json/.md go")) -> None:
    from models.encoders import ColbertEncoder, CrossEncoderScorer, DenseEncoder

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with (data / "corpus.jsonl").open() as f:
        rows = [json.loads(line) for _, line in zip(range(docs), f)]
    texts = [(r.get("title", "") + " " + r.get("text", "")).strip() for r in rows]
    claim = "Vitamin D deficiency increases the risk of fractures in older adults."
    kinds = ["dense", "colbert", "cross-encoder"]
    runtime = {"dense": DenseEncoder, "colbert": ColbertEncoder, "cross-encoder": CrossEncoderScorer}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = export_kinds(Path(tmp), kinds, model, max_len)
        encoders: dict[tuple[str, str], Any] = {(k, f): runtime[k](dirs[k], onnx_file=f, threads=threads)
                    for k in kinds for f in ("model.onnx", "model.int8.onnx")}

        def run(key: tuple[str, str], bs: int) -> float:
            enc = encoders[key]
            t0 = time.perf_counter()
            if key[0] == "cross-encoder":
                enc.score(claim, texts, batch_size=bs)
            else:
                enc.encode_docs(texts, batch_size=bs)
            return time.perf_counter() - t0

        for key in encoders:  # warm-up: first runs allocate
            run(key, 8)
        times: dict[tuple[str, str, int], list[float]] = {}
        for _ in range(repeats):
            for key in encoders:
                for bs in BATCH_SIZES:
                    times.setdefault((*key, bs), []).append(run(key, bs))
    cells: dict = {}
    for (kind, graph, bs), ts in times.items():
        precision = "int8" if "int8" in graph else "fp32"
        cells.setdefault(kind, {}).setdefault(precision, {})[str(bs)] = round(len(texts) / statistics.median(ts), 2)
    ratios = {k: {p: {bs: round(v / row[str(DEFAULT)], 3) for bs, v in row.items()} for p, row in by.items()}
              for k, by in cells.items()}
    best = {k: {p: int(max(row, key=lambda b: row[b])) for p, row in by.items()} for k, by in cells.items()}
    command = f"python benchmarks/onnx_batch.py --docs {docs} --repeats {repeats}"
    command += f" --threads {threads}" if threads else ""
    command += f" --model {model}" if model != "packaged:minilm" else ""
    command += f" --max-len {max_len}" if max_len != 256 else ""
    result = {"command": command,
              "docs": len(texts), "unit": "documents per second (median of repeats)",
              "docs_per_second": cells, "ratio_to_batch_32": ratios, "fastest_batch_size": best}
    out = results_dir / "onnx-batch.json"
    write_json_atomic(out, result)
    lines = ["### document-side ONNX throughput (docs/s) by batch size", "",
             "| model | precision | " + " | ".join(str(b) for b in BATCH_SIZES) + " |",
             "|---" * (len(BATCH_SIZES) + 2) + "|"]
    for kind, by in cells.items():
        for precision, row in by.items():
            lines.append(f"| {kind} | {precision} | " + " | ".join(str(row[str(b)]) for b in BATCH_SIZES) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + f"\n\n`{result['command']}`\n")
    logging.info("fastest batch sizes: %s", best)


if __name__ == "__main__":
    typer.run(main)
