"""The query-log loop on SciFact: serve the corpus-only build, log the queries users send,
rebuild on that log. Writes ``benchmarks/results/query-log-loop.json`` (+ ``.md``) and each
rebuild's own results files under ``benchmarks/results/query-log-loop/``.

    .venv/bin/python benchmarks/query_log_loop.py [--sizes 100,250,500] [--pool 500]

A corpus-only build trains its query encoder on pseudo-queries cut from the documents;
the service can log the queries it answers (``NRS_QUERY_LOG_PATH``) and a later build
trains on that log (``label_free.query_log``), still without a judgment. This script runs
that loop and measures what each amount of logged traffic buys:

1. SciFact's 809 judged training claims stand in for the users: shuffled (seed 0), the first
   ``--pool`` are sent to ``python -m service`` serving the corpus-only artifact
   (``artifacts/labelfree-scifact``, ``python benchmarks/label_free.py --only scifact``),
   one ``POST /search`` each, with the query log on; the rest are never sent: the holdout.
2. For each size N, the first N lines of the service's log are the log of a rebuild:
   ``configs/labelfree-scifact.toml`` with ``label_free.query_log`` set (N = 0: the
   corpus-only build itself; its stages are cached).
3. Every build is evaluated on the 300 test claims, and on the training claims it did not
   log (``evaluate.extra_splits``); the rows here are read from its per-query scores, over
   the test claims, over the holdout (the same claims for every N), over both, and over
   every training claim the build did not log, with a
   paired bootstrap interval of each difference (``benchmarks/significance.py``), and each
   build's student alone and served default against the corpus-only build's, claim by claim.

A rerun keeps the served log when it holds exactly the claims it would send, so the rebuilds
read the same bytes and their cached stages stay valid (``--serve-again`` sends them again).
"""

from __future__ import annotations

import json
import logging
import random
import sys
from pathlib import Path

import httpx
import numpy as np
import typer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.latency import running_service  # noqa: E402
from benchmarks.publish_build import publish  # noqa: E402
from benchmarks.significance import paired  # noqa: E402
from index_build.config import load_config  # noqa: E402
from index_build.data import load_collection, query_key  # noqa: E402
from index_build.metrics import write_json_atomic  # noqa: E402
from index_build.stages import Pipeline  # noqa: E402

log = logging.getLogger("query_log_loop")

CONFIG = REPO / "configs" / "labelfree-scifact.toml"
WORK = REPO / "work" / "query-log-loop"
RESULTS = REPO / "benchmarks" / "results"
#: rows reported, and the pairs compared (row, against, margin of issue 31 where it states one)
ROWS = ["base-dense", "teacher", "teacher-space", "asym-dense", "asym-hybrid", "served-default"]
PAIRS = [("asym-dense", "base-dense", 0.02), ("served-default", "teacher", -0.005)]
#: rows compared with the corpus-only build's own, query by query
GAINS = ["asym-dense", "served-default"]
#: the claim sets rows are read over (``unlogged``: every training claim the build evaluated,
#: i.e. not in its log; a different set for each size)
SETS = ("test", "holdout", "test+holdout", "unlogged")


def split_claims(data: Path, pool: int) -> tuple[list[tuple[str, str]], list[str]]:
    """The training claims sent to the service (``(id, text)``, in sending order) and the
    ids of those never sent (the holdout), less any whose text is also a sent claim's
    (SciFact repeats a few claims under two ids: a build drops both from its evaluation)."""
    claims = list(load_collection(data, splits=["train"]).split_queries("train").items())
    random.Random(0).shuffle(claims)
    if not 0 < pool < len(claims):
        raise typer.BadParameter(f"--pool must be between 1 and {len(claims) - 1}")
    sent = {query_key(text) for _, text in claims[:pool]}
    return claims[:pool], [qid for qid, text in claims[pool:] if query_key(text) not in sent]


