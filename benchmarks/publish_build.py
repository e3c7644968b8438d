"""Run a build (stage-cached: only what changed is redone) and publish its results files into
``benchmarks/results``. A build writes its results next to its work (``<work_dir>/results``,
see ``BuildConfig.results_path``); only this script and the other benchmark scripts write
into the repository's results folder::

    .venv/bin/python benchmarks/publish_build.py --config configs/scifact.toml
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import typer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"


def publish(results_path: Path, dest: Path) -> list[Path]:
    """Copy every results file of a build (``*.json``, ``*.md``) into ``dest``; the copies."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for src in sorted(results_path.glob("*")):
        if src.suffix in {".json", ".md"} and src.is_file():
            tmp = dest / f".{src.name}.tmp"
            shutil.copyfile(src, tmp)
            tmp.replace(dest / src.name)
            out.append(dest / src.name)
    return out


def main(config: Path = typer.Option(..., "--config", "-c", help="build config"),
         set_: list[str] = typer.Option([], "--set", "-s", help="config override, as for index-build"),
         dest: Path = typer.Option(RESULTS, help="where the results files go")) -> None:
    from index_build.config import load_config
    from index_build.stages import Pipeline

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(config, set_)
    Pipeline(cfg).run_all()
    for path in publish(cfg.results_path, dest):
        typer.echo(f"published {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


if __name__ == "__main__":
    typer.run(main)
