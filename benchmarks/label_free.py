"""Label-free distillation on four collections, corpus only; writes
``benchmarks/results/label-free.json`` (+ ``label-free.md``).

    .venv/bin/python benchmarks/label_free.py [--only scifact,cranfield,dl19,dl20,scifact-log]

Each collection is an ordinary ``index-build all`` with ``configs/labelfree-<name>.toml``
(stage-cached, so a rerun only redoes what changed); each build's own results files are
copied into ``benchmarks/results/label-free/``. Training and tuning never see the
collections' queries or judgments: the test judgments are read by the final evaluation only.
A variant (:data:`VARIANTS`) is one of those builds with overrides, reported under its own
name: ``scifact-log`` adds a query log without judgments (``label_free.query_log``),
``scifact-logdev`` holds part of it out as the dev slice (``label_free.log_dev_queries``),
``dl19-log`` / ``dl20-log`` give each TREC pool the other year's questions as that log,
``<collection>-kldense`` trains against the teacher's bi-encoder members alone,
``scifact-statements`` adds statement pseudo-queries (``asymmetric.statements_per_doc``),
``scifact-average`` keeps the average of the student's late checks (``asymmetric.checkpoint``),
``scifact-seed14`` / ``scifact-seed15`` train the student from another seed.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.publish_build import publish  # noqa: E402
from index_build.config import load_config  # noqa: E402
from index_build.metrics import markdown_table, write_json_atomic  # noqa: E402
from index_build.stages import Pipeline  # noqa: E402

COLLECTIONS = ["scifact", "cranfield", "dl19", "dl20"]
#: builds reported beside the corpus-only ones: name -> (the collection whose config they
#: start from, config overrides, what they add)
VARIANTS = {
    "scifact-log": ("scifact", [
        'label_free.query_log="../shared/data/scifact/queries.jsonl"', 'work_dir="work/labelfree-scifact-log"',
        'artifact_dir="artifacts/labelfree-scifact-log"', 'evaluate.name="labelfree-scifact-log"',
        "evaluate.extra_splits=[]",  # its log holds the training claims
    ], "the corpus plus a query log: SciFact's queries without judgments (the build drops the 300 test "
       "queries; the 809 train and dev claims remain), teacher-labelled training queries for every student"),
    "scifact-logdev": ("scifact", [
        'label_free.query_log="../shared/data/scifact/queries.jsonl"', "label_free.log_dev_queries=80",
        'work_dir="work/labelfree-scifact-logdev"', 'artifact_dir="artifacts/labelfree-scifact-logdev"',
        'evaluate.name="labelfree-scifact-logdev"', "evaluate.extra_splits=[]",
    ], "scifact-log with 80 of the logged queries held out as the dev slice, judged by the teacher, in place "
       "of the pseudo-query one: checkpoint, hybrid weight and served default chosen on real queries"),
    "scifact-statements": ("scifact", [
        "asymmetric.statements_per_doc=2", 'work_dir="work/labelfree-scifact-statements"',
        'artifact_dir="artifacts/labelfree-scifact-statements"', 'evaluate.name="labelfree-scifact-statements"',
    ], "the corpus-only build whose asymmetric student also trains on up to 2 statements per document (the "
       "clause a reporting verb introduces: 'these results suggest that <statement>')"),
    "scifact-average": ("scifact", [
        'asymmetric.checkpoint="average"', 'work_dir="work/labelfree-scifact-average"',
        'artifact_dir="artifacts/labelfree-scifact-average"', 'evaluate.name="labelfree-scifact-average"',
    ], "the corpus-only build whose asymmetric student keeps the average of its parameters at the checks in "
       "the second half of training instead of the checkpoint that scored best on the pseudo-query dev slice"),
    # the asymmetric student's KL on pseudo-queries, where the teacher puts nearly all its softmax
    # mass on the source document (benchmarks/kl_targets.py): without the source, or flattened to
    # the top-1 mass the teacher gives SciFact's training claims (kl-targets.json: their texts
    # only, no judgment)
    "scifact-klrest": ("scifact", [
        'asymmetric.pseudo_kl_pool="without-source"', 'work_dir="work/labelfree-scifact-klrest"',
        'artifact_dir="artifacts/labelfree-scifact-klrest"', 'evaluate.name="labelfree-scifact-klrest"',
        "build_artifact=false",
    ], "the corpus-only build whose asymmetric student's listwise KL leaves each pseudo-query's source document "
       "out of its pool (asymmetric.pseudo_kl_pool = without-source): the teacher's ranking of the other candidates"),
    "scifact-kltemp": ("scifact", [
        "asymmetric.pseudo_kl_temperature=2.3", 'work_dir="work/labelfree-scifact-kltemp"',
        'artifact_dir="artifacts/labelfree-scifact-kltemp"', 'evaluate.name="labelfree-scifact-kltemp"',
        "build_artifact=false",
    ], "the corpus-only build whose asymmetric student's listwise KL divides the teacher's scores of each "
       "pseudo-query by 2.3 (asymmetric.pseudo_kl_temperature), the temperature at which its top-1 mass is the "
       "one it gives SciFact's training claims"),
    # the corpus-only build with the asymmetric student trained from other seeds: how far one
    # training run's rows move with the seed alone (same mined queries and teacher labels)
    **{f"scifact-seed{seed}": ("scifact", [
        f"asymmetric.seed={seed}", f'work_dir="work/labelfree-scifact-seed{seed}"',
        f'artifact_dir="artifacts/labelfree-scifact-seed{seed}"', f'evaluate.name="labelfree-scifact-seed{seed}"',
        "build_artifact=false",
    ], f"the corpus-only build with the asymmetric student's seed {seed} (13 by default): which pseudo-queries fill "
       "its 20,000 under the cap, their order, candidate samples and dropout")
       for seed in (14, 15)},
    # each TREC year's pool with the other year's MS MARCO questions as its log (no judgment read)
    **{f"{year}-log": (year, [
        f'label_free.query_log="../shared/data/trec-dl/{other}/queries.jsonl"', f"label_free.log_dev_queries={n_dev}",
        'students.kinds=["asymmetric"]', f'work_dir="work/labelfree-{year}-log"',
        f'artifact_dir="artifacts/labelfree-{year}-log"', f'evaluate.name="labelfree-{year}-log"',
    ], f"the {year} pool with {other}'s questions as an unjudged query log, a fifth of them held out as the dev "
       "slice judged by the teacher; the asymmetric student only")
       for year, other, n_dev in (("dl19", "dl20", 10), ("dl20", "dl19", 8))},
    # the listwise KL against the teacher's bi-encoder members alone, leaving BM25 to the hybrid
    **{f"{year}-kldense": (year, [
        'asymmetric.kl_target="dense"', 'students.kinds=["asymmetric"]', f'work_dir="work/labelfree-{year}-kldense"',
        f'artifact_dir="artifacts/labelfree-{year}-kldense"', f'evaluate.name="labelfree-{year}-kldense"',
    ], f"the {year} build with the asymmetric student's listwise KL taken against the teacher's bi-encoder "
       "members alone (asymmetric.kl_target = dense); the asymmetric student only")
       for year in ("dl19", "dl20", "cranfield", "scifact")},
}
RENAME = {"dense": "labelfree-dense", "dense+colbert": "labelfree-dense+colbert"}
KEEP = ["bm25", "base-dense", "teacher", "teacher-space", "labelfree-dense", "labelfree-dense+colbert", "hybrid",
        "hybrid+colbert", "asym-dense", "asym-hybrid", "asym-hybrid-student", "asym-hybrid-lists",
        "teacher-space-hybrid", "served-default"]


def kept(rows: dict) -> dict:
    """The rows of :data:`KEEP` a build has, in that order."""
    return {k: rows[k] for k in KEEP if k in rows}


def collect(name: str) -> dict:
    base, overrides, about = VARIANTS.get(name, (name, [], ""))
    config = f"configs/labelfree-{base}.toml"
    cfg = load_config(REPO / config, overrides)
    p = Pipeline(cfg)
    result = p.run_all()
    publish(cfg.results_path, REPO / "benchmarks" / "results" / "label-free")  # the build's own files
    systems = {RENAME.get(k, k): v for k, v in result["systems"].items()}
    mine = p.records["mine"].result
    variant = {"variant": about, "overrides": overrides, "query_log": mine.get("query_log")} if about else {}
    return {
        "systems": kept(systems),
        # rows on the other judged splits the build never read (evaluate.extra_splits)
        **({"splits": {split: kept(rows) for split, rows in result["splits"].items()}} if result.get("splits") else {}),
        "pseudo_queries": mine["pseudo_queries"],
        "pseudo_query_filters": mine["filters"],
        "by_generator": mine["by_generator"],
        "stages": result["stages"],
        "serving": result.get("serving", {}),
        "config": config,
        "command": f"python benchmarks/label_free.py --only {name}",
        **variant,
        "protocol": "rerank runs/BM25.trec top-100" if cfg.evaluate.mode == "rerank"
        else f"full-corpus retrieval on the {cfg.data.test_split!r} judgments",
    }


def main(only: str = typer.Option(",".join(COLLECTIONS), help="comma-separated collections and variants")) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = REPO / "benchmarks" / "results" / "label-free.json"
    data = json.loads(out.read_text()) if out.is_file() else {}
    for name in [n.strip() for n in only.split(",") if n.strip()]:
        if name not in COLLECTIONS and name not in VARIANTS:
            raise typer.BadParameter(f"unknown collection {name!r}; choose from {COLLECTIONS + list(VARIANTS)}")
        data[name] = collect(name)
        data["command"] = "python benchmarks/label_free.py"
        write_json_atomic(out, data)
    md = "".join(markdown_table(v["systems"], f"{k} (label-free, {v['pseudo_queries']} pseudo-queries)") + "\n"
                 + "".join(markdown_table(rows, f"{k}, {split} queries (a judged split the build never read)") + "\n"
                           for split, rows in v.get("splits", {}).items())
                 for k, v in data.items() if isinstance(v, dict) and "systems" in v)
    (out.with_suffix(".md")).write_text(md)


if __name__ == "__main__":
    typer.run(main)
