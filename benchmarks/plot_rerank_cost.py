"""What reranking costs and what it buys: ColBERT vs cross-encoder at 100 candidates.

Reads the latency of each rerank mode from ``benchmarks/results/latency.json`` (written by
``benchmarks/latency.py``) and each system's nDCG@10 on SciFact from
``benchmarks/results/scifact.json`` (written by ``index-build all``; systems ``dense``,
``dense+colbert``, ``dense+cross-encoder``), and writes

- ``benchmarks/results/rerank_cost.md``: a Markdown table (p50 / p95 / p99 end-to-end and
  rerank-stage latency at concurrency 1 and the QPS at concurrency 16, next to nDCG@10);
- ``benchmarks/results/rerank_cost.png``: nDCG@10 against p50 latency per mode.

Run::

    .venv/bin/python benchmarks/plot_rerank_cost.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: rerank mode in latency.json -> system in scifact.json
SYSTEMS = {"none": "dense", "colbert": "dense+colbert", "cross-encoder": "dense+cross-encoder"}


def rows(latency: Mapping[str, Any], quality: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per rerank mode present in ``latency``.

    >>> lat = {"colbert": {"c1": {"p50_ms": 12.0, "p95_ms": 15.0, "p99_ms": 20.0, "candidates": 100,
    ...                          "stages": {"rerank": {"p50_ms": 5.0}}}, "c16": {"qps": 80.0}}}
    >>> q = {"systems": {"dense+colbert": {"nDCG@10": 0.7}}}
    >>> r = rows(lat, q)[0]
    >>> r["mode"], r["system"], r["nDCG@10"], r["p50_ms"], r["rerank_p50_ms"], r["qps_c16"]
    ('colbert', 'dense+colbert', 0.7, 12.0, 5.0, 80.0)
    """
    systems = quality.get("systems", {})
    out = []
    for mode, system in SYSTEMS.items():
        if mode not in latency:
            continue
        c1 = latency[mode].get("c1", {})
        c16 = latency[mode].get("c16", {})
        out.append({
            "mode": mode, "system": system, "nDCG@10": systems.get(system, {}).get("nDCG@10"),
            "candidates": c1.get("candidates"),
            "p50_ms": c1.get("p50_ms"), "p95_ms": c1.get("p95_ms"), "p99_ms": c1.get("p99_ms"),
            "rerank_p50_ms": c1.get("stages", {}).get("rerank", {}).get("p50_ms"),
            "qps_c16": c16.get("qps"), "p99_ms_c16": c16.get("p99_ms"),
        })
    return out


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(table: Sequence[Mapping[str, Any]], sources: Sequence[str]) -> str:
    """The Markdown report of :func:`rows`."""
    lines = [
        "# Rerank cost on SciFact: ColBERT vs cross-encoder", "",
        "Rerankers rescore the dense student's top candidates. Latency: end-to-end client time at "
        "concurrency 1 (and QPS / p99 at concurrency 16) of the real service; nDCG@10: the builder's "
        "offline evaluation on the SciFact test split.", "",
        "| rerank | system | candidates | nDCG@10 | p50 ms | p95 ms | p99 ms | rerank stage p50 ms "
        "| QPS @ c16 | p99 ms @ c16 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['mode']} | {r['system']} | {_fmt(r['candidates'])} | {_fmt(r['nDCG@10'], 4)} | {_fmt(r['p50_ms'])} "
            f"| {_fmt(r['p95_ms'])} | {_fmt(r['p99_ms'])} | {_fmt(r['rerank_p50_ms'])} | {_fmt(r['qps_c16'])} "
            f"| {_fmt(r['p99_ms_c16'])} |"
        )
    by_mode = {r["mode"]: r for r in table}
    col, ce = by_mode.get("colbert"), by_mode.get("cross-encoder")
    if col and ce and col.get("p50_ms") and ce.get("p50_ms"):
        lines += ["", f"The cross-encoder takes {ce['p50_ms'] / col['p50_ms']:.1f}x the p50 latency of ColBERT "
                      f"({_fmt(ce['p50_ms'])} vs {_fmt(col['p50_ms'])} ms)"
                      + (f" for {ce['nDCG@10'] - col['nDCG@10']:+.4f} nDCG@10."
                         if ce.get("nDCG@10") is not None and col.get("nDCG@10") is not None else ".")]
    lines += ["", "Sources: " + ", ".join(f"`{s}`" for s in sources), ""]
    return "\n".join(lines)


def plot(table: Sequence[Mapping[str, Any]], path: Path) -> None:
    """nDCG@10 against p50 latency (log x), one labelled point per mode; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for r in table:
        if r["p50_ms"] is None or r["nDCG@10"] is None:
            continue
        ax.errorbar([r["p50_ms"]], [r["nDCG@10"]], xerr=[[0], [max(0.0, (r["p99_ms"] or r["p50_ms"]) - r["p50_ms"])]],
                    fmt="o", capsize=3, label=f"{r['system']} (p50, bar to p99)")
        ax.annotate(r["mode"], (r["p50_ms"], r["nDCG@10"]), textcoords="offset points", xytext=(6, 6))
    ax.set_xscale("log")
    ax.set_xlabel("end-to-end latency at concurrency 1, ms (log)")
    ax.set_ylabel("nDCG@10 (SciFact test)")
    ax.set_title("Rerank cost vs quality at 100 candidates")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


def _display(path: Path) -> str:
    """``path`` relative to the repository when inside it (result files name no machine paths)."""
    try:
        return str(path.resolve().relative_to(RESULTS_DIR.parent.parent))
    except ValueError:
        return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latency", type=Path, default=RESULTS_DIR / "latency.json")
    p.add_argument("--quality", type=Path, default=RESULTS_DIR / "scifact.json")
    p.add_argument("--out-md", type=Path, default=RESULTS_DIR / "rerank_cost.md")
    p.add_argument("--out-png", type=Path, default=RESULTS_DIR / "rerank_cost.png")
    args = p.parse_args(argv)
    for path in (args.latency, args.quality):
        if not path.is_file():
            p.error(f"{path} not found (run benchmarks/latency.py and index-build all first)")
    table = rows(json.loads(args.latency.read_text()), json.loads(args.quality.read_text()))
    if not table:
        p.error(f"{args.latency} has no rerank mode results")
    md = markdown(table, [_display(args.latency), _display(args.quality)])
    args.out_md.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out_md.with_name(args.out_md.name + ".tmp")
    tmp.write_text(md)
    tmp.replace(args.out_md)
    plot(table, args.out_png)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
