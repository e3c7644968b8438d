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
  (its output layer starting at zero), trained on the cosine to the teacher's part.

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

from benchmarks.latency import command_line, machine_info  # noqa: E402
from index_build.config import load_config  # noqa: E402
from index_build.metrics import metrics, write_json_atomic  # noqa: E402
from index_build.stages import Pipeline  # noqa: E402
from index_build.students import ridge_map  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "asym-head.json"


def pooled_layers(checkpoint: Path, texts: list[str], max_len: int, batch: int = 256,
                  progress: bool = True) -> np.ndarray:
    """``[n, layers + 1, hidden]``: each layer's mean-pooled token states (embeddings first,
    the last layer last) of the frozen base model; texts batched by length."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    model = AutoModel.from_pretrained(str(checkpoint), add_pooling_layer=False).eval()
    order = np.argsort([len(t) for t in texts], kind="stable")
    out: np.ndarray | None = None
    with torch.no_grad():
        for start in tqdm(range(0, len(texts), batch), desc="base model: pooled layer states", unit="batch",
                           disable=not progress):
            idx = order[start : start + batch]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            mask = enc["attention_mask"].unsqueeze(-1).float()
            states = model(**enc, output_hidden_states=True).hidden_states
            f = torch.stack([(h * mask).sum(1) / mask.sum(1) for h in states], 1).numpy()
            if out is None:
                out = np.zeros((len(texts), *f.shape[1:]), np.float32)
            out[idx] = f
    assert out is not None
    return out


def normalized(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mean_cos(a: np.ndarray, b: np.ndarray) -> float:
    return round(float(np.mean(np.sum(normalized(a) * normalized(b), 1))), 4)


class Standardize:
    def __init__(self, x: np.ndarray) -> None:
        self.mu, self.sd = x.mean(0), x.std(0) + 1e-6

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mu) / self.sd


def fit_mlp(x: np.ndarray, base: np.ndarray, target: np.ndarray, epochs: int, seed: int = 13,
            hidden: int = 1536) -> Any:
    """``base(x) + mlp(x)`` trained on the cosine to ``target`` (unit rows); the MLP's output
    layer starts at zero, so training starts from ``base``. Returns ``f(x, base) -> part``."""
    import torch

    torch.manual_seed(seed)
    out_layer = torch.nn.Linear(hidden, target.shape[1])
    torch.nn.init.zeros_(out_layer.weight)
    torch.nn.init.zeros_(out_layer.bias)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(), out_layer)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    xt, bt, yt = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in (x, base, target))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for i in torch.randperm(len(xt), generator=gen).split(256):
            pred = torch.nn.functional.normalize(bt[i] + net(xt[i]), dim=-1)
            loss = (1 - (pred * yt[i]).sum(-1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    def apply(xs: np.ndarray, bs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return bs + net(torch.from_numpy(np.ascontiguousarray(xs, dtype=np.float32))).numpy()
    return apply


def test_queries(ctx: Pipeline) -> tuple[list[str], list[str], dict, Any]:
    """The test queries, their judgments and a function from query vectors to (dense, hybrid)
    runs: full-corpus first stages, or a TREC pool's BM25 top-100 (its rerank protocol)."""
    from index_build.evaluate import TrecPool, pool_hybrid

    w = ctx.teacher_fusion["dense_share"]
    if ctx.cfg.evaluate.mode == "rerank":
        pool = TrecPool.load(Path(ctx.cfg.data.path), ctx.cfg.evaluate.rerank_depth)
        corpus, index = ctx.corpus_vectors("asymmetric"), ctx.collection.doc_index

        def pool_runs(q: np.ndarray) -> tuple[dict, dict]:
            dense = {qid: dict(zip(cs, map(float, corpus[[index[c] for c in cs]] @ q[r])))
                     for r, (qid, cs) in enumerate(zip(pool.qids, pool.candidates))}
            return dense, pool_hybrid(ctx, pool, dense, w, "asymmetric", queries=q)
        return pool.qids, pool.texts, {"qrels": pool.qrels, "min_rel": 2}, pool_runs
    split = ctx.collection.split_queries(ctx.cfg.data.test_split)
    qids, texts = list(split), list(split.values())

    def runs(q: np.ndarray) -> tuple[dict, dict]:
        lists = ctx.first_stage_lists(texts, q, w, 100, "asymmetric", stages=("dense", "hybrid"))
        return ctx.run_of(qids, lists["dense"]), ctx.run_of(qids, lists["hybrid"])
    return qids, texts, {"qrels": ctx.collection.qrels[ctx.cfg.data.test_split], "min_rel": 1}, runs


