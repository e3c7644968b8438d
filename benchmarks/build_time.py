"""How long a newcomer waits for a served index: ``index-build quickstart`` on SciFact, cold
(a fresh, empty cache: the model export and the corpus pass included), and the quality of
what it serves (the artifact's default mode, searched in-process on the test queries).
Writes ``benchmarks/results/build-time.json`` (the key ``quickstart``; other keys are kept)::

    .venv/bin/python benchmarks/build_time.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import typer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.latency import command_line, machine_info, write_json_atomic  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "build-time.json"


def served_quality(artifact: Path, data: Path, split: str = "test") -> dict[str, Any]:
    """nDCG@10 / RR@10 / R@100 of the artifact's default mode on ``split``, through the
    service's own search engine (k=100)."""
    from index_build.data import load_collection
    from index_build.metrics import metrics
    from service.search import SearchEngine
    from service.settings import Settings

    col = load_collection(data)
    engine = SearchEngine.load(artifact, Settings.model_validate({"artifact_dir": artifact, "max_k": 100}))
    try:
        run = {}
        for qid, text in col.split_queries(split).items():
            result = engine.search(text, k=100)
            run[qid] = {h.id: h.score for h in result.hits}
        mode = dict(engine.default_mode)
    finally:
        engine.close()
    return {"mode": mode, "split": split, **metrics(col.qrels[split], run)}


def main(data: Path = typer.Option(REPO.parent / "shared" / "data" / "scifact", help="BEIR folder"),
         out: Path = typer.Option(OUT)) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "NRS_CACHE_DIR": str(Path(tmp) / "cache")}
        artifact = Path(tmp) / "artifact"
        argv = [sys.executable, "-m", "index_build.cli", "quickstart", str(data), "--artifact-dir", str(artifact)]
        started = time.perf_counter()
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"quickstart failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        built = json.loads(proc.stdout[: proc.stdout.rindex("}") + 1])
        quality = served_quality(artifact, data)
        size = sum(f.stat().st_size for f in artifact.rglob("*") if f.is_file())
        cache = sum(f.stat().st_size for f in (Path(tmp) / "cache").rglob("*") if f.is_file())
    result = json.loads(out.read_text()) if out.is_file() else {}
    result["quickstart"] = {
        "command": f"index-build quickstart {data.name} (NRS_CACHE_DIR empty)", "cold": True,
        "seconds": round(seconds, 1), "n_docs": built["n_docs"], "artifact_bytes": size, "cache_bytes": cache,
        "served_default": quality, "machine": machine_info(),
    }
    result["command"] = command_line(__file__)
    write_json_atomic(out, result)
    print(json.dumps(result["quickstart"], indent=2))


if __name__ == "__main__":
    typer.run(main)
