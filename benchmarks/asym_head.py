"""How much of the teacher's query vector can the asymmetric student's head express?

The asymmetric student (:class:`index_build.students.AsymmetricStudent`) maps its last
layer's mean-pooled, normalized state ``u`` to each part of the teacher's space by one
linear map (initialized by ridge regression, then trained end to end). This script measures
what that head can reach, on a build whose stages have run (its work dir holds the mined
queries, the teacher's cached query and document vectors and the distilled student), by
fitting heads on the *frozen* base model's states over the build's own asymmetric training
queries and comparing them with the trained student:

- ``trained``: the build's distilled student (its exported graph, as served);
- ``ridge-last``: a linear map from ``u`` (the student's starting point);
- ``ridge-layers``: a linear map from the mean-pooled states of every layer (embeddings
  included), which the transformer computes anyway;
- ``mlp-layers``: ``ridge-last`` plus a one-hidden-layer MLP on every layer's pooled states
  (its output layer starting at zero), trained on the cosine to the teacher's part: the
  student's ``layers-mlp`` head (``asymmetric.head``) where its end-to-end training starts.

Per head and part: the mean cosine to the teacher's own query vector on a sample of the
training queries, the dev slice and the test queries; and nDCG@10 on the test queries of the
dense first stage and the per-part hybrid (:func:`models.retrieval.fuse_parts`, the
teacher's weights), over the whole corpus or, for a TREC pool build, over its BM25 top-100.
The test judgments are read for the nDCG rows only; nothing is fitted on test queries.

Writes ``benchmarks/results/asym-head.json`` and ``.md`` (one entry per config)::

    .venv/bin/python benchmarks/asym_head.py --config configs/labelfree-dl20.toml
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import typer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.latency import command_line, record_entry  # noqa: E402
from index_build.config import load_config  # noqa: E402
from index_build.metrics import metrics  # noqa: E402
from index_build.stages import Pipeline  # noqa: E402
from index_build.students import ridge_map  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "asym-head.json"


def normalized(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def test_queries(ctx: Pipeline) -> tuple[list[str], list[str], dict, Any]:
    """The test queries, their judgments and a function from query vectors to (dense, hybrid)
    runs: full-corpus first stages, or a TREC pool's BM25 top-100 (its rerank protocol)."""
    from index_build.evaluate import PoolIndex, TrecPool, pool_hybrid

    w = ctx.teacher_fusion["dense_share"]
    if ctx.cfg.evaluate.mode == "rerank":
        pool = TrecPool.load(Path(ctx.cfg.data.path), ctx.cfg.evaluate.rerank_depth)
        corpus, index = ctx.corpus_vectors("asymmetric"), ctx.collection.doc_index

        def pool_runs(q: np.ndarray) -> tuple[dict, dict]:
            dense = {qid: dict(zip(cs, map(float, corpus[[index[c] for c in cs]] @ q[r])))
                     for r, (qid, cs) in enumerate(zip(pool.qids, pool.candidates))}
            return dense, pool_hybrid(ctx, pool, PoolIndex.of_build(ctx), dense, w, "asymmetric", queries=q)
        return pool.qids, pool.texts, {"qrels": pool.qrels, "min_rel": 2}, pool_runs
    split = ctx.collection.split_queries(ctx.cfg.data.test_split)
    qids, texts = list(split), list(split.values())

    def runs(q: np.ndarray) -> tuple[dict, dict]:
        lists = ctx.first_stage_lists(texts, q, w, 100, "asymmetric", stages=("dense", "hybrid"))
        return ctx.run_of(qids, lists["dense"]), ctx.run_of(qids, lists["hybrid"])
    return qids, texts, {"qrels": ctx.collection.qrels[ctx.cfg.data.test_split], "min_rel": 1}, runs


