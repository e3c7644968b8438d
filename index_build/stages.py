"""The build pipeline: mine -> distill -> export -> encode -> evaluate (-> index -> artifact).

Each stage writes its outputs under ``work_dir/<stage>/`` with a ``stage.json`` holding
the hash of everything it depends on (its config sections and upstream stage keys), its
wall time and peak memory. A rerun skips a stage whose key is unchanged, so changing one
setting redoes only the stages downstream of it.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from index_build.cache import ArrayCache, content_key
from index_build.config import BuildConfig
from index_build.data import Collection, load_collection
from index_build.evaluate import metrics, one_se_choice, per_query_ndcg, run_from_arrays
from index_build.export import INT8_WEIGHTS_MARK, OUTLIER_RATIO
from index_build.teachers import exact_topk
from models.encoders import ONNX_NAME
from models.retrieval import FIRST_STAGES, Ranked, first_stages, fuse_hybrid, rerank_order

log = logging.getLogger(__name__)


#: The version of each stage's code, part of its key: bump a stage's number when what it
#: writes changes, and that stage and every stage after it (their keys include its key)
#: rebuild. The teacher's scores and encodings are cached by content, not by these keys.
STAGE_VERSIONS = {"mine": 1, "pseudo": 1, "distill": 1, "export": 1, "evaluate": 1, "artifact": 1}
#: the prefix of a dense model's rows in the results (``dense``/``asym-dense``, ``hybrid``/``asym-hybrid``)
DENSE_ROW_PREFIX = {"dense": "", "asymmetric": "asym-"}
#: fusion and interpolation weights tried on the dev slice
WEIGHT_GRID = [round(0.1 * i, 1) for i in range(11)]


class PeakMemory:
    """Samples this process's RSS in a thread; ``peak`` is the maximum seen."""

    def __init__(self, interval: float = 0.2) -> None:
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


@dataclass
class StageRecord:
    name: str
    key: str
    seconds: float
    peak_rss_bytes: int
    result: dict = field(default_factory=dict)
    cached: bool = False


