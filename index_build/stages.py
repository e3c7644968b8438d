"""The build runner: mine -> distill -> export -> evaluate (-> artifact), one module per stage
(:mod:`index_build.mine`, :mod:`index_build.distill`, :mod:`index_build.export`,
:mod:`index_build.evaluate`, :mod:`index_build.package`; dev-slice choices in
:mod:`index_build.tune`).

Each stage writes its outputs under ``work_dir/<stage>/`` with a ``stage.json`` holding its
key (the hash of everything it depends on: the corpus, its code version, its config sections
and the upstream stages' keys), its wall time and peak memory. A rerun skips a stage whose
key is unchanged, so changing one setting redoes only the stages downstream of it.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from index_build.cache import content_key
from index_build.config import BuildConfig, ConfigError
from index_build.context import HYBRID_HEAD, BuildContext
from index_build.export import INT8_WEIGHTS_MARK, OUTLIER_RATIO
from models.encoders import ONNX_NAME, TOKEN_STATES

log = logging.getLogger(__name__)


#: What each stage does, as the build log announces it ("stage k/n: name: ...")
STAGE_ABOUT = {
    "mine": "training queries (or pseudo-queries) with candidates from BM25 and the base model, scored by the teacher",
    "pseudo": "pseudo-queries from the corpus, scored by the teacher",
    "distill": "train the {kind} student",
    "export": "export the {kind} student to ONNX (+ int8), checked against the torch model",
    "head": "the {kind} student's hybrid head (ridge maps on the base model) and the hybrid's query encoder",
    "evaluate": "every system on the test queries (and TREC DL pools); tune weights and the default mode on dev",
    "artifact": "encode the corpus, build the indexes and the document store, write and verify the artifact",
}

#: The version of each stage's code, part of its key: bump a stage's number when what it
#: writes changes, and that stage and every stage after it (their keys include its key)
#: rebuild. The teacher's scores and encodings are cached by content, not by these keys.
STAGE_VERSIONS = {"mine": 1, "pseudo": 1, "distill": 1, "export": 1, "head": 1, "evaluate": 8, "artifact": 6}


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


class Pipeline(BuildContext):
    """Runs, keys and records the stages of one build (a :class:`BuildContext` for them)."""

    def __init__(self, cfg: BuildConfig, *, progress: bool = True) -> None:
        super().__init__(cfg, progress=progress)
        self.records: dict[str, StageRecord] = {}
        #: the stages :meth:`run_all` runs, in order (for "stage k/n" in the log)
        self.plan: list[str] = []

    # ----------------------------------------------------------------- running a stage
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
        """Run ``fn(out_dir)`` as stage ``name`` unless a complete run under ``key`` exists."""
        out = self.work / name
        meta = out / "stage.json"
        if not force and (rec := self.up_to_date(name, key)) is not None:
            log.info("stage %s: up to date (key %s)", name, key)
            return rec
        log.info("%s: %s%s%s", self._stage_title(name), self._stage_about(name), self._estimate(name),
                 _last_time(meta))
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
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

    def _stage_title(self, name: str) -> str:
        if name in self.plan:
            return f"stage {self.plan.index(name) + 1}/{len(self.plan)}: {name}"
        return f"stage {name}"

    @cached_property
    def estimates(self) -> dict[str, float]:
        """Rough seconds per stage from the corpus size and the config (:mod:`index_build.estimate`)."""
        from index_build.estimate import Workload, stage_estimates
        from index_build.pseudo_queries import default_budget

        col, data = self.collection, self.cfg.data
        n_docs = len(col.docs)
        if self.label_free:
            train = self.cfg.label_free.budget or default_budget(n_docs)
        else:
            train = int(len(col.split_queries(data.train_split)) * (1 - data.dev_fraction))
        test = len(col.split_queries(data.test_split)) if data.test_split in col.qrels else 0
        return stage_estimates(self.cfg, Workload(n_docs, train, test, self.label_free))

    def _estimate(self, name: str) -> str:
        from index_build.estimate import fmt_minutes

        seconds = self.estimates.get(name)
        return f" (estimate {fmt_minutes(seconds)} on a cold cache)" if seconds else ""

    @staticmethod
    def _stage_about(name: str) -> str:
        base, _, kind = name.partition("-")
        return STAGE_ABOUT.get(base, "").format(kind=kind)

    # ----------------------------------------------------------------- stage keys
    def key(self, stage: str, *parts: str) -> str:
        """A stage's key: the corpus, the stage's code version and what it depends on."""
        return content_key(self.collection.checksum(), stage, f"v{STAGE_VERSIONS[stage]}", *parts)[:16]

    def mine_key(self) -> str:
        # what mining reads of the students section: the base model and lengths, the depths;
        # not which students are trained (adding one reuses the mined examples)
        students = _hash_without(self.cfg, "students", "kinds", "colbert_dim", "colbert_query_len")
        sections = ("data", "teacher", "label_free") if self.label_free else ("data", "teacher")
        from index_build.teachers import TEACHER_INT8_ACTIVATIONS

        # how the teacher's int8 members are quantized changes its scores, not its config
        query_log = self.cfg.label_free.query_log
        if query_log and not self.label_free:
            raise ConfigError("label_free.query_log is read by label-free builds only, and this collection has "
                              "training judgments: set data.label_free = true to build from the corpus and the log")
        # a query log by its content: editing the file redoes the mining
        logged = [f"query_log={self.query_log_digest}"] if query_log else []
        return self.key("mine", self.cfg.section_hash(*sections), students, f"label_free={self.label_free}",
                        f"int8_activations={TEACHER_INT8_ACTIVATIONS}", *logged)

    def pseudo_key(self, n: int) -> str:
        return self.key("pseudo", self.cfg.section_hash("teacher", "students", "label_free"), str(n))

    def distill_key(self, kind: str) -> str:
        if kind == "asymmetric":
            return self.key("distill", kind, self.mine_key(), self.cfg.section_hash("asymmetric", "label_free"))
        tcfg = self.cfg.train[kind]
        parts = [train_recipe_key(tcfg)]
        if tcfg.pseudo_queries:
            parts.append(self.pseudo_key(tcfg.pseudo_queries))
        return self.key("distill", kind, self.mine_key(), *parts)

    def export_key(self, kind: str, onnx_file: str | None = None) -> str:
        """The export stage's key; with ``onnx_file``, the key of that one graph (the fp32
        graph's does not depend on how the int8 one is quantized, so its caches outlive a change);
        for :data:`HYBRID_HEAD`, the head stage's key."""
        if kind == HYBRID_HEAD:
            return self.hybrid_head_key()
        extra = [f"wise_ft={self.wise_ft(kind)}"]
        if kind == "asymmetric":  # its graph outputs its token states too (one query pass with ColBERT)
            extra.append(TOKEN_STATES)
        if self.cfg.export_int8 and onnx_file != ONNX_NAME:  # the fp32 graph's key leaves int8 settings out
            extra += [f"per_channel={self.cfg.export_int8_per_channel}", f"outliers-fp32-{OUTLIER_RATIO:g}",
                      INT8_WEIGHTS_MARK, f"activations={self.cfg.export_int8_activations}"]
        return self.key("export", kind, self.distill_key(kind), f"int8={self.cfg.export_int8}", *extra)

    def hybrid_head_key(self) -> str:
        return self.key("head", "asymmetric", self.export_key("asymmetric"),
                        f"hybrid_head={self.cfg.asymmetric.hybrid_head}")

    def export_keys(self) -> list[str]:
        """The keys of every exported model: the students' and the asymmetric one's hybrid head."""
        kinds = self.cfg.students.kinds
        return [self.export_key(k) for k in kinds] + ([self.hybrid_head_key()] if "asymmetric" in kinds else [])

    def evaluate_key(self) -> str:
        # where results go and what they are called do not change what is evaluated
        ev = _hash_without(self.cfg, "evaluate", "results_dir", "name")
        return self.key("evaluate", ev, *self.export_keys())

    def artifact_key(self) -> str:
        from models.artifacts import SCHEMA_VERSION

        return self.key("artifact", self.cfg.section_hash("index"), self.cfg.artifact_dir,
                        f"dev_judge={self.cfg.evaluate.dev_judge}",
                        *self.export_keys(), f"schema-{SCHEMA_VERSION}")

    # ----------------------------------------------------------------- the stages
    def mine(self) -> StageRecord:
        from index_build.mine import mine

        return self.stage("mine", self.mine_key(), lambda out: mine(self, out))

    def pseudo(self, n: int) -> StageRecord:
        """Pseudo-query examples that augment a labelled training set (GPL-style)."""
        from index_build.mine import pseudo_examples

        def run(out: Path) -> dict:
            examples, _, info = pseudo_examples(self, n, 0, out / "pseudo_queries.tsv")
            with (out / "examples.pkl").open("wb") as f:
                pickle.dump(examples, f)
            return info

        return self.stage(f"pseudo-{n}", self.pseudo_key(n), run)

    def distill(self, kind: str) -> StageRecord:
        from index_build.distill import distill_asymmetric, distill_student

        if kind == "asymmetric":
            return self.stage("distill-asymmetric", self.distill_key(kind), lambda out: distill_asymmetric(self, out))
        n_pseudo = self.cfg.train[kind].pseudo_queries if not self.label_free else 0

        def run(out: Path) -> dict:
            extra = []
            if n_pseudo:
                self.pseudo(n_pseudo)
                with (self.work / f"pseudo-{n_pseudo}" / "examples.pkl").open("rb") as f:
                    extra = pickle.load(f)
            return distill_student(self, kind, out, extra)

        rec = self.stage(f"distill-{kind}", self.distill_key(kind), run)
        if n_pseudo and f"pseudo-{n_pseudo}" not in self.records:
            # its time belongs to the build's record also when the distill stage was up to date
            self.up_to_date(f"pseudo-{n_pseudo}", self.pseudo_key(n_pseudo))
        return rec

    def export(self, kind: str) -> StageRecord:
        from index_build.distill import export_stage

        return self.stage(f"export-{kind}", self.export_key(kind), lambda out: export_stage(self, kind, out))

    def hybrid_head(self) -> dict | None:
        """The record of the asymmetric student's hybrid head when it serves the hybrid's dense
        parts (:func:`index_build.distill.hybrid_head_stage`, run here if not up to date), else None."""
        if self.served_dense != "asymmetric":
            return None
        name, key = "head-asymmetric", self.hybrid_head_key()
        rec = self.records.get(name)
        if rec is None or rec.key != key:
            from index_build.distill import hybrid_head_stage

            rec = self.stage(name, key, lambda out: hybrid_head_stage(self, out))
        return rec.result if rec.result.get("serves_hybrid") == "ridge" else None

    def evaluate(self) -> StageRecord:
        from index_build.evaluate import evaluate

        return self.stage("evaluate", self.evaluate_key(), lambda out: evaluate(self, out))

    def artifact(self) -> StageRecord:
        """Encode the corpus with the ONNX students, build the indexes, write the artifact dir."""
        from index_build.package import artifact_stage
        from models.artifacts import ArtifactError, verify

        key = self.artifact_key()
        final = Path(self.cfg.artifact_dir)

        def run(out: Path) -> dict:
            return artifact_stage(self, final, key, self.records, _jsonable(self.cfg))

        rec_path = self.work / "artifact" / "stage.json"
        if rec_path.is_file() and json.loads(rec_path.read_text()).get("key") == key:
            try:
                verify(final, deep=False)
            except ArtifactError as e:
                log.warning("artifact dir %s no longer valid (%s): rebuilding", final, e)
                return self.stage("artifact", key, run, force=True)
        return self.stage("artifact", key, run)

    # ----------------------------------------------------------------- the whole build
    def run_all(self) -> dict:
        kinds = self.cfg.students.kinds
        self.plan = ["mine", *[f"{step}-{k}" for k in kinds for step in ("distill", "export")],
                     *(["head-asymmetric"] if self.served_dense == "asymmetric" else []), "evaluate",
                     *(["artifact"] if self.cfg.build_artifact else [])]
        from index_build.estimate import fmt_minutes

        self.extra_splits()  # a split the build cannot evaluate fails now, not after training
        total = sum(self.estimates.get(n, 0.0) for n in self.plan)
        log.info("build %s: %d stages (%s); work dir %s; estimate %s on a cold cache", self.cfg.source or
                 "(default config)", len(self.plan), ", ".join(self.plan), self.work, fmt_minutes(total))
        self.mine()
        for kind in self.cfg.students.kinds:
            self.distill(kind)
            self.export(kind)
        self.hybrid_head()
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
        """The build's results files (:func:`index_build.evaluate.write_results`)."""
        from index_build.evaluate import write_results

        ev = self.records.get("evaluate")
        if ev is None:
            raise RuntimeError("evaluate has not run")
        stages = {n: {"seconds": r.seconds, "peak_rss_bytes": r.peak_rss_bytes, "cached": r.cached,
                      **{k: v for k, v in r.result.items() if k not in {"collection", "trec", "splits"}}}
                  for n, r in self.records.items()}
        return write_results(self, ev.result, stages, self.command())


def _last_time(meta: Path) -> str:
    """`` (took N min last time)`` from an earlier run's record of a stage, else ``""``."""
    try:
        seconds = float(json.loads(meta.read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return f" (its last run took {seconds / 60:.1f} min)"


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

    from index_build.config import hashed_section

    data = {k: v for k, v in hashed_section(getattr(cfg, section)).items() if k not in drop}
    payload = json.dumps({section: data}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
