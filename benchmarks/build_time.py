"""How long a newcomer waits, cold (a fresh, empty cache: the packaged models' unpacking and
export, every corpus pass and the teacher's scoring included), on this machine:

- ``quickstart``: ``index-build quickstart`` on SciFact (no training), and the quality of what
  it serves (the artifact's default mode, searched in-process on the test queries);
- ``build``: ``index-build all`` with the config ``scripts/build.sh`` runs (distillation,
  export, evaluation, artifact), its stages' times and its results rows; its work and
  artifact directories are the config's (so the artifact can be served and benchmarked after).

Writes ``benchmarks/results/build-time.json`` (the keys measured; other keys are kept)::

    .venv/bin/python benchmarks/build_time.py [--only quickstart,build] [--config configs/scifact.toml] [--fresh]

``--key`` names the key another build's timing goes under, e.g. the corpus-only build:
``--only build --fresh --config configs/labelfree-scifact.toml --key build-labelfree``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import typer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.latency import machine_info, write_json_atomic  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "build-time.json"
#: the rows of the build's evaluation recorded beside its time
ROWS = ("served-default", "teacher", "base-dense", "teacher-space", "asym-dense", "asym-hybrid")


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


def cold_env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "NRS_CACHE_DIR": str(tmp / "cache")}


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def time_quickstart(data: Path, tmp: Path) -> dict[str, Any]:
    artifact = tmp / "artifact"
    argv = [sys.executable, "-m", "index_build.cli", "quickstart", str(data), "--artifact-dir", str(artifact)]
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, env=cold_env(tmp), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"quickstart failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    built = json.loads(proc.stdout[: proc.stdout.rindex("}") + 1])
    return {
        "command": f"index-build quickstart {data.name} (NRS_CACHE_DIR empty)", "cold": True,
        "seconds": round(seconds, 1), "stages": built["stages"], "n_docs": built["n_docs"],
        "artifact_bytes": tree_bytes(artifact), "cache_bytes": tree_bytes(tmp / "cache"),
        "served_default": served_quality(artifact, data),
        "machine": machine_info(),
    }


def time_build(config: Path, tmp: Path, fresh: bool) -> dict[str, Any]:
    """``index-build all --config config`` from nothing: an empty cache (in ``tmp``) and no
    work or artifact directory (``fresh`` deletes the config's; else they must not exist).
    The work, results and artifact stay where the config puts them, ready to serve."""
    import shutil

    from index_build.config import load_config

    cfg = load_config(config)
    for path in (Path(cfg.work_dir), Path(cfg.artifact_dir)):
        if path.exists() and not fresh:
            raise SystemExit(f"{path} exists: a cold build starts without it (--fresh deletes it)")
        shutil.rmtree(path, ignore_errors=True)
    argv = [sys.executable, "-m", "index_build.cli", "all", "--config", str(config)]
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, env=cold_env(tmp), stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"index-build all failed ({proc.returncode})")
    name = cfg.evaluate.name or Path(cfg.data.path).name
    results = json.loads((cfg.results_path / f"{name}.json").read_text())
    systems = results["systems"]
    return {
        "command": f"index-build all --config {config.relative_to(REPO)} (NRS_CACHE_DIR empty, no work dir)",
        "cold": True, "seconds": round(seconds, 1),
        "stages": {k: v["seconds"] for k, v in results["stages"].items()},
        "students": cfg.students.kinds,
        "nDCG@10": {row: systems[row]["nDCG@10"] for row in ROWS if row in systems},
        "serving": results.get("serving", {}), "artifact_dir": cfg.artifact_dir,
        "artifact_bytes": tree_bytes(Path(cfg.artifact_dir)), "cache_bytes": tree_bytes(tmp / "cache"),
        "work_bytes": tree_bytes(Path(cfg.work_dir)), "machine": machine_info(),
    }


def main(only: str = typer.Option("quickstart,build", help="comma-separated: quickstart, build"),
         data: Path = typer.Option(REPO.parent / "shared" / "data" / "scifact", help="quickstart's BEIR folder"),
         config: Path = typer.Option(REPO / "configs" / "scifact.toml", help="the build's config"),
         fresh: bool = typer.Option(False, help="delete the build's work and artifact directories first"),
         key: str = typer.Option("build", help="the key the build's timing is written under (e.g. build-labelfree)"),
         out: Path = typer.Option(OUT)) -> None:
    targets = [t.strip() for t in only.split(",") if t.strip()]
    unknown = set(targets) - {"quickstart", "build"}
    if unknown:
        raise typer.BadParameter(f"unknown target(s) {sorted(unknown)}; choose from quickstart, build")
    for target in targets:
        with tempfile.TemporaryDirectory() as tmp:
            measured = time_quickstart(data, Path(tmp)) if target == "quickstart" else \
                time_build(config.resolve(), Path(tmp), fresh)
        result = json.loads(out.read_text()) if out.is_file() else {}
        measured["script"] = shlex.join(["python", "benchmarks/build_time.py", *sys.argv[1:]])
        result[key if target == "build" else target] = measured
        result["command"] = "python benchmarks/build_time.py"
        write_json_atomic(out, result)
        print(json.dumps(measured, indent=2))


if __name__ == "__main__":
    typer.run(main)
