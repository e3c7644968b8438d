"""Which of the asymmetric student's checkpoints should a build keep?

The build keeps (``asymmetric.checkpoint``) the checkpoint that scores best on its dev slice,
or the average of the parameters at the checks in the second half of training. On a
label-free build the dev slice is pseudo-queries judged by their source document. This
script trains the build's asymmetric student again, exactly as its ``distill-asymmetric``
stage does (same queries, teacher labels, seed and schedule; nothing of the build is
overwritten), and scores on the test queries:

- every check (``eval_every`` steps and the last), beside its dev score;
- the checkpoint the dev slice chooses (``best``) and the last one;
- the average of the checks in the second half (``average``);
- WiSE-FT between the start (the base model with ridge maps) and the last checkpoint,
  ``start + alpha * (last - start)`` for every parameter, maps included.

nDCG@10 of the dense first stage (the student alone) and of the per-part hybrid with the
student's vectors at the teacher's weights, over the whole corpus or, for a TREC pool build,
its BM25 top-100. The test judgments choose nothing: they are read for these rows only.

Writes ``benchmarks/results/asym-checkpoints.json`` and ``.md`` (one entry per config)::

    .venv/bin/python benchmarks/asym_checkpoints.py --config configs/labelfree-scifact.toml
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import typer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.asym_head import test_queries  # noqa: E402
from benchmarks.latency import command_line, record_entry  # noqa: E402
from index_build.config import load_config  # noqa: E402
from index_build.metrics import metrics  # noqa: E402
from index_build.stages import Pipeline  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "asym-checkpoints.json"
WISE_FT = (0.25, 0.5, 0.75)


def mixed(states: list[dict[str, Any]], weights: list[float]) -> dict[str, Any]:
    """The weighted sum of ``states``' floating-point tensors (other tensors from the last)."""
    return {k: sum(w * s[k] for w, s in zip(weights, states)) if v.is_floating_point() else v
            for k, v in states[-1].items()}


def measure(ctx: Pipeline) -> dict[str, Any]:
    """Train build ``ctx``'s asymmetric student again and score its checkpoints (module docstring)."""
    import index_build.asymmetric as asym
    from index_build.distill import distill_asymmetric

    started = time.perf_counter()
    qids, texts, judged, runs = test_queries(ctx)

    def score(model) -> dict[str, float]:
        dense, hybrid = runs(np.ascontiguousarray(asym.encode_queries(model, texts), dtype=np.float32))
        return {"dense": metrics(judged["qrels"], dense, min_rel=judged["min_rel"])["nDCG@10"],
                "hybrid": metrics(judged["qrels"], hybrid, min_rel=judged["min_rel"])["nDCG@10"]}

    checks: list[dict[str, Any]] = []
    states: list[dict[str, Any]] = []
    trained: dict[str, Any] = {}
    original: Callable[..., dict[str, Any]] = asym.train_asymmetric

    def recording(student, *args, **kwargs):
        dev_eval = args[6]
        if dev_eval is None:
            raise typer.BadParameter("the build has no dev slice: there is no checkpoint choice to measure")

        def every_check(model) -> float:
            dev = dev_eval(model)
            states.append(copy.deepcopy(model.state_dict()))
            checks.append({"dev_nDCG@10": dev, **score(model)})
            return dev

        res = original(student, *args[:6], every_check, *args[7:], **kwargs)
        trained.update(res, model=student, log=args[7])
        return res

    kept_rule = ctx.cfg.asymmetric
    # trained with checkpoint = "best": every check is recorded here and each rule applied below
    ctx.cfg.asymmetric = dataclasses.replace(kept_rule, checkpoint="best")
    asym.train_asymmetric = recording
    try:
        with tempfile.TemporaryDirectory(dir=ctx.work) as tmp:
            distill_asymmetric(ctx, Path(tmp))
    finally:
        asym.train_asymmetric, ctx.cfg.asymmetric = original, kept_rule
    steps = trained["steps"]
    at = [entry["step"] for entry in trained["log"]]  # one training-log entry per check, in order
    for step, row in zip(at, checks):
        row["step"] = step
    model = trained["model"]
    rows: dict[str, dict[str, Any]] = {}
    best = at.index(trained["best_step"])
    rows["best"] = {"steps": [at[best]], **{k: checks[best][k] for k in ("dense", "hybrid")}}
    rows["last"] = {"steps": [steps], **{k: checks[-1][k] for k in ("dense", "hybrid")}}
    half = [i for i, s in enumerate(at) if asym.in_average_window(s, steps)]
    model.load_state_dict(mixed([states[i] for i in half], [1.0 / len(half)] * len(half)))
    rows["average"] = {"steps": [at[i] for i in half], **score(model)}
    for alpha in WISE_FT:
        model.load_state_dict(mixed([states[0], states[-1]], [1.0 - alpha, alpha]))
        rows[f"wise-ft {alpha}"] = {"steps": [0, steps], **score(model)}
    return {"protocol": "TREC pool BM25 top-100" if ctx.cfg.evaluate.mode == "rerank" else "full-corpus retrieval",
            "test_queries": len(qids), "dev_queries": len(ctx.load_mined()["dev"]["qids"]), "steps": steps,
            "eval_every": ctx.cfg.asymmetric.eval_every, "checks": checks, "kept": rows,
            "seconds": round(time.perf_counter() - started, 1)}


def main(config: Path = typer.Option(..., help="a build config whose mine stage has run"),
         out: Path = typer.Option(OUT)) -> None:
    ctx = Pipeline(load_config(config), progress=True)
    if not (ctx.work / "mine" / "examples.pkl").is_file():
        raise typer.BadParameter(f"{config}: run its build first ({ctx.work} holds no mined queries)")
    entry = {"config": str(config), "command": command_line(__file__), **measure(ctx)}
    results = record_entry(out, config.stem, entry)
    out.with_suffix(".md").write_text("\n\n".join(markdown(name, e) for name, e in results.items()
                                                  if isinstance(e, dict) and "checks" in e) + "\n")
    typer.echo(json.dumps(entry["kept"], indent=1))


def markdown(name: str, e: dict[str, Any]) -> str:
    lines = [f"### {name}\n", f"{e['protocol']}, {e['test_queries']} test queries; dev slice {e['dev_queries']} "
             f"queries; {e['steps']} steps\n", "| check | dev nDCG@10 | test dense | test hybrid |",
             "|---|---|---|---|"]
    lines += [f"| step {c['step']} | {c['dev_nDCG@10']:.4f} | {c['dense']:.4f} | {c['hybrid']:.4f} |"
              for c in e["checks"]]
    lines += ["", "| kept | steps | test dense | test hybrid |", "|---|---|---|---|"]
    lines += [f"| {k} | {', '.join(map(str, r['steps']))} | {r['dense']:.4f} | {r['hybrid']:.4f} |"
              for k, r in e["kept"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    typer.run(main)