def logged_texts(log_path: Path) -> list[str]:
    """The query texts of a served log, line by line ([] without one)."""
    if not log_path.is_file():
        return []
    return [json.loads(line)["text"] for line in log_path.read_text(encoding="utf-8").splitlines()]


def serve_and_log(artifact: Path, claims: list[tuple[str, str]], log_path: Path, again: bool = False) -> dict:
    """Send each claim once to the service with its query log on; the log's lines. A log
    of exactly these claims from an earlier run is kept unless ``again``: the rebuilds read
    the same bytes, so their cached stages stay valid."""
    if not again and logged_texts(log_path) == [text for _, text in claims]:
        log.info("reusing the served log %s (%d lines; --serve-again sends the claims again)", log_path, len(claims))
        return {"sent": len(claims), "log_lines": len(claims), "reused": True}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for old in log_path.parent.glob("*.jsonl"):
        old.unlink()
    statuses: dict[int, int] = {}
    with running_service(artifact, extra_env={"NRS_QUERY_LOG_PATH": str(log_path)},
                         log_path=WORK / "service.log") as server, httpx.Client(base_url=server.base_url) as client:
        for _, text in claims:
            status = client.post("/search", json={"query": text}, timeout=30.0).status_code
            statuses[status] = statuses.get(status, 0) + 1
    texts = logged_texts(log_path)  # the service has stopped: every line is written
    if statuses != {200: len(claims)} or texts != [text for _, text in claims]:
        raise RuntimeError(f"expected {len(claims)} answered and logged queries in order, got statuses {statuses} "
                           f"and {len(texts)} log lines")
    return {"sent": len(claims), "statuses": statuses, "log_lines": len(texts), "reused": False}


def build(size: int, served_log: Path) -> tuple[dict, dict, list[str]]:
    """The build with the first ``size`` lines of the served log (0: the corpus-only build):
    its result, its per-query scores and its overrides."""
    overrides: list[str] = []
    if size:
        part = WORK / f"log-{size}.jsonl"
        lines = served_log.read_text(encoding="utf-8").splitlines(keepends=True)[:size]
        part.write_text("".join(lines), encoding="utf-8")
        name = f"labelfree-scifact-qlog{size}"
        overrides = [f'label_free.query_log="{part.relative_to(REPO)}"', f'work_dir="work/{name}"',
                     f'artifact_dir="artifacts/{name}"', "build_artifact=false", f'evaluate.name="{name}"']
    cfg = load_config(CONFIG, overrides)
    result = Pipeline(cfg).run_all()
    if size:  # the corpus-only build's files are published by benchmarks/label_free.py
        publish(cfg.results_path, RESULTS / "query-log-loop")
    per_query = json.loads((Path(cfg.results_path) / f"{cfg.evaluate.name}.per-query.json").read_text())
    return result, per_query, overrides


def claim_ids(per_query: dict, holdout: list[str]) -> dict[str, list[tuple[str, str]]]:
    """``(split, query id)`` of each of :data:`SETS`, in a fixed order, for one build."""
    test = [("collection", q) for q in sorted(per_query["collection"]["asym-dense"])]
    held = [("train", q) for q in holdout]
    unlogged = [("train", q) for q in sorted(per_query["splits"]["train"]["asym-dense"])]
    return {"test": test, "holdout": held, "test+holdout": test + held, "unlogged": unlogged}