def measure(ctx: Pipeline, max_train: int = 20000, epochs: int = 8) -> dict[str, Any]:
    """The heads' rows (see the module docstring) on build ``ctx``, whose asymmetric student
    has been exported."""
    from index_build.distill import asymmetric_training_texts
    from models.sources import resolve_model

    started = time.perf_counter()
    dev = ctx.load_mined()["dev"]
    train, _, _ = asymmetric_training_texts(ctx, dev)
    train = train[:: max(1, -(-len(train) // max_train))]
    qids, test, judged, runs = test_queries(ctx)
    sets = {"train": train, "dev": list(dev["queries"]), "test": test}
    space, bounds = ctx.teacher_space, ctx.teacher_fusion["parts"].bounds
    teacher = {k: space.query_vectors(v) for k, v in sets.items()}
    base_model = resolve_model(ctx.cfg.students.base)
    states = {k: pooled_layers(base_model, v, ctx.cfg.students.max_query_len, progress=ctx.progress)
              for k, v in sets.items()}
    lasts = {k: normalized(v[:, -1]) for k, v in states.items()}  # the student's pooled state u
    feats = {k: v.reshape(len(v), -1) for k, v in states.items()}  # every layer's, side by side
    std = Standardize(feats["train"])
    heads: dict[str, dict[str, np.ndarray]] = {
        "trained": {k: ctx.dense_queries(v, "asymmetric") for k, v in sets.items()}}
    fitted: dict[str, dict[str, list[np.ndarray]]] = {h: {k: [] for k in sets}
                                                       for h in ("ridge-last", "ridge-layers", "mlp-layers")}
    for a, b in zip(bounds, bounds[1:]):
        target = teacher["train"][:, a:b]
        w_last = ridge_map(lasts["train"], target)
        w_all = ridge_map(std(feats["train"]), target)
        f = fit_mlp(std(feats["train"]), lasts["train"] @ w_last, normalized(target), epochs)
        for k in sets:
            base = lasts[k] @ w_last
            fitted["ridge-last"][k].append(normalized(base))
            fitted["ridge-layers"][k].append(normalized(std(feats[k]) @ w_all))
            fitted["mlp-layers"][k].append(normalized(f(std(feats[k]), base)))
    for name, parts in fitted.items():
        heads[name] = {k: np.hstack(v).astype(np.float32) for k, v in parts.items()}
    heads["teacher"] = dict(teacher)  # the bound: the teacher's own query vectors
    rows: dict[str, dict[str, Any]] = {}
    for name, h in heads.items():
        row: dict[str, Any] = {}
        for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
            for k in sets:
                row[f"cos part {i} {k}"] = mean_cos(h[k][:, a:b], teacher[k][:, a:b])
        dense, hybrid = runs(np.ascontiguousarray(h["test"], dtype=np.float32))
        row["dense nDCG@10"] = metrics(judged["qrels"], dense, min_rel=judged["min_rel"])["nDCG@10"]
        row["per-part hybrid nDCG@10"] = metrics(judged["qrels"], hybrid, min_rel=judged["min_rel"])["nDCG@10"]
        rows[name] = row
    return {"members": space.names, "dims": space.dims, "train_queries": len(train),
            "dev_queries": len(sets["dev"]), "test_queries": len(qids), "mlp_epochs": epochs,
            "hybrid_dense_share": ctx.teacher_fusion["dense_share"],
            "protocol": "TREC pool BM25 top-100" if ctx.cfg.evaluate.mode == "rerank" else "full-corpus retrieval",
            "seconds": round(time.perf_counter() - started, 1), "heads": rows}


def main(config: Path = typer.Option(..., help="a build config whose asymmetric student has been distilled"),
         max_train: int = typer.Option(20000, help="training queries the heads are fitted on (a sample)"),
         epochs: int = typer.Option(8, help="passes of the MLP head over them"),
         out: Path = typer.Option(OUT)) -> None:
    ctx = Pipeline(load_config(config), progress=True)
    if ctx.up_to_date("export-asymmetric", ctx.export_key("asymmetric")) is None:
        raise typer.BadParameter(f"{config}: run its build first ({ctx.work} holds no asymmetric student "
                                 "exported for this config)")
    entry = {"config": str(config), "command": command_line(__file__), **measure(ctx, max_train, epochs)}
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.pop("command", None)
    results[config.stem] = entry
    results["machine"] = machine_info()
    write_json_atomic(out, results)
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
