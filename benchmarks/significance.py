"""How far apart are two rows of a build, given how few test queries it has?

Every build writes each row's nDCG@10 per judged query beside its results
(``<name>.per-query.json``, the evaluate stage's ``per_query.json``). This script reads those
files and, for each pair of rows scored on the same queries, reports the mean paired
difference ``a - b``, its 95% confidence interval (a bootstrap over queries, percentile
method, fixed seed), the two-sided paired t-test p-value and the number of queries. Where a
target is stated as a margin over a reference row (``a >= b + margin``), the interval says
whether the test set can tell the target apart: met or missed beyond noise, or within it.

Writes ``benchmarks/results/significance.json`` and ``.md``::

    .venv/bin/python benchmarks/significance.py

which reads every ``*.per-query.json`` under ``benchmarks/results`` (``--files`` to name them):
the rows of each build's test split, of the other judged splits a label-free build reports
on (``evaluate.extra_splits``) and of all those queries together, and of the TREC pools it
reranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import typer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from index_build.metrics import write_json_atomic  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
#: (row a, row b, margin): a - b is compared with the margin; pairs missing from a file are skipped
PAIRS = [
    ("asym-dense", "base-dense", 0.02),
    ("served-default", "teacher", -0.005),
    ("asym-hybrid", "teacher", -0.005),
    ("served-default", "asym-dense", 0.0),
    ("teacher", "base-dense", 0.0),
    # the hybrid's query encoder: its head (ridge maps on the base model) against the trained
    # student in the same fusion, and against the two lists fused at equal weights
    ("asym-hybrid", "asym-hybrid-student", 0.0),
    ("asym-hybrid", "asym-hybrid-lists", 0.0),
]
#: builds that differ only in their training seed: each row's per-query nDCG@10 averaged over
#: the seeds (the recipe's expected score on each query) is compared like a build's own rows
SEED_GROUPS = {
    "label-free/labelfree-scifact (asymmetric.seed 13, 14, 15)": [
        "label-free/labelfree-scifact", "label-free/labelfree-scifact-seed14", "label-free/labelfree-scifact-seed15"],
}
#: margins on a TREC pool (a build in evaluate mode "rerank", or a build's ``evaluate.trec_dl`` pools):
#: the student alone need only hold the base model's quality there
POOL_MARGINS = {("asym-dense", "base-dense"): -0.005}


def paired(a: np.ndarray, b: np.ndarray, margin: float, n_resamples: int = 10_000, seed: int = 0) -> dict:
    """The paired comparison of per-query scores ``a`` and ``b`` (same queries, same order)."""
    from scipy import stats

    diff = a - b
    if len(diff) < 2:
        raise ValueError("a paired comparison needs at least two queries")
    if np.allclose(diff, diff[0]):  # no spread: the interval and the test are degenerate
        low = high = float(diff[0])
        p = 1.0 if diff[0] == 0 else 0.0
    else:
        ci = stats.bootstrap((diff,), np.mean, n_resamples=n_resamples, confidence_level=0.95, method="percentile",
                             rng=np.random.default_rng(seed)).confidence_interval
        low, high = float(ci.low), float(ci.high)
        p = float(stats.ttest_rel(a, b).pvalue)
    if low >= margin:
        verdict = "above the margin"
    elif high < margin:
        verdict = "below the margin"
    else:
        verdict = "within noise of the margin"
    return {"a": round(float(a.mean()), 4), "b": round(float(b.mean()), 4), "diff": round(float(diff.mean()), 4),
            "ci95": [round(low, 4), round(high, 4)], "p_paired_t": round(p, 4), "queries": len(diff),
            "margin": margin, "verdict": verdict}


def compare(rows: dict[str, dict[str, float]], pool: bool) -> dict[str, dict]:
    """Every pair of :data:`PAIRS` present in ``rows`` (row -> query id -> nDCG@10)."""
    out = {}
    for a, b, margin in PAIRS:
        if a in rows and b in rows:
            qids = sorted(set(rows[a]) & set(rows[b]))
            margin = POOL_MARGINS.get((a, b), margin) if pool else margin
            out[f"{a} - {b}"] = paired(np.array([rows[a][q] for q in qids]), np.array([rows[b][q] for q in qids]),
                                       margin)
    return out


def pool_splits(splits: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """The rows every split has, over all their queries (ids prefixed by the split's position)."""
    rows = set.intersection(*(set(s) for s in splits))
    return {row: {f"{i}:{q}": v for i, s in enumerate(splits) for q, v in s[row].items()} for row in rows}


def seed_average(datas: list[dict]) -> dict:
    """A per-query file's content whose rows are those every one of ``datas`` has, each query's
    score the mean over them (of the test split and of each extra split all of them have)."""
    def mean_rows(tables: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
        rows = set.intersection(*(set(t) for t in tables))
        return {row: {q: float(np.mean([t[row][q] for t in tables])) for q in tables[0][row]} for row in sorted(rows)}

    splits = set.intersection(*(set(d.get("splits", {})) for d in datas))
    return {"mode": datas[0].get("mode"), "collection": mean_rows([d.get("collection", {}) for d in datas]),
            "trec": {}, "splits": {s: mean_rows([d["splits"][s] for d in datas]) for s in sorted(splits)},
            "command": " ; ".join(d.get("command", "") for d in datas)}


def build_entry(name: str, data: dict) -> dict:
    """Every pair of :data:`PAIRS` on each set of queries a build (or a seed group) reports."""
    entry = {"file": name, "command": data.get("command", ""),
             "collection": compare(data.get("collection", {}), data.get("mode") == "rerank"),
             "trec": {k: compare(v, True) for k, v in data.get("trec", {}).items()},
             "splits": {k: compare(v, False) for k, v in data.get("splits", {}).items()}}
    if data.get("splits") and data.get("mode") != "rerank":
        # every judged query the build never read, its splits' and the test split's together
        pooled = pool_splits([data.get("collection", {}), *data["splits"].values()])
        entry["splits"]["+".join(["test", *data["splits"]])] = compare(pooled, False)
    return entry


def main(files: list[Path] = typer.Option(None, "--files", help="per-query files (default: all under results)"),
         out: Path = typer.Option(RESULTS / "significance.json", help="where the results go")) -> None:
    paths = sorted(files or RESULTS.rglob("*.per-query.json"))
    if not paths:
        raise typer.BadParameter("no *.per-query.json files: run a build (its evaluate stage writes them)")
    report: dict = {"command": "python benchmarks/significance.py", "metric": "nDCG@10",
                    "method": "mean paired difference a - b over the test queries; 95% bootstrap interval "
                              "(10,000 resamples of queries, percentile); two-sided paired t-test",
                    "builds": {}}
    md = ["# Paired differences between rows of each build (nDCG@10)", "",
          "`python benchmarks/significance.py`: 95% bootstrap interval over the test queries, paired t-test.", "",
          "| build | queries of | a - b | a | b | diff | 95% CI | p | queries | margin | verdict |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    datas = {}
    for path in paths:
        name = str(path.relative_to(RESULTS)) if path.is_relative_to(RESULTS) else str(path)
        datas[name.removesuffix(".per-query.json")] = json.loads(path.read_text())
    for group, members in SEED_GROUPS.items():
        if all(m in datas for m in members):
            datas[group] = seed_average([datas[m] for m in members])
    for key, data in datas.items():
        name = key if key in SEED_GROUPS else key + ".per-query.json"
        entry = build_entry(name, data)
        report["builds"][key] = entry
        for queries, pairs in [("", entry["collection"]), *entry["splits"].items(), *entry["trec"].items()]:
            for pair, r in pairs.items():
                md.append(f"| {name.removesuffix('.per-query.json')} | {queries or 'test'} | {pair} | {r['a']:.4f} | "
                          f"{r['b']:.4f} | {r['diff']:+.4f} | [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] | "
                          f"{r['p_paired_t']:.4f} | {r['queries']} | {r['margin']:+.3f} | {r['verdict']} |")
    write_json_atomic(out, report)
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    typer.echo(f"wrote {out} ({len(paths)} builds)")


if __name__ == "__main__":
    typer.run(main)
