"""Training precision: the same distillation in fp32 and with bf16 autocast, side by side in one
run; writes ``benchmarks/results/train-precision.json`` (+ ``.md``; a later run for other
students adds its rows to the file).

    .venv/bin/python benchmarks/train_precision.py [--config configs/scifact-full.toml] [--kinds dense]

Each precision gets its own work dir under ``--root``; the mining stages (teacher scores, hard
negatives, pseudo-queries) run once and are copied to the others, so the arms differ only in
``train.<kind>.precision``. Per arm and student: the distill stage's wall time, the training
loop's time (steps plus dev evaluations), seconds per step, the dev-slice history, and for the
dense student the exported (fp32 ONNX, WiSE-FT as configured) model's dev and test nDCG@10 by
exact search over the whole corpus. ColBERT and cross-encoder students report dev only.
Ratios are fp32 / bf16 from this one run.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import sys
from pathlib import Path

import typer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from index_build.config import load_config  # noqa: E402
from index_build.metrics import write_json_atomic  # noqa: E402
from index_build.stages import Pipeline  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def dense_test(p: Pipeline) -> dict[str, float]:
    """Exact search of the exported dense student over the whole corpus, on the test split."""
    split = p.cfg.data.test_split
    tq = p.collection.split_queries(split)
    return p.dense_metrics(list(tq), list(tq.values()), p.collection.qrels[split])


def run_arm(p: Pipeline, kinds: list[str]) -> dict:
    arm: dict = {}
    for kind in kinds:
        d = p.distill(kind)
        e = p.export(kind)
        row = {"stage_seconds": d.seconds, "train_seconds": d.result["train_seconds"], "steps": d.result["steps"],
               "seconds_per_step": round(d.result["train_seconds"] / max(1, d.result["steps"]), 3),
               "best_dev_nDCG@10": d.result["best_dev_nDCG@10"], "dev_history": d.result["dev_history"],
               "peak_rss_bytes": d.peak_rss_bytes, "parity_max_abs_diff": e.result["parity_max_abs_diff"]}
        if kind == "dense":
            row["export_dev_nDCG@10"] = e.result.get("dev_nDCG@10")
            row["wise_ft"] = e.result.get("wise_ft")
            row["test"] = dense_test(p)
        arm[kind] = row
        logging.info("%s: %s", kind, row)
    return arm


def main(config: Path | None = typer.Option(REPO / "configs" / "scifact-full.toml", help="build config (TOML)"),
         kinds: str = typer.Option("dense", help="comma-separated students: dense, colbert, cross-encoder"),
         precisions: str = typer.Option("fp32,bf16", help="comma-separated: fp32, bf16, auto"),
         root: Path = typer.Option(REPO / "work" / "train-precision", help="work dirs, one per precision"),
         overrides: list[str] = typer.Option([], "--set", help="config override key=value (repeatable)"),
         results_dir: Path = typer.Option(RESULTS, help="where train-precision.json/.md go")) -> None:
    import torch

    from index_build.train import native_bf16

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kind_list = [k.strip() for k in kinds.split(",") if k.strip()]
    prec_list = [x.strip() for x in precisions.split(",") if x.strip()]
    rel = (config.resolve().relative_to(REPO) if config.resolve().is_relative_to(REPO) else config) if config else None
    command = "python benchmarks/train_precision.py" + (f" --config {rel}" if rel else "")
    command += f" --kinds {','.join(kind_list)} --precisions {','.join(prec_list)}"
    out = results_dir / "train-precision.json"
    # one file for every student measured; each student's arms come from one run (its command)
    data: dict = json.loads(out.read_text()) if out.is_file() else {}
    legacy = data.pop("command", None)  # files written before "commands": one command for all their students
    if legacy:
        data["commands"] = {k: legacy for arm in data.get("runs", {}).values() for k in arm}
    data.setdefault("commands", {}).update({k: command + "".join(f" --set '{o}'" for o in overrides)
                                            for k in kind_list})
    data["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "native_bf16_cpu": native_bf16(torch.device("cpu")), "torch": torch.__version__}
    data.setdefault("runs", {})
    first: Pipeline | None = None
    for prec in prec_list:
        cfg = load_config(config, [*overrides, f'work_dir="{root / prec}"', "build_artifact=false",
                                   *[f'train.{k}.precision="{prec}"' for k in kind_list]])
        p = Pipeline(cfg)
        if first is None:
            p.mine()
            for kind in kind_list:  # mine the pseudo-queries here, so no distill stage's time holds them
                if cfg.train[kind].pseudo_queries:
                    p.pseudo(cfg.train[kind].pseudo_queries)
            first = p
        else:
            for src in [first.work / "mine", *first.work.glob("pseudo-*")]:
                dst = p.work / src.name
                if not dst.exists():
                    shutil.copytree(src, dst)
        data["runs"].setdefault(prec, {}).update(run_arm(p, kind_list))
        write(data, results_dir)
    if {"fp32", "bf16"} <= set(data["runs"]):
        a, b = data["runs"]["fp32"], data["runs"]["bf16"]
        data["ratios_fp32_over_bf16"] = {
            k: {m: round(a[k][m] / b[k][m], 3) for m in ("stage_seconds", "train_seconds", "seconds_per_step")}
            for k in a if k in b}
    write(data, results_dir)


def write(data: dict, results_dir: Path) -> None:
    out = results_dir / "train-precision.json"
    write_json_atomic(out, data)
    cols = ["s/step", "train s", "best dev nDCG@10", "export dev nDCG@10", "test nDCG@10", "test R@100"]
    lines = ["### training precision", "", "| student | precision | " + " | ".join(cols) + " |",
             "|---" * (len(cols) + 2) + "|"]
    for prec, arm in data["runs"].items():
        for kind, r in arm.items():
            test = r.get("test", {})
            vals = [r["seconds_per_step"], r["train_seconds"], r["best_dev_nDCG@10"], r.get("export_dev_nDCG@10"),
                    test.get("nDCG@10"), test.get("R@100")]
            lines.append(f"| {kind} | {prec} | " + " | ".join("" if v is None else str(v) for v in vals) + " |")
    for kind, ratios in data.get("ratios_fp32_over_bf16", {}).items():
        lines.append(f"\n{kind}: fp32 / bf16 time ratios " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    commands = sorted(set(data["commands"].values()))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n\n" + "".join(f"`{c}`\n" for c in commands))


if __name__ == "__main__":
    typer.run(main)
