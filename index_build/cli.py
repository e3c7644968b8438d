"""``index-build``: one subcommand per stage; ``all`` runs them in order with stage caching.

A user error (missing or malformed config, unknown key, unreadable data) prints one line on
stderr and exits with 2; ``--debug`` (or ``NRS_DEBUG=1``) shows the traceback instead."""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)
F = TypeVar("F", bound=Callable[..., Any])
_debug = {"on": os.environ.get("NRS_DEBUG", "") not in ("", "0")}


def _user_errors() -> tuple[type[Exception], ...]:
    from index_build.config import ConfigError
    from index_build.data import DataError
    from models.artifacts import ArtifactError
    from models.sources import ModelSourceError

    return ConfigError, DataError, ArtifactError, ModelSourceError


def reports_user_errors(fn: F) -> F:
    """Run a command; a user error becomes ``error: <message>`` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _user_errors() as e:
            if _debug["on"]:
                raise
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="show tracebacks of user errors (or NRS_DEBUG=1)")) -> None:
    """Offline builder: distill students, export them, build the indexes and the artifact."""
    if debug:
        _debug["on"] = True

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML/YAML build config")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="override, e.g. train.dense.epochs=2")]


def _pipeline(config: Path | None, overrides: list[str] | None):
    from index_build.config import load_config
    from index_build.stages import Pipeline

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return Pipeline(load_config(config, overrides))


@app.command()
@reports_user_errors
def mine(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Candidate pools, hard negatives and teacher scores for the training queries."""
    typer.echo(json.dumps(_pipeline(config, set_).mine().result, indent=2))


@app.command()
@reports_user_errors
def distill(kind: str = typer.Argument(..., help="asymmetric | dense | colbert | cross-encoder"),
            config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Train one student (the asymmetric query encoder, or a full-tower student by Margin-MSE)."""
    p = _pipeline(config, set_)
    p.mine()
    typer.echo(json.dumps(p.distill(kind).result, indent=2))


@app.command()
@reports_user_errors
def export(kind: str, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Export a distilled student to ONNX (+ int8), with a parity check."""
    p = _pipeline(config, set_)
    p.mine()
    p.distill(kind)
    typer.echo(json.dumps(p.export(kind).result, indent=2))


def _students(p) -> None:
    """The stages every student needs before it can be evaluated or packaged."""
    p.mine()
    for kind in p.cfg.students.kinds:
        p.distill(kind)
        p.export(kind)


@app.command()
@reports_user_errors
def evaluate(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Evaluate every system on the test split (and TREC DL) and write the results files."""
    p = _pipeline(config, set_)
    _students(p)
    p.evaluate()
    typer.echo(json.dumps(p.write_results()["systems"], indent=2))


@app.command("all")
@reports_user_errors
def all_(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Run the whole pipeline; stages whose inputs did not change are skipped."""
    from index_build.evaluate import build_summary

    p = _pipeline(config, set_)
    res = p.run_all()
    typer.echo(json.dumps(res["systems"], indent=2))
    typer.echo(build_summary(p, res, p.records))


@app.command()
@reports_user_errors
def artifact(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Build (or refresh) the artifact directory from the exported students (no evaluation)."""
    p = _pipeline(config, set_)
    if not p.cfg.build_artifact:
        typer.echo("error: this config sets build_artifact = false; set it to true to build an artifact", err=True)
        raise typer.Exit(2)
    _students(p)
    typer.echo(json.dumps(p.artifact().result, indent=2))


@app.command()
@reports_user_errors
def quickstart(
    data: Path = typer.Argument(..., help="a BEIR folder or a corpus.jsonl file"),
    artifact_dir: Path = typer.Option(Path("artifacts/quickstart"), help="where the artifact goes"),
    model: str = typer.Option("packaged:minilm", help="dense model: packaged:minilm, a checkpoint dir, a hub name"),
    threads: int = typer.Option(0, help="ONNX Runtime threads (0: all cores)"),
) -> None:
    """A servable artifact in minutes, no training: the base model's dense index, BM25, hybrid by default."""
    import shlex

    from index_build.quickstart import quickstart as build

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = build(data, artifact_dir, model=model, threads=threads)
    typer.echo(json.dumps(result, indent=2))
    typer.echo(f"serve it:  NRS_ARTIFACT_DIR={shlex.quote(str(artifact_dir))} python -m service")


@app.command()
@reports_user_errors
def verify(path: Path, quick: bool = typer.Option(False, help="sizes only, skip hashing")) -> None:
    """Check every checksum and cross-reference of an artifact dir; fail on the first problem."""
    from models.artifacts import ArtifactError
    from models.artifacts import verify as verify_dir

    try:
        m = verify_dir(path, deep=not quick)
    except ArtifactError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"ok: {path} artifact_version={m.artifact_version} docs={m.corpus.n_docs} files={len(m.files)}")


@app.command()
@reports_user_errors
def check_data(path: Path) -> None:
    """Validate a BEIR folder and print its counts (errors name file and line)."""
    from index_build.data import load_collection

    c = load_collection(path)
    typer.echo(json.dumps({"docs": len(c.docs), "queries": len(c.queries),
                           "qrels": {k: len(v) for k, v in c.qrels.items()}, "checksum": c.checksum()}, indent=2))


if __name__ == "__main__":
    app()
