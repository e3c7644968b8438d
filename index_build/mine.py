"""The mine stage: training examples (a query, its positives, hard negatives and the
teacher's score of each) and the dev slice that model selection and tuning use. Labelled
corpora mine their training queries; label-free ones generate pseudo-queries (GPL-style)."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np

from index_build.context import BuildContext


def mine(ctx: BuildContext, out: Path) -> dict:
    """Mine ``out/examples.pkl``: :func:`mine_labelled` or, on a label-free build,
    :func:`mine_label_free`."""
    return mine_label_free(ctx, out) if ctx.label_free else mine_labelled(ctx, out)


def mine_labelled(ctx: BuildContext, out: Path) -> dict:
    """The training split's queries, a share held out as the dev slice (``data.dev_fraction``);
    positives from its judgments, negatives from BM25 and the base dense model's top
    candidates, every candidate scored by the teacher."""
    from index_build.sampling import make_examples
    from index_build.teachers import cached_teacher_scores

    col = ctx.collection
    train_q = col.split_queries(ctx.cfg.data.train_split)
    qids = list(train_q)
    rng = random.Random(0)
    rng.shuffle(qids)
    n_dev = max(1, int(round(ctx.cfg.data.dev_fraction * len(qids)))) if len(qids) > 10 else 0
    dev_ids, train_ids = sorted(qids[:n_dev]), sorted(qids[n_dev:])
    qrels = col.qrels[ctx.cfg.data.train_split]

    def positives(ids: list[str]) -> list[set[int]]:
        return [{col.doc_index[d] for d, g in qrels[q].items() if g > 0} for q in ids]

    texts = [train_q[q] for q in train_ids]
    pos = positives(train_ids)
    pools, rankings = ctx.candidate_pools(texts, ctx.cfg.teacher.pool_depth, [sorted(p) for p in pos])
    t_scores = cached_teacher_scores(ctx.teacher, ctx.cache, texts, pools, progress=ctx.progress)
    examples = make_examples(train_ids, texts, pools, t_scores, rankings, positives=pos,
                             neg_depth=ctx.cfg.students.neg_depth)
    dev_texts = [train_q[q] for q in dev_ids]
    dev_pools, _ = ctx.candidate_pools(dev_texts, ctx.cfg.students.dev_pool_depth,
                                        [sorted(p) for p in positives(dev_ids)])
    with (out / "examples.pkl").open("wb") as f:
        pickle.dump({"examples": examples, "dev": {"qids": dev_ids, "queries": dev_texts,
                                                   "pools": dev_pools,
                                                   "qrels": {q: qrels[q] for q in dev_ids}}}, f)
    return {"train_queries": len(train_ids), "examples": len(examples), "dev_queries": len(dev_ids),
            "mean_pool": float(np.mean([len(p) for p in pools])),
            "mean_negatives": float(np.mean([len(e.negatives) for e in examples]))}



def mine_label_free(ctx: BuildContext, out: Path) -> dict:
    """GPL-style: pseudo-queries from the corpus, filtered (incl. round trip through the
    teacher), BM25 + base-dense hard negatives, the teacher scores every pair."""
    from index_build.pseudo_queries import default_budget

    lf = ctx.cfg.label_free
    budget = lf.budget or default_budget(len(ctx.collection.docs))
    # logged queries held out for the dev slice replace the pseudo-query one
    n_pseudo_dev = 0 if not ctx.pseudo_dev else lf.dev_queries
    examples, dev, info = pseudo_examples(ctx, budget, n_pseudo_dev, out / "pseudo_queries.tsv")
    mined: dict = {"examples": examples, "dev": dev}
    if lf.query_log:
        log_examples, log_texts, log_dev, info["query_log"] = query_log_examples(ctx, lf.query_log, dev,
                                                                                 lf.log_dev_queries)
        mined["examples"] = examples + log_examples
        mined["query_log"] = log_texts
        if not ctx.pseudo_dev:
            mined["dev"] = log_dev
            info["dev_queries"] = len(log_dev["qids"])
    with (out / "examples.pkl").open("wb") as f:
        pickle.dump(mined, f)
    return {"label_free": True, **info}


def query_log_examples(ctx: BuildContext, path: str, dev: dict,
                       n_dev: int = 0) -> tuple[list, list[str], dict, dict]:
    """Training examples from a log of unjudged queries (``label_free.query_log``): each
    query's candidates (BM25 and the base model's top ``teacher.pool_depth``) scored by the
    teacher, whose top candidates are its positives. Queries of the test split and of the
    pseudo-query dev slice ``dev`` are dropped, so no evaluated query is trained on; ``n_dev``
    of the rest (at most a fifth, drawn with a fixed seed) are held out as a dev slice judged
    by the teacher (:func:`index_build.tune.teacher_judged` over each one's
    ``students.dev_pool_depth`` pool). Returns the examples, the trained texts, that dev
    slice and what the log held."""
    from index_build.data import load_query_log, query_key
    from index_build.sampling import make_examples
    from index_build.teachers import cached_teacher_scores
    from index_build.tune import teacher_judged

    logged = load_query_log(path)
    held_out = {query_key(t) for t in dev["queries"]}
    test = ctx.cfg.data.test_split
    if test in ctx.collection.qrels:
        held_out |= {query_key(t) for t in ctx.collection.split_queries(test).values()}
    kept = [t for t in logged if query_key(t) not in held_out]
    order = list(range(len(kept)))
    random.Random(0).shuffle(order)
    dev_idx = set(order[:min(n_dev, len(kept) // 5)])
    dev_texts = [t for i, t in enumerate(kept) if i in dev_idx]
    texts = [t for i, t in enumerate(kept) if i not in dev_idx]
    dev_qids = [f"logdev{i}" for i in range(len(dev_texts))]
    dev_pools = ctx.candidate_pools(dev_texts, ctx.cfg.students.dev_pool_depth)[0] if dev_texts else []
    log_dev = {"qids": dev_qids, "queries": dev_texts, "pools": dev_pools,
               "qrels": teacher_judged(ctx, dev_qids, dev_texts, dev_pools) if dev_texts else {}}
    about = {"path": path, "sha256": ctx.query_log_digest, "queries": len(logged), "kept": len(texts),
             "held_out_dropped": len(logged) - len(kept), "dev": len(dev_texts)}
    if not texts:
        return [], [], log_dev, {**about, "examples": 0}
    pools, rankings = ctx.candidate_pools(texts, ctx.cfg.teacher.pool_depth)
    t_scores = cached_teacher_scores(ctx.teacher, ctx.cache, texts, pools, progress=ctx.progress)
    examples = make_examples([f"log{i}" for i in range(len(texts))], texts, pools, t_scores, rankings,
                             neg_depth=ctx.cfg.students.neg_depth)
    return examples, texts, log_dev, {**about, "examples": len(examples)}


def pseudo_examples(ctx: BuildContext, budget: int, n_dev: int, tsv: Path | None = None) -> tuple[list, dict, dict]:
    """``budget`` training examples (+ ``n_dev`` dev queries with pseudo-qrels) from
    pseudo-queries of the corpus; the source document is the positive."""
    from index_build.pseudo_queries import filter_queries, make_generator, round_trip_filter
    from index_build.sampling import make_examples
    from index_build.teachers import cached_teacher_scores

    lf = ctx.cfg.label_free
    docs = ctx.collection.docs
    generated = [q for spec in lf.generators for q in make_generator(spec).generate(docs)]
    # over-generate before the round trip (it drops a share), then cap to the budget
    kept, stats = filter_queries(generated, docs, min_words=lf.min_words, max_words=lf.max_words,
                                 per_doc=lf.per_doc, budget=int(budget * 1.5) + n_dev)
    texts = [q.text for q in kept]
    pools, rankings = ctx.candidate_pools(texts, ctx.cfg.teacher.pool_depth, [[q.doc] for q in kept])
    t_scores = cached_teacher_scores(ctx.teacher, ctx.cache, texts, pools, progress=ctx.progress)
    keep = round_trip_filter(kept, pools, t_scores, top_k=lf.round_trip_top_k)
    stats["round_trip_dropped"] = int(len(keep) - sum(keep))
    idx = [i for i, k in enumerate(keep) if k]
    rng = random.Random(0)
    rng.shuffle(idx)
    n_dev = min(n_dev, len(idx) // 5)
    dev_idx, train_idx = sorted(idx[:n_dev]), sorted(idx[n_dev : n_dev + budget])
    qids = [f"pq{i}" for i in range(len(kept))]
    examples = make_examples([qids[i] for i in train_idx], [texts[i] for i in train_idx],
                             [pools[i] for i in train_idx], [t_scores[i] for i in train_idx],
                             [r[train_idx] for r in rankings], positives=[{kept[i].doc} for i in train_idx],
                             neg_depth=ctx.cfg.students.neg_depth)
    dev_texts = [texts[i] for i in dev_idx]
    dev_pools, _ = ctx.candidate_pools(dev_texts, ctx.cfg.students.dev_pool_depth,
                                        [[kept[i].doc] for i in dev_idx]) if dev_idx else ([], [])
    doc_ids = ctx.collection.doc_ids
    dev = {"qids": [qids[i] for i in dev_idx], "queries": dev_texts, "pools": dev_pools,
           "qrels": {qids[i]: {doc_ids[kept[i].doc]: 1} for i in dev_idx}}
    by_gen: dict[str, int] = {}
    for i in train_idx:
        by_gen[kept[i].generator] = by_gen.get(kept[i].generator, 0) + 1
    if tsv is not None:
        with tsv.open("w") as f:
            for i in train_idx + dev_idx:
                f.write(f"{qids[i]}\t{doc_ids[kept[i].doc]}\t{kept[i].generator}\t{texts[i]}\n")
    info = {"generated": len(generated), "filters": stats, "pseudo_queries": len(train_idx),
            "dev_queries": len(dev_idx), "by_generator": by_gen, "generators": lf.generators,
            "examples": len(examples),
            "mean_negatives": float(np.mean([len(e.negatives) for e in examples])) if examples else 0.0}
    return examples, dev, info