def measure(ctx: Pipeline, max_train: int = 20000, epochs: int = 8) -> dict[str, Any]:
    """The heads' rows (see the module docstring) on build ``ctx``, whose asymmetric student
    has been exported. The frozen heads are the ``layers-mlp`` head of
    :class:`index_build.students.AsymmetricStudent` (before any end-to-end training) and its
    parts: ``ridge-last`` its maps, ``mlp-layers`` the maps plus the residual MLPs fitted for
    ``epochs`` passes (:func:`index_build.asymmetric.fit_head`)."""
    import torch

    from index_build.asymmetric import fit_head, mean_cosine, pooled_features
    from index_build.distill import asymmetric_training_texts
    from index_build.students import new_asymmetric_student
    from models.sources import resolve_model

    started = time.perf_counter()
    dev = ctx.load_mined()["dev"]
    train, _, _, _ = asymmetric_training_texts(ctx, dev)
    train = train[:: max(1, -(-len(train) // max_train))]
    qids, test, judged, runs = test_queries(ctx)
    sets = {"train": train, "dev": list(dev["queries"]), "test": test}
    space, bounds = ctx.teacher_space, ctx.teacher_fusion["parts"].bounds
    teacher = {k: space.query_vectors(v) for k, v in sets.items()}
    frozen = new_asymmetric_student(resolve_model(ctx.cfg.students.base), space.names, space.dims,
                                    head="layers-mlp", head_hidden=ctx.cfg.asymmetric.head_hidden,
                                    max_query_len=ctx.cfg.students.max_query_len)
    feats = {k: pooled_features(frozen, v, progress=ctx.progress) for k, v in sets.items()}
    targets = [teacher["train"][:, a:b] for a, b in zip(bounds, bounds[1:])]
    fit_head(frozen, *feats["train"], targets, epochs, ctx.cfg.asymmetric.seed, progress=ctx.progress)
    heads: dict[str, dict[str, np.ndarray]] = {
        "trained": {k: ctx.dense_queries(v, "asymmetric") for k, v in sets.items()}}
    maps = [m.weight.detach().numpy().T for m in frozen.linear_maps]
    heads["ridge-last"] = {k: np.hstack([normalized(u @ w) for w in maps]) for k, (u, _) in feats.items()}
    # a linear map from every layer's pooled states, standardized as the MLP reads them
    mu, sd = frozen.feature_mean.numpy(), frozen.feature_scale.numpy()
    x = {k: (f - mu) / sd for k, (_, f) in feats.items()}
    w_all = [ridge_map(x["train"], t) for t in targets]
    heads["ridge-layers"] = {k: np.hstack([normalized(v @ w) for w in w_all]) for k, v in x.items()}
    with torch.no_grad():
        heads["mlp-layers"] = {k: frozen.parts(torch.from_numpy(u), torch.from_numpy(f)).numpy()
                               for k, (u, f) in feats.items()}
    heads["teacher"] = dict(teacher)  # the bound: the teacher's own query vectors
    rows: dict[str, dict[str, Any]] = {}
    for name, h in heads.items():
        row: dict[str, Any] = {}
        for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
            for k in sets:
                row[f"cos part {i} {k}"] = mean_cosine(h[k][:, a:b], teacher[k][:, a:b])
        dense, hybrid = runs(np.ascontiguousarray(h["test"], dtype=np.float32))
        row["dense nDCG@10"] = metrics(judged["qrels"], dense, min_rel=judged["min_rel"])["nDCG@10"]
        row["per-part hybrid nDCG@10"] = metrics(judged["qrels"], hybrid, min_rel=judged["min_rel"])["nDCG@10"]
        rows[name] = row
    return {"members": space.names, "dims": space.dims, "train_queries": len(train),
            "dev_queries": len(sets["dev"]), "test_queries": len(qids), "mlp_epochs": epochs,
            "mlp_hidden": ctx.cfg.asymmetric.head_hidden,
            "hybrid_dense_share": ctx.teacher_fusion["dense_share"],
            "protocol": "TREC pool BM25 top-100" if ctx.cfg.evaluate.mode == "rerank" else "full-corpus retrieval",
            "seconds": round(time.perf_counter() - started, 1), "heads": rows}


def main(config: Path = typer.Option(..., help="a build config whose asymmetric student has been distilled"),
         max_train: int = typer.Option(20000, help="training queries the heads are fitted on (a sample)"),
         epochs: int = typer.Option(8, help="passes of the MLP head over them (asymmetric.head_init_epochs)"),
         out: Path = typer.Option(OUT)) -> None:
    ctx = Pipeline(load_config(config), progress=True)
    if ctx.up_to_date("export-asymmetric", ctx.export_key("asymmetric")) is None:
        raise typer.BadParameter(f"{config}: run its build first ({ctx.work} holds no asymmetric student "
                                 "exported for this config)")
    entry = {"config": str(config), "command": command_line(__file__), **measure(ctx, max_train, epochs)}
    results = record_entry(out, config.stem, entry)
    md = [f"### {name}\n\n{e['protocol']}; heads fitted on {e['train_queries']} training queries of the build "
          f"(frozen base model); teacher space {e['members']} {e['dims']}\n\n" + table(e["heads"])
          for name, e in results.items() if isinstance(e, dict) and "heads" in e]
    out.with_suffix(".md").write_text("\n\n".join(md) + "\n")
    typer.echo(json.dumps(entry["heads"], indent=1))


def table(rows: dict[str, dict[str, Any]]) -> str:
    cols = list(next(iter(rows.values())))
    lines = ["| head | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{r[c]:.4f}" for c in cols) + " |" for name, r in rows.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    typer.run(main)