def scores(per_query: dict, ids: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    """Each of :data:`ROWS`' nDCG@10 on the claims ``ids``."""
    def split(name: str) -> dict:
        return per_query["collection"] if name == "collection" else per_query["splits"][name]

    return {r: np.array([split(s)[r][q] for s, q in ids]) for r in ROWS if r in per_query["collection"]}


def summarize(per_query: dict, holdout: list[str], corpus_only: dict | None = None) -> dict:
    """Each row's mean over each of :data:`SETS`; the paired :data:`PAIRS`; and, given the
    corpus-only build's per-query scores, each of :data:`GAINS` against that build's same
    row on the same claims."""
    out = {}
    for name, ids in claim_ids(per_query, holdout).items():
        rows = scores(per_query, ids)
        out[name] = {"queries": len(ids), "nDCG@10": {r: round(float(v.mean()), 4) for r, v in rows.items()},
                     "pairs": {f"{a} - {b}": paired(rows[a], rows[b], margin)
                               for a, b, margin in PAIRS if a in rows and b in rows}}
        if corpus_only is not None:
            before = scores(corpus_only, ids)
            out[name]["against_corpus_only"] = {r: paired(rows[r], before[r], 0.0) for r in GAINS
                                                if r in rows and r in before}
    return out


def main(sizes: str = typer.Option("100,250,500", help="logged queries per rebuild (comma-separated)"),
         pool: int = typer.Option(500, help="training claims sent to the service; the rest are the holdout"),
         artifact: Path = typer.Option(REPO / "artifacts" / "labelfree-scifact",
                                       help="the corpus-only artifact"),
         serve_again: bool = typer.Option(False, help="send the claims again though a log of them exists")) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(CONFIG)
    counts = sorted({int(s) for s in sizes.split(",") if s.strip()})
    if not counts or counts[0] < 1 or counts[-1] > pool:
        raise typer.BadParameter(f"--sizes must lie in [1, --pool={pool}]")
    if not (artifact / "manifest.json").is_file():
        raise typer.BadParameter(f"{artifact} holds no artifact: run python benchmarks/label_free.py --only scifact")
    sent, holdout = split_claims(Path(cfg.data.path), pool)
    served_log = WORK / "served" / "queries.jsonl"
    serving = serve_and_log(artifact, sent, served_log, serve_again)
    command = "python benchmarks/query_log_loop.py" + (f" --sizes {sizes}" if sizes != "100,250,500" else "")
    out: dict = {"command": command + (f" --pool {pool}" if pool != 500 else ""),
                 "artifact": str(artifact.relative_to(REPO)) if artifact.is_relative_to(REPO) else str(artifact),
                 "serving": serving, "holdout_claims": len(holdout), "builds": {}}
    corpus_only = None
    for size in [0, *counts]:
        result, per_query, overrides = build(size, served_log)
        corpus_only = corpus_only or per_query
        out["builds"][str(size)] = {"logged": size, "overrides": overrides,
                                    "query_log": result["stages"]["mine"].get("query_log"),
                                    "splits_logged": result["stages"]["evaluate"].get("splits_logged"),
                                    "served_default_mode": result["stages"]["evaluate"].get("default"),
                                    "seconds": {k: v["seconds"] for k, v in result["stages"].items()},
                                    **summarize(per_query, holdout, corpus_only if size else None)}
        write_json_atomic(RESULTS / "query-log-loop.json", out)
    md = [f"# Query-log loop (SciFact, `{out['command']}`)\n",
          f"{pool} training claims sent to the service, {len(holdout)} held out; nDCG@10.\n"]
    builds = list(out["builds"].values())
    for name in SETS:
        about = "the training claims each build did not log" if name == "unlogged" else \
            f"{builds[0][name]['queries']} claims"
        md += [f"### {name} ({about})\n", "| logged | claims | " + " | ".join(ROWS) + " |",
               "|---" * (len(ROWS) + 2) + "|"]
        md += [f"| {b['logged']} | {b[name]['queries']} | "
               + " | ".join(f"{b[name]['nDCG@10'].get(r, float('nan')):.4f}" for r in ROWS) + " |" for b in builds]
        md.append("")
    md.append("Against the corpus-only build on the same claims: mean difference [95% interval over claims]\n")
    for name in ("test+holdout", "unlogged"):
        for b in builds[1:]:
            gains = b[name]["against_corpus_only"]
            md.append(f"- {name}, {b['logged']} logged: " + "; ".join(
                f"{r} {g['diff']:+.4f} [{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}]" for r, g in gains.items()))
    (RESULTS / "query-log-loop.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    typer.run(main)