class Pipeline:
    def __init__(self, cfg: BuildConfig, *, progress: bool = True) -> None:
        self.cfg = cfg
        self.work = Path(cfg.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.records: dict[str, StageRecord] = {}
        #: per TREC DL pool whose own students are evaluated: the dev-slice weights used
        self.trec_weights: dict[str, dict[str, Any]] = {}
        self._rerank_tuning: dict[tuple, dict[str, Any]] = {}  # see tune_rerank_weights
        self._hybrid_tuning: dict[tuple, dict[str, Any]] = {}
        self._default_choice: dict[tuple, dict[str, Any]] = {}  # see choose_default
        if cfg.threads:
            import os

            os.environ.setdefault("OMP_NUM_THREADS", str(cfg.threads))

    # ----------------------------------------------------------------- plumbing
    def up_to_date(self, name: str, key: str) -> StageRecord | None:
        """The record of stage ``name`` when its work dir holds a complete run under ``key``
        (then it is also among this run's records), else None."""
        meta = self.work / name / "stage.json"
        if not meta.is_file():
            return None
        saved = json.loads(meta.read_text())
        if saved.get("key") != key or not saved.get("complete"):
            return None
        rec = StageRecord(name, key, saved["seconds"], saved["peak_rss_bytes"], saved.get("result", {}), True)
        self.records[name] = rec
        return rec

    def stage(self, name: str, key: str, fn: Callable[[Path], dict], force: bool = False) -> StageRecord:
        out = self.work / name
        meta = out / "stage.json"
        if not force and (rec := self.up_to_date(name, key)) is not None:
            log.info("stage %s: up to date (key %s)", name, key)
            return rec
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        log.info("stage %s: running", name)
        t0 = time.perf_counter()
        with PeakMemory() as mem:
            result = fn(out)
        rec = StageRecord(name, key, round(time.perf_counter() - t0, 2), int(mem.peak), result or {})
        tmp = meta.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "complete": True, "seconds": rec.seconds,
                                   "peak_rss_bytes": rec.peak_rss_bytes, "result": rec.result}, indent=2))
        tmp.replace(meta)
        self.records[name] = rec
        return rec

    @cached_property
    def collection(self) -> Collection:
        # a rerank-mode collection is a candidate pool: its judged documents need not all be in it
        unknown = "keep" if self.cfg.evaluate.mode == "rerank" else "error"
        return load_collection(self.cfg.data.path, unknown_docs=unknown)

    @cached_property
    def corpus_texts(self) -> list[str]:
        return self.collection.doc_texts()

    @cached_property
    def cache(self) -> ArrayCache:
        from models.sources import cache_dir

        return ArrayCache(self.cfg.cache_path or cache_dir() / "arrays.sqlite")

    @cached_property
    def bm25(self):
        from models.sparse_index import BM25Index

        return BM25Index.build(self.corpus_texts)

    @cached_property
    def base_dense(self):
        from index_build.teachers import BiEncoderTeacher

        return BiEncoderTeacher(self.cfg.students.base, self.corpus_texts, self.cache,
                                max_doc_len=self.cfg.students.max_doc_len, threads=self.cfg.threads,
                                progress=self.progress, name="base-dense")

    @cached_property
    def teacher(self):
        from index_build.teachers import BI_ENCODER_MAX_DOC_LEN, EnsembleTeacher, build_teacher

        spec = self.teacher_spec()
        # the base dense model is the same scorer as a bi-encoder member on the same checkpoint and length
        same_length = self.cfg.students.max_doc_len == BI_ENCODER_MAX_DOC_LEN
        prebuilt = {self.cfg.students.base: self.base_dense} if same_length else None
        teacher = build_teacher(spec, self.corpus_texts, self.collection.checksum(), self.cache, bm25=self.bm25,
                                threads=self.cfg.threads, prebuilt=prebuilt)
        assert isinstance(teacher, EnsembleTeacher)
        return teacher

    def teacher_spec(self):
        """The configured teacher: an ensemble of ``teacher.members``."""
        from index_build.teachers import TeacherSpec

        return TeacherSpec.from_dict({"kind": "ensemble", "members": self.cfg.teacher.members,
                                      "norm": self.cfg.teacher.norm})

    @property
    def label_free(self) -> bool:
        c = self.collection
        return self.cfg.data.label_free or not (c.has_labels and self.cfg.data.train_split in c.qrels)

    def candidate_pools(self, queries: list[str], depth: int, extra: list[list[int]] | None = None):
        """Union of BM25 and base-dense top-``depth`` per query, plus the two rankings."""
        from index_build.sampling import union_pools

        _, bm_idx = self.bm25.search(queries, depth)
        _, de_idx = self.base_dense.retrieve(queries, depth)
        return union_pools([bm_idx, de_idx], extra), [bm_idx, de_idx]

    def key(self, stage: str, *parts: str) -> str:
        """A stage's key: the corpus, the stage's code version and what it depends on."""
        return content_key(self.collection.checksum(), stage, f"v{STAGE_VERSIONS[stage]}", *parts)[:16]

    def content_fp(self, *parts: str) -> str:
        """The fingerprint under which a content cache (corpus encodings, scores) keeps this
        corpus's arrays for ``parts`` (a model's export key, ...)."""
        return content_key(self.collection.checksum(), *parts)[:16]

    # ----------------------------------------------------------------- stages
    def mine_key(self) -> str:
        sections = ("data", "teacher", "students", "label_free") if self.label_free else ("data", "teacher", "students")
        return self.key("mine", self.cfg.section_hash(*sections), f"label_free={self.label_free}")

    def mine(self) -> StageRecord:
        def run(out: Path) -> dict:
            from index_build.sampling import make_examples
            from index_build.teachers import cached_teacher_scores

            if self.label_free:
                return self.mine_label_free(out)
            col = self.collection
            train_q = col.split_queries(self.cfg.data.train_split)
            qids = list(train_q)
            rng = random.Random(0)
            rng.shuffle(qids)
            n_dev = max(1, int(round(self.cfg.data.dev_fraction * len(qids)))) if len(qids) > 10 else 0
            dev_ids, train_ids = sorted(qids[:n_dev]), sorted(qids[n_dev:])
            qrels = col.qrels[self.cfg.data.train_split]

            def positives(ids: list[str]) -> list[set[int]]:
                return [{col.doc_index[d] for d, g in qrels[q].items() if g > 0} for q in ids]

            texts = [train_q[q] for q in train_ids]
            pos = positives(train_ids)
            pools, rankings = self.candidate_pools(texts, self.cfg.teacher.pool_depth, [sorted(p) for p in pos])
            t_scores = cached_teacher_scores(self.teacher, self.cache, texts, pools, progress=self.progress)
            examples = make_examples(train_ids, texts, pools, t_scores, rankings, positives=pos,
                                     neg_depth=self.cfg.students.neg_depth)
            dev_texts = [train_q[q] for q in dev_ids]
            dev_pools, _ = self.candidate_pools(dev_texts, self.cfg.students.dev_pool_depth,
                                                [sorted(p) for p in positives(dev_ids)])
            with (out / "examples.pkl").open("wb") as f:
                pickle.dump({"examples": examples, "dev": {"qids": dev_ids, "queries": dev_texts,
                                                           "pools": dev_pools,
                                                           "qrels": {q: qrels[q] for q in dev_ids}}}, f)
            return {"train_queries": len(train_ids), "examples": len(examples), "dev_queries": len(dev_ids),
                    "mean_pool": float(np.mean([len(p) for p in pools])),
                    "mean_negatives": float(np.mean([len(e.negatives) for e in examples]))}

        return self.stage("mine", self.mine_key(), run)

    def mine_label_free(self, out: Path) -> dict:
        """GPL-style: pseudo-queries from the corpus, filtered (incl. round trip through the
        teacher), BM25 + base-dense hard negatives, the teacher scores every pair."""
        lf = self.cfg.label_free
        from index_build.pseudo_queries import default_budget

        budget = lf.budget or default_budget(len(self.collection.docs))
        examples, dev, info = self.pseudo_examples(budget, lf.dev_queries, out / "pseudo_queries.tsv")
        with (out / "examples.pkl").open("wb") as f:
            pickle.dump({"examples": examples, "dev": dev}, f)
        return {"label_free": True, **info}

    def pseudo_examples(self, budget: int, n_dev: int, tsv: Path | None = None) -> tuple[list, dict, dict]:
        """``budget`` training examples (+ ``n_dev`` dev queries with pseudo-qrels) from
        pseudo-queries of the corpus; the source document is the positive."""
        from index_build.pseudo_queries import filter_queries, make_generator, round_trip_filter
        from index_build.sampling import make_examples
        from index_build.teachers import cached_teacher_scores

        lf = self.cfg.label_free
        docs = self.collection.docs
        generated = [q for spec in lf.generators for q in make_generator(spec).generate(docs)]
        # over-generate before the round trip (it drops a share), then cap to the budget
        kept, stats = filter_queries(generated, docs, min_words=lf.min_words, max_words=lf.max_words,
                                     per_doc=lf.per_doc, budget=int(budget * 1.5) + n_dev)
        texts = [q.text for q in kept]
        pools, rankings = self.candidate_pools(texts, self.cfg.teacher.pool_depth, [[q.doc] for q in kept])
        t_scores = cached_teacher_scores(self.teacher, self.cache, texts, pools, progress=self.progress)
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
                                 neg_depth=self.cfg.students.neg_depth)
        dev_texts = [texts[i] for i in dev_idx]
        dev_pools, _ = self.candidate_pools(dev_texts, self.cfg.students.dev_pool_depth,
                                            [[kept[i].doc] for i in dev_idx]) if dev_idx else ([], [])
        doc_ids = self.collection.doc_ids
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

    def pseudo_key(self, n: int) -> str:
        return self.key("pseudo", self.cfg.section_hash("teacher", "students", "label_free"), str(n))

    def pseudo(self, n: int) -> StageRecord:
        """Pseudo-query examples that augment a labelled training set (GPL-style)."""
        def run(out: Path) -> dict:
            examples, _, info = self.pseudo_examples(n, 0, out / "pseudo_queries.tsv")
            with (out / "examples.pkl").open("wb") as f:
                pickle.dump(examples, f)
            return info

        return self.stage(f"pseudo-{n}", self.pseudo_key(n), run)

    def load_mined(self) -> dict:
        with (self.work / "mine" / "examples.pkl").open("rb") as f:
            return pickle.load(f)

    def distill_key(self, kind: str) -> str:
        if kind == "asymmetric":
            return self.key("distill", kind, self.mine_key(), self.cfg.section_hash("asymmetric", "label_free"))
        tcfg = self.cfg.train[kind]
        parts = [train_recipe_key(tcfg)]
        if tcfg.pseudo_queries:
            parts.append(self.pseudo_key(tcfg.pseudo_queries))
        return self.key("distill", kind, self.mine_key(), *parts)

    def distill(self, kind: str) -> StageRecord:
        if kind == "asymmetric":
            return self.stage("distill-asymmetric", self.distill_key(kind), self.distill_asymmetric)

        def run(out: Path) -> dict:
            from index_build.sampling import cluster_queries
            from index_build.students import new_student, set_seed
            from index_build.train import train
            from models.sources import resolve_model

            mined = self.load_mined()
            tcfg = self.cfg.train[kind]
            examples = list(mined["examples"])
            if tcfg.pseudo_queries and not self.label_free:
                self.pseudo(tcfg.pseudo_queries)
                with (self.work / f"pseudo-{tcfg.pseudo_queries}" / "examples.pkl").open("rb") as f:
                    examples += pickle.load(f)
            s = self.cfg.students
            overrides: dict[str, Any] = {"max_query_len": s.max_query_len, "max_doc_len": s.max_doc_len}
            if kind == "colbert":
                overrides.update(dim=s.colbert_dim, colbert_query_len=s.colbert_query_len)
            set_seed(tcfg.seed)  # the new head's init (ColBERT projection, classifier) is seeded too
            student = new_student(kind, resolve_model(s.base), **overrides)
            init: dict[str, Any] = {}
            if kind == "colbert" and tcfg.proj_init == "pca":
                from index_build.config import PROJ_INIT_DOCS
                from index_build.students import ColbertStudent

                assert isinstance(student, ColbertStudent)
                sample = random.Random(tcfg.seed).sample(self.corpus_texts, min(PROJ_INIT_DOCS, len(self.corpus_texts)))
                init = {"proj_init": "pca", "proj_variance_kept": round(student.init_projection_pca(sample), 4)}
            clusters = None
            if tcfg.tas_balanced:
                emb = self.base_dense.encode_queries([e.query for e in examples])
                clusters = cluster_queries(emb, tcfg.tas_clusters, seed=tcfg.seed)
            retrieval = tcfg.dev_retrieval and kind == "dense"
            dev_eval = self.dev_evaluator(mined["dev"], retrieval=retrieval)
            initial = ((lambda: self.base_dense_dev_score(mined["dev"], student, retrieval))
                       if kind == "dense" else None)
            res = train(student, examples, self.corpus_texts, tcfg, self.work / f"train-{kind}",
                        dev_eval=dev_eval, clusters=clusters, progress=self.progress, initial_dev=initial)
            shutil.copytree(self.work / f"train-{kind}" / "best", out / "student")
            return {**init, "steps": res.steps, "examples": len(examples), "best_dev_nDCG@10": round(res.best_dev, 4),
                    "dev_history": res.dev_history, "train_seconds": round(res.seconds, 1),
                    "final_loss": float(np.mean(res.loss_history[-20:])) if res.loss_history else None}

        rec = self.stage(f"distill-{kind}", self.distill_key(kind), run)
        n_pseudo = self.cfg.train[kind].pseudo_queries
        if n_pseudo and not self.label_free and f"pseudo-{n_pseudo}" not in self.records:
            # its time belongs to the build's record also when the distill stage was up to date
            self.up_to_date(f"pseudo-{n_pseudo}", self.pseudo_key(n_pseudo))
        return rec

    def base_dense_dev_score(self, dev: dict, student, retrieval: bool = True) -> float | None:
        """Dev nDCG@10 of an untrained dense ``student`` (full-corpus search, or with
        ``retrieval`` False reranking each dev query's pool) from the base model's cached
        corpus encodings (the mining stage's), which score like it when checkpoint, lengths,
        pooling and similarity agree (in fp32: the training loop evaluates at its training
        precision); None when they do not (then it is encoded anew)."""
        from models.sources import resolve_model

        base = self.base_dense.encoder.config
        same = Path(student.checkpoint) == resolve_model(self.cfg.students.base) and all(
            getattr(base, f) == getattr(student.config, f)
            for f in ("max_query_len", "max_doc_len", "pooling", "similarity", "dim"))
        if not same or not dev["qids"]:
            return None
        if not retrieval:
            return self.pool_dev_score(dev, self.base_dense.encode_queries(dev["queries"]),
                                       self.base_dense.doc_embeddings)
        s, i = self.base_dense.retrieve(dev["queries"], 100)
        return metrics(self.dev_qrels(dev), run_from_arrays(dev["qids"], self.collection.doc_ids, s, i))["nDCG@10"]

    # ----------------------------------------------------------------- asymmetric student
    @cached_property
    def teacher_space(self):
        """The document space of the teacher's bi-encoder members
        (:class:`index_build.asymmetric.TeacherSpace`): the asymmetric student's target, and
        the vectors the artifact's dense index holds when it serves that student."""
        from index_build.asymmetric import TeacherSpace
        from index_build.config import ConfigError
        from index_build.teachers import BiEncoderTeacher

        members = [m for m in self.teacher.members if isinstance(m, BiEncoderTeacher)]
        if not members:
            raise ConfigError("students.kinds includes 'asymmetric', whose document space is the teacher's "
                              "bi-encoder members, but teacher.members has none")
        return TeacherSpace(members)

    @property
    def served_dense(self) -> str:
        """The dense model the artifact serves (and the first stage that the hybrid, the
        rerank weights and the served default are tuned on): the asymmetric student when the
        build distills one, else the full-tower dense student."""
        return "asymmetric" if "asymmetric" in self.cfg.students.kinds else "dense"

    def asymmetric_training_texts(self, dev: dict) -> tuple[list[str], dict[str, Any]]:
        """The asymmetric student's training queries: the mined training queries (labelled,
        or the label-free pseudo-queries) plus, ``asymmetric.pseudo_per_doc`` > 0, pseudo-queries
        from every document (titles, sentences, key-phrases); never a dev or test query."""
        from index_build.pseudo_queries import KeyphraseGenerator, SentenceGenerator, TitleGenerator, filter_queries

        a = self.cfg.asymmetric
        mined = [e.query for e in self.load_mined()["examples"]]
        pseudo: list[str] = []
        stats: dict[str, Any] = {}
        if a.pseudo_per_doc > 0:
            docs = self.collection.docs
            generated = [q for g in (TitleGenerator(), SentenceGenerator(per_doc=2), KeyphraseGenerator())
                         for q in g.generate(docs)]
            kept, stats = filter_queries(generated, docs, per_doc=a.pseudo_per_doc)
            pseudo = [q.text for q in kept]
        held_out = set(dev["queries"])
        if self.cfg.data.test_split in self.collection.qrels:
            held_out |= set(self.collection.split_queries(self.cfg.data.test_split).values())
        texts = [t for t in dict.fromkeys(mined + pseudo) if t not in held_out]
        random.Random(a.seed).shuffle(texts)
        if a.max_queries:
            texts = texts[: a.max_queries]
        return texts, {"queries": len(texts), "mined": len(set(mined)), "pseudo": len(set(pseudo)),
                       "pseudo_filters": stats}

    def distill_asymmetric(self, out: Path) -> dict:
        """Distill the asymmetric student (:mod:`index_build.asymmetric`): alignment to the
        teacher's query vectors plus listwise KL to the full teacher over each training
        query's candidates; the checkpoint that retrieves the dev slice best is kept."""
        from index_build.asymmetric import candidate_union, encode_queries, init_maps_by_ridge, train_asymmetric
        from index_build.students import new_asymmetric_student, set_seed
        from index_build.teachers import BM25Teacher, cached_teacher_scores
        from models.sources import resolve_model

        a, space = self.cfg.asymmetric, self.teacher_space
        dev = self.load_mined()["dev"]
        texts, about = self.asymmetric_training_texts(dev)
        log.info("asymmetric student: %d training queries (%d mined, %d pseudo), %d dev; teacher space %s, dims %s",
                 len(texts), about["mined"], about["pseudo"], len(dev["qids"]), space.names, space.dims)
        doc_parts = space.doc_parts()
        docs = np.hstack(doc_parts)
        q_parts = space.query_parts(texts)
        with_bm25 = any(isinstance(m, BM25Teacher) for m in self.teacher.members)
        pools = candidate_union(q_parts, doc_parts, self.bm25 if with_bm25 else None, texts, a.pool_depth)
        t_scores = cached_teacher_scores(self.teacher, self.cache, texts, pools, progress=self.progress)
        set_seed(a.seed)
        student = new_asymmetric_student(resolve_model(self.cfg.students.base), space.names, space.dims,
                                         max_query_len=self.cfg.students.max_query_len)
        init_maps_by_ridge(student, texts, q_parts)
        dev_eval = None
        if dev["qids"]:
            qrels = self.dev_qrels(dev)

            def dev_eval(model) -> float:
                s, i = exact_topk(docs, encode_queries(model, dev["queries"]), 100)
                run = run_from_arrays(dev["qids"], self.collection.doc_ids, s, i)
                return round(float(per_query_ndcg(qrels, run, dev["qids"]).mean()), 4)

        history: list[dict[str, Any]] = []
        res = train_asymmetric(student, texts, np.hstack(q_parts), pools, t_scores, docs, a, dev_eval, history,
                               progress=self.progress)
        student.save(out / "student")
        return {**about, **res, "space": {"members": space.names, "dims": space.dims},
                "mean_pool": float(np.mean([len(p) for p in pools])) if pools else 0.0, "dev_history": history}

    def pool_dev_score(self, dev: dict, queries: np.ndarray, doc_embeddings: np.ndarray) -> float:
        """Dev nDCG@10 of a dense model reranking each dev query's pool, from its query vectors
        and its (cached) corpus vectors: what :meth:`dev_evaluator` measures, without encoding
        the pools again."""
        doc_ids = self.collection.doc_ids
        run = {}
        for qid, q, pool in zip(dev["qids"], queries, dev["pools"]):
            pool = np.asarray(pool, dtype=np.int64)
            run[qid] = {doc_ids[int(d)]: float(v) for d, v in zip(pool, doc_embeddings[pool] @ q)}
        return metrics(self.dev_qrels(dev), run)["nDCG@10"]

    def dev_qrels(self, dev: dict) -> dict[str, dict[str, int]]:
        """Judgments of the dev slice: its pseudo-qrels (label-free) or the held-out train qrels."""
        train_qrels = self.collection.qrels.get(self.cfg.data.train_split, {})
        return dev.get("qrels") or {q: train_qrels[q] for q in dev["qids"]}

    def dev_evaluator(self, dev: dict, retrieval: bool = False) -> Callable | None:
        """nDCG@10 on the dev slice: reranking each dev query's candidate pool, or (dense,
        ``retrieval``) exact search over the whole corpus encoded by the student being trained."""
        if not dev["qids"]:
            return None
        qrels = self.dev_qrels(dev)
        doc_ids = self.collection.doc_ids

        def evaluate_retrieval(student) -> float:
            from tqdm import tqdm

            from models.encoders import length_sorted_batches

            texts = self.corpus_texts
            emb = np.zeros((len(texts), student.config.dim), np.float32)
            lengths = student.tokenizer.token_lengths(texts)
            for idx in tqdm(list(length_sorted_batches(lengths, 64)), desc="dev corpus encode", leave=False,
                            disable=not self.progress):
                emb[idx] = student.encode_docs([texts[i] for i in idx]).cpu().numpy()
            q = student.encode_queries(dev["queries"]).cpu().numpy()
            s, i = exact_topk(emb, q, 100)
            return metrics(qrels, run_from_arrays(dev["qids"], doc_ids, s, i))["nDCG@10"]

        def evaluate(student) -> float:
            from index_build.train import pool_scores

            scores = pool_scores(student, dev["queries"], dev["pools"], self.corpus_texts, progress=self.progress)
            run = {qid: {doc_ids[int(d)]: float(v) for d, v in zip(pool, sc)}
                   for qid, pool, sc in zip(dev["qids"], dev["pools"], scores)}
            return metrics(qrels, run)["nDCG@10"]

        return evaluate_retrieval if retrieval else evaluate

    def wise_ft(self, kind: str) -> float:
        """The WiSE-FT weight of the distilled model against the base for ``kind``."""
        if kind == "asymmetric":  # its maps have no counterpart in the base model to interpolate with
            return 1.0
        value = self.cfg.train[kind].wise_ft  # range checked by load_config
        if value is None:
            value = LABEL_FREE_WISE_FT if (self.label_free and kind == "dense") else 1.0
        return float(value)

    def export_key(self, kind: str, onnx_file: str | None = None) -> str:
        """The export stage's key; with ``onnx_file``, the key of that one graph (the fp32
        graph's does not depend on how the int8 one is quantized, so its caches outlive a change)."""
        extra = [f"wise_ft={self.wise_ft(kind)}"]
        if self.cfg.export_int8 and onnx_file != ONNX_NAME:  # the fp32 graph's key leaves int8 settings out
            extra += [f"per_channel={self.cfg.export_int8_per_channel}", f"outliers-fp32-{OUTLIER_RATIO:g}",
                      INT8_WEIGHTS_MARK, f"activations={self.cfg.export_int8_activations}"]
        return self.key("export", kind, self.distill_key(kind), f"int8={self.cfg.export_int8}", *extra)

    def export(self, kind: str) -> StageRecord:
        def run(out: Path) -> dict:
            from index_build.export import export_student
            from index_build.students import interpolate_with_base, load_student
            from models.sources import resolve_model

            step = max(1, len(self.corpus_texts) // 8)
            texts = [self.corpus_texts[i] for i in range(0, len(self.corpus_texts), step)][:8]
            src = self.work / f"distill-{kind}" / "student"
            alpha = self.wise_ft(kind)
            record: dict[str, Any] = {}
            with tempfile.TemporaryDirectory(dir=out) as tmp:
                if alpha != 1.0:
                    student = interpolate_with_base(load_student(src), resolve_model(self.cfg.students.base), alpha)
                    student.save(Path(tmp))
                    src = Path(tmp)
                rep = export_student(src, out / "onnx", int8=self.cfg.export_int8, parity_texts=texts,
                                     per_channel=self.cfg.export_int8_per_channel,
                                     int8_activations=self.cfg.export_int8_activations)
                if alpha != 1.0:
                    record = self.exported_dev_score(kind, student)
            return {"parity_max_abs_diff": rep.max_abs_diff, "int8_max_abs_diff": rep.int8_max_abs_diff,
                    "int8_fp32_nodes": rep.int8_fp32_nodes,
                    "wise_ft": alpha, **record}

        return self.stage(f"export-{kind}", self.export_key(kind), run)

    def exported_dev_score(self, kind: str, student) -> dict[str, float]:
        """The dev-slice nDCG@10 of a WiSE-FT-interpolated, just exported student, measured like
        the training loop's model selection (so it compares with the distill stage's
        ``dev_history``). A dense student is scored through the exported graph, whose corpus
        encodings are cached for the evaluate and artifact stages (so this costs no extra pass)."""
        import torch

        tcfg = self.cfg.train[kind]
        dev = self.load_mined()["dev"]
        if not dev["qids"]:
            return {}
        if kind == "dense" and tcfg.dev_retrieval:
            return {"dev_nDCG@10": round(self.dense_metrics(dev["qids"], dev["queries"], self.dev_qrels(dev))
                                         ["nDCG@10"], 4)}
        if kind == "dense":  # the pools reranked with the exported graph's corpus encodings
            from models.encoders import DenseEncoder

            q = DenseEncoder(self.onnx_dir("dense"), threads=self.cfg.threads).encode_queries(dev["queries"])
            return {"dev_nDCG@10": round(self.pool_dev_score(dev, q, self.dense_corpus()), 4)}
        dev_eval = self.dev_evaluator(dev)
        assert dev_eval is not None
        student.eval()
        with torch.inference_mode():
            return {"dev_nDCG@10": round(float(dev_eval(student)), 4)}

    def dense_metrics(self, qids: list[str], queries: list[str], qrels, depth: int = 100) -> dict[str, float]:
        """Exact full-corpus search with the exported dense graph (corpus encodings cached)."""
        from models.encoders import DenseEncoder

        q = DenseEncoder(self.onnx_dir("dense"), threads=self.cfg.threads).encode_queries(queries)
        s, i = exact_topk(self.dense_corpus(), q, depth)
        return metrics(qrels, run_from_arrays(qids, self.collection.doc_ids, s, i))

    def onnx_dir(self, kind: str) -> Path:
        return self.work / f"export-{kind}" / "onnx"

    # ----------------------------------------------------------------- encoders used by evaluation
    def corpus_vectors(self, kind: str | None = None) -> np.ndarray:
        """The document vectors dense model ``kind`` (default :attr:`served_dense`) searches:
        the full-tower student's own corpus encodings, or for the asymmetric student the
        teacher members' (cached) document vectors."""
        kind = kind or self.served_dense
        return self.teacher_space.doc_vectors() if kind == "asymmetric" else self.dense_corpus()

    def dense_queries(self, texts: list[str], kind: str | None = None, onnx_file: str = ONNX_NAME) -> np.ndarray:
        """Query vectors of dense model ``kind`` (default :attr:`served_dense`) from its exported graph."""
        from models.encoders import DenseEncoder

        enc = DenseEncoder(self.onnx_dir(kind or self.served_dense), onnx_file=onnx_file, threads=self.cfg.threads)
        return np.ascontiguousarray(enc.encode_queries(texts), dtype=np.float32)

    def dense_corpus(self, onnx_file: str = ONNX_NAME) -> np.ndarray:
        from index_build.teachers import encode_corpus_cached
        from models.encoders import DenseEncoder

        enc = DenseEncoder(self.onnx_dir("dense"), onnx_file=onnx_file, threads=self.cfg.threads)
        fp = self.content_fp("dense-corpus", self.export_key("dense", onnx_file), onnx_file)
        return encode_corpus_cached(enc, self.corpus_texts, self.cache, fp, progress=self.progress)

    def colbert_corpus(self, onnx_file: str = ONNX_NAME, subset: np.ndarray | None = None) -> dict[int, np.ndarray]:
        from models.encoders import ColbertEncoder

        enc = ColbertEncoder(self.onnx_dir("colbert"), onnx_file=onnx_file, threads=self.cfg.threads)
        fp = self.content_fp("colbert-corpus", self.export_key("colbert", onnx_file), onnx_file)
        idx = np.arange(len(self.corpus_texts)) if subset is None else np.unique(subset)
        keys = [content_key(fp, self.corpus_texts[i]) for i in idx]
        found = self.cache.get_many(keys)
        todo = [int(i) for i, k in zip(idx, keys) if k not in found]
        for start in range(0, len(todo), 1024):
            part = todo[start : start + 1024]
            vecs = enc.encode_docs([self.corpus_texts[i] for i in part], progress=self.progress)
            new = [(content_key(fp, self.corpus_texts[i]), v) for i, v in zip(part, vecs)]
            self.cache.put_many(new)
            found.update(new)
        return {int(i): found[k] for i, k in zip(idx, keys)}

    # ----------------------------------------------------------------- evaluation
    def evaluate_key(self) -> str:
        # where results go and what they are called do not change what is evaluated
        ev = _hash_without(self.cfg, "evaluate", "results_dir", "name")
        return self.key("evaluate", ev, *[self.export_key(k) for k in self.cfg.students.kinds])

    def evaluate(self) -> StageRecord:
        def run(out: Path) -> dict:
            if self.cfg.evaluate.mode == "rerank":  # a TREC DL pool: rerank its BM25 run
                collection_result = self.evaluate_trec(Path(self.cfg.data.path))
            else:
                collection_result = self.evaluate_collection()
            trec = {}
            for path in self.cfg.evaluate.trec_dl:
                if Path(path).is_dir():
                    trec[Path(path).name] = self.evaluate_trec(Path(path))
                else:
                    log.warning("TREC DL folder %s not found: skipped", path)
            (out / "eval.json").write_text(json.dumps({"collection": collection_result, "trec": trec}, indent=2))
            result = {"collection": collection_result, "trec": trec}
            if self.trec_weights:  # dev-slice weights of a pool's own students (recorded with the stage)
                result["weights"] = self.trec_weights
            return result

        return self.stage("evaluate", self.evaluate_key(), run)

    def evaluate_collection(self) -> dict[str, dict[str, float]]:
        """Every system on the test split: first stages over the whole corpus (the full-tower
        dense student's rows ``dense``, ``hybrid``, ...; the asymmetric student's ``asym-*``),
        rerankers on the served dense model's top-``rerank_depth``, and ``served-default``:
        the row of the mode the artifact serves by default (:meth:`choose_default`)."""
        from index_build.export import INT8_NAME
        from index_build.teachers import cached_teacher_scores

        col, depth = self.collection, self.cfg.evaluate.rerank_depth
        split = self.cfg.data.test_split
        if split not in col.qrels:
            log.warning("no %r judgments in %s: nothing to evaluate on this corpus", split, self.cfg.data.path)
            return {}
        tq = col.split_queries(split)
        qids, texts = list(tq), list(tq.values())
        qrels, doc_ids = col.qrels[split], col.doc_ids
        systems: dict[str, dict[str, float]] = {}
        bm_s, bm_i = self.bm25.search(texts, depth)
        systems["bm25"] = metrics(qrels, run_from_arrays(qids, doc_ids, bm_s, bm_i))
        base_s, base_i = self.base_dense.retrieve(texts, depth)
        systems["base-dense"] = metrics(qrels, run_from_arrays(qids, doc_ids, base_s, base_i))
        pools, _ = self.candidate_pools(texts, self.cfg.teacher.pool_depth)
        t_scores = cached_teacher_scores(self.teacher, self.cache, texts, pools, progress=self.progress)
        systems["teacher"] = metrics(qrels, {q: {doc_ids[int(d)]: float(s) for d, s in zip(p, ts)}
                                              for q, p, ts in zip(qids, pools, t_scores)})
        kinds = self.cfg.students.kinds
        served = self.served_dense
        if served not in kinds:
            return systems
        int8_corpus = self.cfg.export_int8 and self.cfg.evaluate.int8_corpus
        firsts: dict[str, list[Ranked]] = {}
        q8_lists: list[Ranked] = []
        for kind in ("dense", "asymmetric"):
            if kind not in kinds:
                continue
            prefix = DENSE_ROW_PREFIX[kind]
            # hybrid first stage: z-score fusion with BM25's top-depth, weight tuned on the dev slice
            hw = self.tune_hybrid(depth, kind)["dense_weight"]
            lists = self.first_stage_lists(texts, self.dense_queries(texts, kind), hw, depth, kind)
            systems[f"{prefix}dense"] = metrics(qrels, self.run_of(qids, lists["dense"]))
            systems[f"{prefix}hybrid"] = metrics(qrels, self.run_of(qids, lists["hybrid"]))
            if self.cfg.export_int8:
                q8 = self.dense_queries(texts, kind, INT8_NAME)
                if int8_corpus and kind == "dense":
                    s8, i8 = exact_topk(self.dense_corpus(INT8_NAME), q8, depth)
                    systems["dense-int8"] = metrics(qrels, run_from_arrays(qids, doc_ids, s8, i8))
                # what the service serves with NRS_USE_INT8: int8 query encoder, fp32 document vectors
                q8_s, q8_i = exact_topk(self.corpus_vectors(kind), q8, depth)
                systems[f"{prefix}dense-int8-query"] = metrics(qrels, run_from_arrays(qids, doc_ids, q8_s, q8_i))
                if kind == served:
                    q8_lists = [Ranked(i[i >= 0], s[i >= 0]) for s, i in zip(q8_s, q8_i)]
            if kind == served:
                firsts = lists
        hybrid_weight = self.tune_hybrid(depth)["dense_weight"]
        if "colbert" in kinds:
            # ColBERT reranks, its scores interpolated with the first stage's (weights tuned on the dev slice)
            weights = self.tune_rerank_weights("colbert", hybrid_weight, depth)["weights"]
            for f in [ONNX_NAME] + ([INT8_NAME] if int8_corpus else []):
                cb = self.colbert_scores(texts, firsts["dense"], f)
                systems["dense+colbert" + ("-int8" if f == INT8_NAME else "")] = metrics(
                    qrels, self.run_of(qids, firsts["dense"], cb, weights["dense"]))
                if f == ONNX_NAME:
                    systems["dense+colbert-maxsim"] = metrics(qrels, self.run_of(qids, firsts["dense"], cb, 1.0))
            if q8_lists:  # as served with NRS_USE_INT8: int8 query encoders, fp32-encoded corpus
                cb = self.colbert_scores(texts, q8_lists, query_onnx_file=INT8_NAME)
                systems["dense+colbert-int8-query"] = metrics(qrels, self.run_of(qids, q8_lists, cb, weights["dense"]))
            cb = self.colbert_scores(texts, firsts["hybrid"])
            systems["hybrid+colbert"] = metrics(qrels, self.run_of(qids, firsts["hybrid"], cb, weights["hybrid"]))
            systems["hybrid+colbert-maxsim"] = metrics(qrels, self.run_of(qids, firsts["hybrid"], cb, 1.0))
        if "cross-encoder" in kinds:
            # the cross-encoder reranks the dense top-depth, its scores interpolated with the served
            # dense model's (weight tuned on the dev slice); "-plain": its scores alone
            ce_weight = self.tune_rerank_weights("cross-encoder", hybrid_weight, depth)["weights"]["dense"]
            cand_texts = [[self.corpus_texts[int(j)] for j in c] for c, _ in firsts["dense"]]
            scores = self.cross_encoder_scores(texts, cand_texts)
            systems["dense+cross-encoder"] = metrics(qrels, self.run_of(qids, firsts["dense"], scores, ce_weight))
            systems["dense+cross-encoder-plain"] = metrics(qrels, self.run_of(qids, firsts["dense"], scores, 1.0))
            if self.cfg.export_int8:  # as served with NRS_USE_INT8 and the cross-encoder among NRS_INT8_MODELS
                scores8 = self.cross_encoder_scores(texts, cand_texts, onnx_file=INT8_NAME)
                systems["dense+cross-encoder-int8"] = metrics(
                    qrels, self.run_of(qids, firsts["dense"], scores8, ce_weight))
        row = self.mode_row(self.choose_default())
        if row in systems:
            systems["served-default"] = dict(systems[row])
        return systems

    def mode_row(self, mode: Mapping[str, str]) -> str:
        """The results row that measures served mode ``{"first_stage", "rerank"}``."""
        prefix = DENSE_ROW_PREFIX[self.served_dense]
        stage, rerank = mode["first_stage"], mode["rerank"]
        if rerank == "none":
            return "bm25" if stage == "sparse" else f"{prefix}{stage}"
        return f"{stage}+{rerank}"

    def choose_default(self, depth: int = 100) -> dict[str, Any]:
        """The mode ``/search`` serves when a request names none: among the cheap modes (every
        first stage, alone or reranked by ColBERT; the cross-encoder costs seconds a query on
        CPU and is never a default), the hybrid first stage alone (the served dense model
        where there is no BM25) unless another mode beats it on the dev slice by more than one
        standard error (:func:`index_build.evaluate.one_se_choice`), then the best of those.
        Never on test judgments. Computed once per pipeline and exported models."""
        memo = (depth, *[self.export_key(k) for k in self.cfg.students.kinds])
        if memo not in self._default_choice:
            self._default_choice[memo] = self._choose_default(depth)
        return self._default_choice[memo]

    def _choose_default(self, depth: int) -> dict[str, Any]:
        kinds = self.cfg.students.kinds
        prior = ("hybrid", "none")
        dev = self.load_mined()["dev"]
        if not dev["qids"]:
            return {"first_stage": prior[0], "rerank": prior[1], "chosen_on": "default (no dev queries)"}
        qrels, qids = self.dev_qrels(dev), dev["qids"]
        hybrid_weight = self.tune_hybrid(depth)["dense_weight"]
        firsts = self.first_stage_lists(dev["queries"], self.dense_queries(dev["queries"]), hybrid_weight, depth)
        per_mode = {(stage, "none"): per_query_ndcg(qrels, self.run_of(qids, firsts[stage]), qids)
                    for stage in FIRST_STAGES}
        if "colbert" in kinds:
            weights = self.tune_rerank_weights("colbert", hybrid_weight, depth)["weights"]
            reranked = {stage: firsts[stage] for stage in ("dense", "hybrid")}
            scores = self.rerank_scores("colbert", dev["queries"], reranked)
            for stage, lists in reranked.items():
                per_mode[(stage, "colbert")] = per_query_ndcg(
                    qrels, self.run_of(qids, lists, scores[stage], weights[stage]), qids)
        stage, rerank = one_se_choice(per_mode, prior, lambda m, p: float(m != p))
        return {"first_stage": stage, "rerank": rerank,
                "chosen_on": "pseudo-query dev slice" if self.label_free else "train dev slice",
                "selection": "one-standard-error rule toward hybrid without rerank",
                "dev_nDCG@10": {f"{s}+{r}": round(float(v.mean()), 4) for (s, r), v in per_mode.items()}}

    def cross_encoder_scores(self, queries: list[str], candidate_texts: list[list[str]],
                             onnx_file: str = ONNX_NAME) -> list[np.ndarray]:
        """The cross-encoder student's score (its ONNX graph ``onnx_file``) of each query's
        candidate texts, cached per query by content (model, query, texts): the slowest part
        of evaluation is computed once per model."""
        from tqdm import tqdm

        from models.encoders import CrossEncoderScorer

        fp = self.content_fp("cross-encoder-scores", self.export_key("cross-encoder", onnx_file),
                      *([onnx_file] if onnx_file != ONNX_NAME else []))
        keys = [content_key(fp, q, *texts) for q, texts in zip(queries, candidate_texts)]
        found = self.cache.get_many(keys)
        todo = [i for i, k in enumerate(keys) if k not in found]
        if todo:
            ce = CrossEncoderScorer(self.onnx_dir("cross-encoder"), onnx_file=onnx_file, threads=self.cfg.threads)
            for i in tqdm(todo, desc=f"cross-encoder rerank ({onnx_file})", unit="query", disable=not self.progress):
                item = (keys[i], np.asarray(ce.score(queries[i], candidate_texts[i]), dtype=np.float32))
                self.cache.put_many([item])  # per query: an interrupted evaluation keeps what it scored
                found[item[0]] = item[1]
        return [found[k] for k in keys]

    def colbert_scores(self, texts: list[str], lists: Sequence[tuple[np.ndarray, np.ndarray]],
                       onnx_file: str = ONNX_NAME, query_onnx_file: str | None = None) -> list[np.ndarray]:
        """MaxSim of the ColBERT student over each query's candidates (``lists`` as from
        :meth:`first_stage_lists`): the corpus encoded with ``onnx_file``, the queries with
        ``query_onnx_file`` (default: the same)."""
        from models.encoders import ColbertEncoder, maxsim

        enc = ColbertEncoder(self.onnx_dir("colbert"), onnx_file=query_onnx_file or onnx_file,
                             threads=self.cfg.threads)
        toks = self.colbert_corpus(onnx_file, subset=np.concatenate([c for c, _ in lists] + [np.zeros(0, np.int64)]))
        qv = enc.encode_queries(texts)
        out = []
        for r, (cands, _) in enumerate(lists):
            offsets = np.cumsum([0] + [len(toks[int(j)]) for j in cands])
            tokens = np.concatenate([toks[int(j)] for j in cands]) if len(cands) else np.zeros((0, enc.dim), np.float32)
            out.append(maxsim(qv[r], tokens, offsets))
        return out

    def first_stage_lists(self, texts: list[str], dense_queries: np.ndarray, hybrid_weight: float,
                          depth: int, kind: str | None = None) -> dict[str, list[Ranked]]:
        """Per first stage (``dense``: exact search over dense model ``kind``'s corpus vectors,
        default :attr:`served_dense`; ``sparse``: BM25; ``hybrid``: their z-score fusion), each
        query's top-``depth``, ranked by the service's own first stages
        (:func:`models.retrieval.first_stages`)."""
        corpus = self.corpus_vectors(kind)
        return first_stages(FIRST_STAGES, texts, depth, dense_vectors=dense_queries,
                            dense_search=lambda q, k: exact_topk(corpus, q, k), sparse=self.bm25,
                            hybrid_weights=(hybrid_weight, 1.0 - hybrid_weight))

    def run_of(self, qids: list[str], lists: Sequence[tuple[np.ndarray, np.ndarray]],
               rerank: list[np.ndarray] | None = None, rerank_weight: float = 1.0) -> dict[str, dict[str, float]]:
        """A run from first-stage lists, optionally reranked as the service reranks
        (:func:`models.retrieval.rerank_order`)."""
        doc_ids = self.collection.doc_ids
        run = {}
        for r, qid in enumerate(qids):
            cands, first = lists[r]
            final = first if rerank is None else rerank_order(first, rerank[r], rerank_weight)[0]
            run[qid] = {doc_ids[int(j)]: float(x) for j, x in zip(cands, final)}
        return run

    def evaluate_trec(self, path: Path) -> dict[str, dict[str, float]]:
        """Rerank the BM25 run's top-100 of a TREC DL pool with every scoring model."""
        from index_build.data import load_trec_run
        from index_build.export import INT8_NAME, base_dense_onnx
        from index_build.teachers import build_teacher, cached_teacher_scores
        from models.encoders import ColbertEncoder, DenseEncoder, maxsim

        col = load_collection(path, unknown_docs="keep")
        split = next(iter(col.qrels))
        qrels = col.qrels[split]
        run_in = load_trec_run(path / "runs" / "BM25.trec", depth=self.cfg.evaluate.rerank_depth)
        qids = [q for q in col.queries if q in qrels and q in run_in]
        texts = [col.queries[q] for q in qids]
        cands = [[d for d, _ in run_in[q]] for q in qids]
        docs = {d.id: d.full_text for d in col.docs}
        systems: dict[str, dict[str, float]] = {}

        def score_all(fn) -> dict[str, dict[str, float]]:
            run = {}
            for qid, q, cs in zip(qids, texts, cands):
                run[qid] = dict(zip(cs, map(float, fn(q, cs))))
            return run

        systems["bm25"] = metrics(qrels, {q: dict(run_in[q]) for q in qids}, min_rel=2)

        def dense_fn(enc: DenseEncoder):
            def fn(q: str, cs: list[str]) -> np.ndarray:
                return enc.encode_docs([docs[c] for c in cs]) @ enc.encode_queries([q])[0]
            return fn

        base = DenseEncoder(base_dense_onnx(self.cfg.students.base, max_doc_len=self.cfg.students.max_doc_len)[0],
                            threads=self.cfg.threads)
        base_run = score_all(dense_fn(base))
        systems["base-dense"] = metrics(qrels, base_run, min_rel=2)
        # teacher: the configured ensemble (members z-scored per query), BM25 statistics over this pool's corpus
        teacher = build_teacher(self.teacher_spec(), col.doc_texts(), col.checksum(), self.cache,
                                threads=self.cfg.threads)
        t_scores = cached_teacher_scores(teacher, self.cache, texts,
                                         [np.array([col.doc_index[c] for c in cs], np.int64) for cs in cands],
                                         progress=self.progress)
        teacher_run = {qid: dict(zip(cs, map(float, ts))) for qid, cs, ts in zip(qids, cands, t_scores)}
        systems["teacher"] = metrics(qrels, teacher_run, min_rel=2)
        kinds = self.cfg.students.kinds
        # students trained on this pool (a label-free build): the first stages and the ColBERT
        # interpolation are evaluated as the service serves them, weights from the dev slice
        own_pool = self.cfg.evaluate.mode == "rerank" and Path(self.cfg.data.path).resolve() == path.resolve()
        # Rerankers are evaluated as the service serves them after the dense first stage: their
        # scores interpolated with the dense student's (on this pool's BM25 candidates), at the
        # weights chosen on the build's dev slice, the artifact's; never on these judgments.
        firsts: dict[str, dict[str, dict[str, float]]] = {}  # the served dense model's first stages
        hw, record = 1.0, {}
        served = self.served_dense
        for kind in ("dense", "asymmetric"):
            if kind not in kinds:
                continue
            prefix = DENSE_ROW_PREFIX[kind]
            if kind == "asymmetric":  # the student's queries against the teacher members' document vectors
                from index_build.asymmetric import TeacherSpace
                from index_build.teachers import BiEncoderTeacher, EnsembleTeacher

                assert isinstance(teacher, EnsembleTeacher)
                space = TeacherSpace([m for m in teacher.members if isinstance(m, BiEncoderTeacher)])
                asym = DenseEncoder(self.onnx_dir(kind), threads=self.cfg.threads)

                def asym_fn(q: str, cs: list[str], enc: DenseEncoder = asym, space=space) -> np.ndarray:
                    idx = np.array([col.doc_index[c] for c in cs], np.int64)
                    return np.hstack([m.embeddings(idx) for m in space.members]) @ enc.encode_queries([q])[0]

                dense_run = score_all(asym_fn)
            else:
                dense_run = score_all(dense_fn(DenseEncoder(self.onnx_dir(kind), threads=self.cfg.threads)))
                if self.cfg.export_int8:
                    enc8 = DenseEncoder(self.onnx_dir(kind), onnx_file=INT8_NAME, threads=self.cfg.threads)
                    systems["dense-int8"] = metrics(qrels, score_all(dense_fn(enc8)), min_rel=2)
            systems[f"{prefix}dense"] = metrics(qrels, dense_run, min_rel=2)
            kind_hw = self.tune_hybrid(kind=kind)["dense_weight"]
            if kind == served:
                firsts["dense"], hw = dense_run, kind_hw
                record = self.trec_weights[path.name] = {"hybrid_dense_weight": hw}
            if own_pool:
                hybrid_run = {}
                for qid, cs in zip(qids, cands):  # the service's hybrid over this pool's candidates
                    bm25, pool = dict(run_in[qid]), np.arange(len(cs))
                    fused = fuse_hybrid(Ranked(pool, np.array([dense_run[qid][c] for c in cs])),
                                        Ranked(pool, np.array([bm25[c] for c in cs])), (kind_hw, 1 - kind_hw),
                                        len(cs))
                    hybrid_run[qid] = {cs[int(j)]: float(x) for j, x in zip(*fused)}
                systems[f"{prefix}hybrid"] = metrics(qrels, hybrid_run, min_rel=2)
                if kind == served:
                    firsts["hybrid"] = hybrid_run
        if "colbert" in kinds:
            cb = ColbertEncoder(self.onnx_dir("colbert"))

            def colbert_fn(q: str, cs: list[str]) -> np.ndarray:
                toks = cb.encode_docs([docs[c] for c in cs])
                offsets = np.cumsum([0] + [len(t) for t in toks])
                return maxsim(cb.encode_queries([q])[0], np.concatenate(toks), offsets)

            colbert_run = score_all(colbert_fn)
            if not firsts:
                systems["dense+colbert"] = metrics(qrels, colbert_run, min_rel=2)
            else:
                # ColBERT's scores interpolated with the first stage's (models.fusion.interpolate), as
                # in full-corpus evaluation and the service; "-maxsim": plain reranking
                weights = self.tune_rerank_weights("colbert", hw)["weights"]
                record["colbert_weight"] = weights
                for stage, first_run in firsts.items():
                    systems[f"{stage}+colbert"] = metrics(
                        qrels, interpolated_run(first_run, colbert_run, weights[stage]), min_rel=2)
                systems["dense+colbert-maxsim"] = metrics(qrels, colbert_run, min_rel=2)
        if "cross-encoder" in kinds:
            scores = self.cross_encoder_scores(texts, [[docs[c] for c in cs] for cs in cands])
            ce_run = {qid: dict(zip(cs, map(float, sc))) for qid, cs, sc in zip(qids, cands, scores)}
            if "dense" in firsts:  # as served: interpolated with the dense student; "-plain": alone
                ce_weight = self.tune_rerank_weights("cross-encoder", hw)["weights"]["dense"]
                record["cross_encoder_weight"] = ce_weight
                systems["dense+cross-encoder"] = metrics(
                    qrels, interpolated_run(firsts["dense"], ce_run, ce_weight), min_rel=2)
                systems["dense+cross-encoder-plain"] = metrics(qrels, ce_run, min_rel=2)
            else:
                systems["dense+cross-encoder"] = metrics(qrels, ce_run, min_rel=2)
        row = self.mode_row(self.choose_default()) if firsts else None
        if row in systems:  # e.g. no hybrid rows on another collection's pool
            systems["served-default"] = dict(systems[row])
        return systems

    # ----------------------------------------------------------------- artifact
    def artifact_key(self) -> str:
        from models.artifacts import SCHEMA_VERSION

        return self.key("artifact", self.cfg.section_hash("index"), self.cfg.artifact_dir,
                        *[self.export_key(k) for k in self.cfg.students.kinds], f"schema-{SCHEMA_VERSION}")

    def artifact(self) -> StageRecord:
        """Encode the corpus with the ONNX students, build the indexes, write the artifact dir."""
        from index_build.package import build_artifact
        from models.artifacts import ArtifactError, verify

        key = self.artifact_key()
        final = Path(self.cfg.artifact_dir)

        def run(out: Path) -> dict:
            kinds = self.cfg.students.kinds
            served = self.served_dense
            if served not in kinds:
                raise RuntimeError("an artifact needs a dense student (students.kinds must include 'dense' "
                                   "or 'asymmetric')")
            dense = self.corpus_vectors()
            colbert = None
            if "colbert" in kinds:
                toks = self.colbert_corpus()
                colbert = [toks[i] for i in range(len(self.corpus_texts))]
            stages = {n: {"seconds": r.seconds, "peak_rss_bytes": r.peak_rss_bytes}
                      for n, r in self.records.items()}
            hybrid = self.tune_hybrid()
            interpolation: dict[str, dict[str, Any]] = {
                k: self.tune_rerank_weights(k, hybrid["dense_weight"])
                for k in ("colbert", "cross-encoder") if k in kinds}
            training: dict[str, Any] = {
                "label_free": self.label_free, "teacher": self.cfg.teacher.members,
                "students": {k: self.records[f"distill-{k}"].result for k in kinds if f"distill-{k}" in self.records},
                "wise_ft": {k: self.wise_ft(k) for k in kinds},
            }
            if self.label_free and "mine" in self.records:
                training["pseudo_queries"] = self.records["mine"].result
            dvq = self.cfg.index.distill_vq
            distill_vq = self.distill_vq_queries(dvq.queries, dvq.max_queries) if dvq.enabled else None
            build_artifact(
                final, collection=self.collection,
                # the served dense model is the artifact's "dense" model (a full-tower student
                # beside an asymmetric one is evaluated, not served)
                onnx_dirs={"dense": self.onnx_dir(served),
                           **{k: self.onnx_dir(k) for k in ("colbert", "cross-encoder") if k in kinds}},
                dense_vectors=dense, colbert_vectors=colbert, bm25=self.bm25, factory=self.cfg.index.factory,
                colbert_bits=self.cfg.index.colbert_bits, colbert_kmeans_niter=self.cfg.index.colbert_kmeans_niter,
                nprobe=self.cfg.index.nprobe,
                calibration_queries=self.calibration_queries(), hybrid=hybrid, rerank_interpolation=interpolation,
                distill_vq=dvq, distill_vq_queries=distill_vq,
                serving={"default": self.choose_default(), "dense_model": served},
                training=training,
                build={"key": key, "config": _jsonable(self.cfg), "stages": stages},
                progress=self.progress,
            )
            manifest = verify(final, deep=True)
            return {"artifact_dir": str(final), "artifact_version": manifest.artifact_version}

        rec_path = self.work / "artifact" / "stage.json"
        if rec_path.is_file() and json.loads(rec_path.read_text()).get("key") == key:
            try:
                verify(final, deep=False)
            except ArtifactError as e:
                log.warning("artifact dir %s no longer valid (%s): rebuilding", final, e)
                return self.stage("artifact", key, run, force=True)
        return self.stage("artifact", key, run)

    def training_query_texts(self) -> list[str]:
        """The training queries (pseudo-queries on a label-free build), train and dev slices,
        deduplicated and shuffled with a fixed seed; never test queries."""
        mined = self.load_mined()
        texts = list(dict.fromkeys([e.query for e in mined["examples"]] + list(mined["dev"]["queries"])))
        random.Random(0).shuffle(texts)
        return texts

    def calibration_queries(self, limit: int = 512) -> np.ndarray:
        """Dense-student vectors of up to ``limit`` training (or pseudo-) queries, for choosing
        the default ``nprobe``."""
        return self.dense_queries(self.training_query_texts()[:limit])

    def distill_vq_queries(self, source: str, limit: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Dense-student vectors of the queries that train a distilled index, and a record of
        them. ``auto``: :meth:`training_query_texts`; ``pseudo``: titles and the two most
        informative sentences of every document (no queries or labels at all)."""
        from index_build.pseudo_queries import Generator, SentenceGenerator, TitleGenerator

        if source == "pseudo":
            docs = self.collection.docs
            generators: list[Generator] = [TitleGenerator(), SentenceGenerator(per_doc=2)]
            texts = list(dict.fromkeys(p.text for g in generators for p in g.generate(docs)))
            random.Random(0).shuffle(texts)
            origin = "pseudo-queries: document titles and sentences"
        else:
            texts = self.training_query_texts()
            origin = "label-free pseudo-queries" if self.label_free else "training queries (train and dev slices)"
        texts = texts[:limit]
        log.info("distill-vq: encoding %d queries (%s)", len(texts), origin)
        return self.dense_queries(texts), {"source": source, "origin": origin, "n_queries": len(texts)}

    def tune_hybrid(self, depth: int = 100, kind: str | None = None) -> dict[str, Any]:
        """Choose the dense weight of the hybrid (z-score fusion of dense and BM25 top-``depth``)
        on the dev slice: held-out train queries, or held-out pseudo-queries when label-free.
        Never on test judgments. The weight is the one closest to equal weights among those
        within one standard error of the best (:func:`index_build.evaluate.one_se_choice`):
        pseudo-queries extracted from the documents favour BM25 by construction (BM25 finds
        their source at rank 1), so a single dev query must not pull the weight to an extreme.
        ``kind``: the dense model fused (default :attr:`served_dense`). Computed once per
        pipeline and exported dense model (evaluation, each TREC DL pool and the artifact stage
        all need it)."""
        kind = kind or self.served_dense
        memo = (depth, kind, self.export_key(kind))
        if memo not in self._hybrid_tuning:
            self._hybrid_tuning[memo] = self._tune_hybrid(depth, kind)
        return self._hybrid_tuning[memo]

    def _tune_hybrid(self, depth: int, kind: str) -> dict[str, Any]:
        dev = self.load_mined()["dev"]
        if not dev["qids"]:
            return {"method": "zscore", "dense_weight": 0.5, "sparse_weight": 0.5, "depth": depth,
                    "tuned_on": "default (no dev queries)"}
        qrels = self.dev_qrels(dev)
        doc_ids = self.collection.doc_ids
        firsts = self.first_stage_lists(dev["queries"], self.dense_queries(dev["queries"], kind), 0.5, depth, kind)
        per_query: dict[float, np.ndarray] = {}
        for w in WEIGHT_GRID:
            run = {}
            for r, qid in enumerate(dev["qids"]):
                fused = fuse_hybrid(firsts["dense"][r], firsts["sparse"][r], (w, 1.0 - w), depth)
                run[qid] = {doc_ids[int(d)]: float(x) for d, x in zip(*fused)}
            per_query[w] = per_query_ndcg(qrels, run, dev["qids"])
        best = one_se_choice(per_query, prior=0.5)
        return {"method": "zscore", "dense_weight": best, "sparse_weight": round(1.0 - best, 1),
                "depth": depth, "tuned_on": "pseudo-query dev slice" if self.label_free else "train dev slice",
                "selection": "one-standard-error rule toward equal weights (0.5)",
                "dev_nDCG@10": {str(w): round(float(v.mean()), 4) for w, v in per_query.items()}}

    def tune_rerank_weights(self, kind: str, hybrid_weight: float, depth: int = 100) -> dict[str, Any]:
        """Per first stage, the weight of reranker ``kind``'s score (``colbert`` or
        ``cross-encoder``) against the first stage's score in the final ranking
        (:func:`models.fusion.interpolate`; 1 = plain reranking, 0 = the first stage alone),
        chosen on the dev slice like :meth:`tune_hybrid` with the first stage alone as the
        prior: a reranker that does not beat its first stage on dev by more than one standard
        error gets weight 0 (``no_dev_gain`` lists those first stages). Never on test judgments.
        Computed once per pipeline and exported models (the evaluate and artifact stages both
        need it)."""
        memo = (kind, hybrid_weight, depth, self.export_key(self.served_dense), self.export_key(kind))
        if memo not in self._rerank_tuning:
            self._rerank_tuning[memo] = self._tune_rerank_weights(kind, hybrid_weight, depth)
        return self._rerank_tuning[memo]

    def _tune_rerank_weights(self, kind: str, hybrid_weight: float, depth: int) -> dict[str, Any]:
        dev = self.load_mined()["dev"]
        stages = ("dense", "sparse", "hybrid")
        if not dev["qids"]:
            return {"method": "zscore", "weights": dict.fromkeys(stages, 1.0), "depth": depth,
                    "tuned_on": "default (no dev queries)"}
        qrels = self.dev_qrels(dev)
        firsts = self.first_stage_lists(dev["queries"], self.dense_queries(dev["queries"]), hybrid_weight, depth)
        scores = self.rerank_scores(kind, dev["queries"], firsts)
        weights, curves = {}, {}
        for stage in stages:
            per_query = {a: per_query_ndcg(qrels, self.run_of(dev["qids"], firsts[stage], scores[stage], a),
                                           dev["qids"])
                         for a in WEIGHT_GRID}
            weights[stage] = one_se_choice(per_query, prior=0.0)
            curves[stage] = {str(a): round(float(v.mean()), 4) for a, v in per_query.items()}
        return {"method": "zscore", "weights": weights, "depth": depth,
                "tuned_on": "pseudo-query dev slice" if self.label_free else "train dev slice",
                "selection": "one-standard-error rule toward the first stage alone (0.0)",
                # first stages after which the reranker did not beat the first stage alone on dev
                "no_dev_gain": [stage for stage, w in weights.items() if w == 0.0],
                "dev_nDCG@10": curves}

    def rerank_scores(self, kind: str, texts: list[str],
                      firsts: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]]) -> dict[str, list[np.ndarray]]:
        """Reranker ``kind``'s score of every candidate of every first stage in ``firsts`` (as
        from :meth:`first_stage_lists`). Each query's candidates are scored once, over the
        union of its lists (the stages overlap heavily, and a cross-encoder pass is costly)."""
        unions = [np.unique(np.concatenate([lists[r][0] for lists in firsts.values()] + [np.zeros(0, np.int64)]))
                  for r in range(len(texts))]
        if kind == "colbert":
            scored = self.colbert_scores(texts, [(u, np.zeros(len(u))) for u in unions])
        elif kind == "cross-encoder":
            scored = self.cross_encoder_scores(texts, [[self.corpus_texts[int(j)] for j in u] for u in unions])
        else:
            raise ValueError(f"no reranker {kind!r}")
        return {stage: [scored[r][np.searchsorted(unions[r], cands)] for r, (cands, _) in enumerate(lists)]
                for stage, lists in firsts.items()}

    # ----------------------------------------------------------------- orchestration
    def run_all(self) -> dict:
        self.mine()
        for kind in self.cfg.students.kinds:
            self.distill(kind)
            self.export(kind)
        self.evaluate()
        if not self.cfg.build_artifact:
            return self.write_results()
        self.write_results()
        self.artifact()
        return self.write_results()  # again, so the artifact stage's time is in the results

    def command(self) -> str:
        """The ``index-build all`` command line that builds this configuration (for records)."""
        import shlex

        parts = ["index-build", "all"] + (["--config", self.cfg.source] if self.cfg.source else [])
        for item in self.cfg.overrides:
            parts += ["--set", item]
        return shlex.join(parts)

    def write_results(self) -> dict:
        from index_build.evaluate import markdown_table, write_json_atomic

        ev = self.records.get("evaluate")
        if ev is None:
            raise RuntimeError("evaluate has not run")
        stages = {n: {"seconds": r.seconds, "peak_rss_bytes": r.peak_rss_bytes, "cached": r.cached,
                      **{k: v for k, v in r.result.items() if k not in {"collection", "trec"}}}
                  for n, r in self.records.items()}
        name = self.cfg.evaluate.name or Path(self.cfg.data.path).name
        results_dir = self.cfg.results_path
        main = {"collection": name, "split": self.cfg.data.test_split, "rerank_depth": self.cfg.evaluate.rerank_depth,
                "systems": ev.result["collection"], "stages": stages,
                "teacher": {"members": self.cfg.teacher.members, "norm": self.cfg.teacher.norm,
                            "pool_depth": self.cfg.teacher.pool_depth},
                "command": self.command()}
        if self.served_dense in self.cfg.students.kinds:
            # the served dense model (whose first stage the rerank and served-default rows use)
            # and the default mode, chosen on the dev slice
            main["serving"] = {"dense_model": self.served_dense, "default": self.choose_default()}
        write_json_atomic(results_dir / f"{name}.json", main)
        md = markdown_table(main["systems"], f"{name} ({self.cfg.data.test_split})")
        if ev.result["trec"]:
            trec: dict[str, Any] = {k: {"systems": v} for k, v in ev.result["trec"].items()}
            trec["note"] = ("every system reranks runs/BM25.trec top-100; RR@10 and R@100 count grade >= 2 "
                            "as relevant; students distilled on " + name)
            write_json_atomic(results_dir / "trec-dl.json", trec)
            for k, v in ev.result["trec"].items():
                md += "\n" + markdown_table(v, f"TREC {k} (rerank BM25 top-100)")
        md += "\n### stages\n\n| stage | seconds | peak RSS (MiB) |\n|---|---|---|\n"
        for n, s in stages.items():
            md += f"| {n} | {s['seconds']} | {s['peak_rss_bytes'] / 2**20:.0f} |\n"
        (results_dir / f"{name}.md").write_text(md)
        return main


def interpolated_run(first: dict[str, dict[str, float]], rerank: dict[str, dict[str, float]],
                     weight: float) -> dict[str, dict[str, float]]:
    """Per query, the reranker's scores of the first stage's candidates interpolated with the
    first stage's (:func:`models.retrieval.rerank_order`, ``weight`` 1: the reranker alone)."""
    run = {}
    for qid, firsts in first.items():
        docs = list(firsts)
        final, _ = rerank_order(np.array([firsts[d] for d in docs]), np.array([rerank[qid][d] for d in docs]), weight)
        run[qid] = dict(zip(docs, map(float, final)))
    return run


def train_recipe_key(tcfg) -> str:
    """The part of a distill stage's key that comes from its train section: what is trained,
    not where (``device``) nor what is applied afterwards (``wise_ft``, see export_key)."""
    from dataclasses import asdict

    from index_build.config import resolve_device
    from index_build.train import resolve_precision

    data = asdict(tcfg)
    # the numerics as they resolve here ("auto" is bf16 on some machines, fp32 on others)
    data["precision"] = "fp32" if resolve_precision(tcfg.precision, resolve_device(tcfg.device)) is None else "bf16"
    data.pop("wise_ft", None)
    data.pop("device", None)
    return json.dumps(data, sort_keys=True)


def _jsonable(cfg: BuildConfig) -> dict:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(cfg), default=str))


def _hash_without(cfg: BuildConfig, section: str, *drop: str) -> str:
    import hashlib
    from dataclasses import asdict

    data = {k: v for k, v in asdict(getattr(cfg, section)).items() if k not in drop}
    payload = json.dumps({section: data}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


#: WiSE-FT weight of a label-free build's distilled dense student (see TrainConfig.wise_ft):
#: distilling on extractive pseudo-queries alone pulls the student away from real queries.
LABEL_FREE_WISE_FT = 0.5
