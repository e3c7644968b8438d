"""ColBERT rerank: how the service reads document tokens (``NRS_COLBERT_TOKENS``), quality
and CPU per query of each mode, measured in one run.

Run from the repository root once the SciFact artifact exists::

    .venv/bin/python benchmarks/colbert_tokens.py --artifact artifacts/scifact

For each mode (``compressed``: the artifact's residual codes decoded per query; ``float32``
and ``int8``: decoded once at load into RAM, see :meth:`models.token_index.TokenIndex.to_memory`)
the artifact is loaded in-process by :class:`service.search.SearchEngine`, exactly as the
service loads it (``--env NRS_X=VALUE`` settings apply to every mode), and every judged
test query is searched with ``rerank=colbert`` over the dense top-``--candidates``. Reported
per mode: nDCG@10, RR@10 and R@100 of the served ranking (ColBERT interpolated with the
first stage at the artifact's weight) and of plain MaxSim (``colbert_weight=1``); the
median and p95 of the rerank stage's own timing (one thread, queries one after another);
the RAM the token store takes; load time; and, against ``compressed``, the rerank speed-up
and the top-10 agreement.

Writes ``benchmarks/results/colbert-tokens.json`` and ``colbert-tokens.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.latency import command_line, latency_summary, machine_info, write_json_atomic

REPO = Path(__file__).resolve().parents[1]
MODES = ("compressed", "float32", "int8")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, default=REPO / "artifacts" / "scifact")
    p.add_argument("--data", type=Path, default=Path(os.environ.get("NRS_SHARED_DATA", REPO.parent / "shared" / "data"))
                   / "scifact", help="BEIR folder with the queries and qrels (default ../shared/data/scifact)")
    p.add_argument("--split", default="test")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--env", action="append", default=[], metavar="NRS_X=VALUE",
                   help="service setting for every mode, e.g. NRS_USE_INT8=true")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "colbert-tokens.json")
    return p.parse_args(argv)


def settings_for(args: argparse.Namespace, mode: str) -> Any:
    from service.settings import Settings

    env: dict[str, Any] = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("NRS_"):
            raise SystemExit(f"--env {item!r}: expected NRS_X=VALUE")
        env[key[4:].lower()] = value
    env.setdefault("threads", 1)
    return Settings(artifact_dir=args.artifact, warmup=False, **{"colbert_tokens": mode, **env})


def token_store_bytes(engine: Any) -> int:
    ti = engine.token_index
    if ti.int8 is not None:
        return int(ti.int8.nbytes)
    if ti.tokens is not None:
        return int(ti.tokens.nbytes)
    return int(ti.codes.nbytes + ti.residuals.nbytes)


def measure(args: argparse.Namespace, mode: str, queries: dict[str, str]) -> dict[str, Any]:
    from index_build.metrics import metrics
    from service.search import SearchEngine

    started = time.perf_counter()
    engine = SearchEngine.load(args.artifact, settings_for(args, mode))
    load_s = time.perf_counter() - started
    k = args.candidates
    served_weights = dict(engine.weights.colbert)
    engine.search(next(iter(queries.values())), rerank="colbert", candidates=k, k=k)  # warm
    runs: dict[str, dict[str, dict[str, float]]] = {}
    rerank_ms: list[float] = []
    # the served ranking (ColBERT mixed with the first stage at the artifact's weights), then
    # plain MaxSim (weight 1) over the same token store; the rerank timing from the first pass
    for name, weights in (("served", served_weights), ("maxsim", dict.fromkeys(served_weights, 1.0))):
        engine.weights = dataclasses.replace(engine.weights, colbert=weights)
        runs[name] = {}
        for qid, text in queries.items():
            r = engine.search(text, rerank="colbert", candidates=k, k=k)
            runs[name][qid] = {h.id: h.score for h in r.hits}
            if name == "served":
                rerank_ms.append(r.timings.rerank)
    out = {
        "served": metrics(args.qrels, runs["served"]),
        "maxsim": metrics(args.qrels, runs["maxsim"]),
        "rerank_ms": latency_summary(rerank_ms),
        "token_store_bytes": token_store_bytes(engine),
        "load_s": round(load_s, 2),
        "colbert_weights": served_weights,
        "_top10": {q: [d for d, _ in sorted(s.items(), key=lambda x: -x[1])[:10]] for q, s in runs["served"].items()},
    }
    engine.close()
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# ColBERT token store modes (`NRS_COLBERT_TOKENS`)", "",
        f"`{result['command']}`", "",
        "| mode | nDCG@10 (served) | nDCG@10 (MaxSim) | R@100 | rerank p50 ms | speed-up vs compressed | "
        "top-10 same as compressed | token store MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in result["modes"].items():
        lines.append(
            f"| {mode} | {r['served']['nDCG@10']:.4f} | {r['maxsim']['nDCG@10']:.4f} | {r['served']['R@100']:.4f} | "
            f"{r['rerank_ms']['p50_ms']:.3f} | {r.get('rerank_speedup_vs_compressed', 1.0):.2f}x | "
            f"{r.get('top10_identical_vs_compressed', 1.0):.3f} | {r['token_store_bytes'] / 2**20:.0f} |"
        )
    lines += ["", f"{result['queries']} {result['split']} queries, {result['candidates']} dense candidates, "
              "one thread, in-process (no HTTP).", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from index_build.data import load_collection

    col = load_collection(args.data, splits=[args.split])
    args.qrels = col.qrels[args.split]
    queries = {q: col.queries[q] for q in sorted(args.qrels) if q in col.queries}
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results: dict[str, Any] = {}
    for mode in modes:
        print(f"[colbert-tokens] {mode} ...", flush=True)
        results[mode] = measure(args, mode, queries)
        print(f"[colbert-tokens] {mode}: nDCG@10 {results[mode]['served']['nDCG@10']}, "
              f"rerank p50 {results[mode]['rerank_ms']['p50_ms']} ms", flush=True)
    if "compressed" in results:
        ref = results["compressed"]
        for r in results.values():
            r["rerank_speedup_vs_compressed"] = round(ref["rerank_ms"]["p50_ms"] / r["rerank_ms"]["p50_ms"], 3)
            same = [r["_top10"][q] == ref["_top10"][q] for q in ref["_top10"]]
            r["top10_identical_vs_compressed"] = round(sum(same) / len(same), 3)
    for r in results.values():
        r.pop("_top10")
    out = {
        "artifact": str(args.artifact), "data": str(args.data), "split": args.split, "queries": len(queries),
        "candidates": args.candidates, "env": args.env, "modes": results,
        "machine": machine_info(), "command": command_line("benchmarks/colbert_tokens.py", argv),
    }
    write_json_atomic(args.out, out)
    tmp = args.out.with_suffix(".md.tmp")
    tmp.write_text(markdown(out))
    tmp.replace(args.out.with_suffix(".md"))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
