"""What the asymmetric student's listwise KL can teach: the teacher's distribution over each
training query's candidates, pseudo-queries against real queries.

The asymmetric student (:func:`index_build.asymmetric.train_asymmetric`) is trained with a
listwise KL to the softmax of the full teacher's scores over each query's pool (the union of
each member's top ``asymmetric.pool_depth``; the score is the sum of the members' per-query
z-scores). A pseudo-query is cut from its source document, so every member ranks that
document first by a wide margin and the softmax may put nearly all its mass there; the KL
then teaches little beyond "rank the source first". This script measures that, after a
build's mine stage, on:

- the build's asymmetric training queries: its pseudo-queries by generator (title, sentence,
  key-phrase), each with its source document, and its real training queries (a labelled
  build's, or a query log's), if any;
- the collection's judged training queries (``data.train_split``), real queries the
  corpus-only build never trains on (their texts read here only for these statistics).

Per group: the teacher's top-1 softmax mass, its entropy (and ``exp`` of it, the effective
number of candidates), how often the source document is the teacher's first, and the KL
from the teacher to the base MiniLM's own scores (its cosine times ``asymmetric.scale``, as
the student scores) at the start of training. ``temperature`` is the one that brings the
pseudo-queries' mean top-1 mass to the real queries' (teacher scores divided by it).

Writes ``benchmarks/results/kl-targets.json`` and ``.md`` (one entry per config)::

    .venv/bin/python benchmarks/kl_targets.py --config configs/labelfree-scifact.toml
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import typer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.latency import command_line, record_entry  # noqa: E402
from index_build.config import load_config  # noqa: E402
from index_build.stages import Pipeline  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "kl-targets.json"


def softmax_rows(scores: list[np.ndarray], temperature: float = 1.0) -> list[np.ndarray]:
    out = []
    for s in scores:
        z = s.astype(np.float64) / temperature
        p = np.exp(z - z.max())
        out.append(p / p.sum())
    return out


def distribution_stats(t_scores: list[np.ndarray], s_scores: list[np.ndarray], pools: list[np.ndarray],
                       sources: list[int] | None, temperature: float = 1.0) -> dict[str, float]:
    """Means over queries of the teacher's top-1 mass, entropy, effective candidates, the
    KL(teacher || student) and, with ``sources``, how often the source is the teacher's first
    and the mass on it."""
    pt, ps = softmax_rows(t_scores, temperature), softmax_rows(s_scores)
    top1 = np.array([p.max() for p in pt])
    ent = np.array([-(p * np.log(np.maximum(p, 1e-300))).sum() for p in pt])
    kl = np.array([(a * (np.log(np.maximum(a, 1e-300)) - np.log(np.maximum(b, 1e-300)))).sum()
                   for a, b in zip(pt, ps)])
    out = {"queries": len(pt), "top1_mass": float(top1.mean()), "entropy": float(ent.mean()),
           "effective_candidates": float(np.exp(ent).mean()), "kl_to_base": float(kl.mean()),
           "pool": float(np.mean([len(p) for p in pools]))}
    if sources is not None:
        first = [int(pool[np.argmax(t)]) == src for t, pool, src in zip(t_scores, pools, sources)]
        mass = [float(p[pool == src].sum()) for p, pool, src in zip(pt, pools, sources)]
        out.update(source_first=float(np.mean(first)), source_mass=float(np.mean(mass)))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def matching_temperature(pseudo: list[np.ndarray], target_top1: float) -> float:
    """The temperature at which the mean top-1 mass of ``pseudo`` equals ``target_top1``
    (bisection on a log scale; the mass falls as the temperature rises)."""
    lo, hi = 0.05, 50.0
    for _ in range(40):
        mid = float(np.sqrt(lo * hi))
        mass = np.mean([p.max() for p in softmax_rows(pseudo, mid)])
        lo, hi = (mid, hi) if mass > target_top1 else (lo, mid)
    return round(float(np.sqrt(lo * hi)), 3)


def measure(ctx: Pipeline) -> dict[str, Any]:
    from index_build.asymmetric import candidate_union
    from index_build.distill import asymmetric_training_texts
    from index_build.pseudo_queries import KeyphraseGenerator, SentenceGenerator, TitleGenerator
    from index_build.teachers import BM25Teacher, cached_teacher_scores

    a, space = ctx.cfg.asymmetric, ctx.teacher_space
    mined = ctx.load_mined()
    texts, _, _, sources_of = asymmetric_training_texts(ctx, mined["dev"])
    kind: dict[str, str] = {}
    for g in (TitleGenerator(), SentenceGenerator(per_doc=a.sentences_per_doc),
              KeyphraseGenerator(per_doc=a.keyphrases_per_doc)):
        for q in g.generate(ctx.collection.docs):
            kind.setdefault(q.text, g.name)
    source = dict(zip(texts, sources_of.tolist()))
    real_training = "training (real queries)"
    groups: dict[str, list[str]] = {}
    for t in texts:
        groups.setdefault(kind.get(t, "other") if source[t] >= 0 else real_training, []).append(t)
    real_name = f"real ({ctx.cfg.data.train_split} split)"
    real = list(ctx.collection.split_queries(ctx.cfg.data.train_split).values())
    if real:
        groups[real_name] = real
    doc_parts = space.doc_parts()
    with_bm25 = any(isinstance(m, BM25Teacher) for m in ctx.teacher.members)
    scored: dict[str, tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], list[int] | None]] = {}
    for name, qs in groups.items():
        q_parts = space.query_parts(qs)
        pools = candidate_union(q_parts, doc_parts, ctx.bm25 if with_bm25 else None, qs, a.pool_depth)
        t_scores = cached_teacher_scores(ctx.teacher, ctx.cache, qs, pools, progress=ctx.progress)
        # the base MiniLM's own scores (the space's first part), as the student scores at the start
        s_scores = [a.scale * (doc_parts[0][pool] @ q_parts[0][r]) for r, pool in enumerate(pools)]
        sources = None if name in (real_training, real_name) else [source[t] for t in qs]
        scored[name] = (t_scores, s_scores, pools, sources)
    rows = {name: distribution_stats(*v) for name, v in scored.items()}
    # the same pools without each pseudo-query's source document: what the KL teaches about the rest
    without_source = {}
    for name, (t_rows, s_rows, pool_rows, srcs) in scored.items():
        if srcs is None:
            continue
        keep = [pool != src for pool, src in zip(pool_rows, srcs)]
        without_source[name] = distribution_stats([x[k] for x, k in zip(t_rows, keep)],
                                                  [x[k] for x, k in zip(s_rows, keep)],
                                                  [p[k] for p, k in zip(pool_rows, keep)], None)
    entry: dict[str, Any] = {"members": space.names, "pool_depth": a.pool_depth, "scale": a.scale, "groups": rows,
                             "groups_without_source": without_source}
    if real:
        pseudo = [t for v in scored.values() if v[3] is not None for t in v[0]]
        temp = matching_temperature(pseudo, rows[real_name]["top1_mass"])
        entry["temperature"] = temp
        entry["groups_at_temperature"] = {n: distribution_stats(*v, temperature=temp)
                                          for n, v in scored.items() if v[3] is not None}
    return entry


def table(rows: dict[str, dict[str, Any]]) -> str:
    cols = ["queries", "pool", "top1_mass", "entropy", "effective_candidates", "kl_to_base", "source_first",
            "source_mass"]
    lines = ["| group | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for name, r in rows.items()]
    return "\n".join(lines)


def main(config: Path = typer.Option(..., help="a build config whose mine stage has run"),
         out: Path = typer.Option(OUT)) -> None:
    ctx = Pipeline(load_config(config), progress=True)
    if ctx.up_to_date("mine", ctx.mine_key()) is None:
        raise typer.BadParameter(f"{config}: run its mine stage first (index-build mine --config {config})")
    entry = {"config": str(config), "command": command_line(__file__), **measure(ctx)}
    results = record_entry(out, config.stem, entry)
    md = []
    for name, e in results.items():
        if not isinstance(e, dict) or "groups" not in e:
            continue
        md.append(f"### {name}\n\n`{e['command']}`; teacher {e['members']} plus BM25 where the build has it; "
                  f"pools: each member's top {e['pool_depth']}; student scale {e['scale']}\n\n" + table(e["groups"]))
        md.append("Each pseudo-query's pool without its source document:\n\n" + table(e["groups_without_source"]))
        if "temperature" in e:
            md.append(f"Teacher scores divided by {e['temperature']} (the real queries' top-1 mass):\n\n"
                      + table(e["groups_at_temperature"]))
    out.with_suffix(".md").write_text("\n\n".join(md) + "\n")
    typer.echo(json.dumps(entry["groups"], indent=1))


if __name__ == "__main__":
    typer.run(main)
