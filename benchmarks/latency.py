"""End-to-end latency of the real service, per rerank mode, at concurrency 1 and 16.

Run from the repository root once the SciFact artifact exists::

    .venv/bin/python benchmarks/latency.py --artifact artifacts/scifact

It starts ``python -m service`` in a subprocess (``NRS_ARTIFACT_DIR``, ``NRS_THREADS``, ...
on a free loopback port), waits for ``/ready``, then for every rerank mode (``none``,
``colbert``, ``cross-encoder``) and every concurrency (1 and 16; asyncio + one
``httpx.AsyncClient``) sends the SciFact test queries (those judged in
``qrels/test.tsv``) round-robin until ``--requests`` have been answered or
``--max-seconds`` have passed. It records the client's end-to-end latency and the
server's per-stage ``timings_ms``.

The rerank modes run after the dense first stage (the cross-encoder at the depth the service
rescores by default); ``default`` sends requests that name no mode (the artifact's served
default, ``/info`` ``default_mode``). Each mode's **quality** is the nDCG@10 of the
service's own answers to every judged query. The **encoder reference**
times, in-process and interleaved, the artifact's dense query encoder against the base
all-MiniLM-L6-v2 int8 graph.

A **live check** compares, for 20 test queries, the service's top-10 (``rerank=none``)
with the same artifact's dense model and FAISS index loaded in-process
(:class:`models.encoders.DenseEncoder` with the ONNX file the service reports in ``/info``,
fp32 or int8, + :class:`models.dense_index.DenseIndex`, the same IVF-PQ settings): the two
must be identical. With ``--config`` it also reports the overlap
with the builder's offline evaluation (exact search over the builder's cached corpus
vectors), i.e. what the IVF-PQ approximation costs.

Writes ``benchmarks/results/latency.json`` atomically::

    {"none" | "colbert" | "cross-encoder" | "default": {"c1" | "c16": {
        "p50_ms", "p95_ms", "p99_ms", "stages": {stage: {"p50_ms", "p95_ms", "p99_ms"}},
        "qps", "requests", "errors", "errors_by_status", "candidates"},
        "quality": {"nDCG@10", "queries"}},
     "live_check": {...}, "machine": {...}, "command": "...", "settings": {...}}

The helpers here (percentiles, the server subprocess, atomic JSON, machine description)
are shared with ``benchmarks/load.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from models.artifacts import write_json_atomic

log = logging.getLogger("benchmarks.latency")

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "scifact"
#: ``default``: requests that name no mode, served in the artifact's default mode
DEFAULT_MODE = "default"
#: rerank modes after the dense first stage, the hybrid first stage alone and reranked by
#: ColBERT, and the served default
MODES = ("none", "colbert", "cross-encoder", "hybrid", "hybrid+colbert", DEFAULT_MODE)
CONCURRENCY = (1, 16)
STAGES = ("queue", "tokenize", "encode", "ann", "sparse", "rerank", "fetch", "total")


# ------------------------------------------------------------------------------------ statistics
def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics
    (NumPy's default method); ``nan`` for no values.

    >>> percentile([1, 2, 3, 4], 50)
    2.5
    >>> percentile([10.0], 99)
    10.0
    >>> percentile(list(range(101)), 99)
    99.0
    """
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q} is outside [0, 100]")
    ordered = sorted(float(v) for v in values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def latency_summary(values_ms: Sequence[float]) -> dict[str, float | None]:
    """``{"p50_ms", "p95_ms", "p99_ms"}`` rounded to microseconds (``None`` without values).

    >>> latency_summary([1.0, 2.0, 3.0])
    {'p50_ms': 2.0, 'p95_ms': 2.9, 'p99_ms': 2.98}
    """
    out: dict[str, float | None] = {}
    for q in (50, 95, 99):
        out[f"p{q}_ms"] = round(percentile(values_ms, q), 3) if values_ms else None
    return out


@dataclass
class Sample:
    """One request: client latency, HTTP status (0: no response) and the server's stage timings."""

    ms: float
    status: int
    timings: dict[str, float] = field(default_factory=dict)


def summarize_run(samples: Sequence[Sample], wall_s: float) -> dict[str, Any]:
    """Percentiles of the answered (200) requests, per-stage percentiles, throughput, errors.

    >>> s = summarize_run([Sample(10.0, 200, {"total": 9.0, "encode": 4.0, "ann": 0.0}), Sample(1.0, 429)], 1.0)
    >>> s["p50_ms"], s["qps"], s["requests"], s["errors"], s["errors_by_status"], sorted(s["stages"])
    (10.0, 1.0, 2, 1, {'429': 1}, ['encode', 'total'])
    """
    ok = [s for s in samples if s.status == 200]
    stages: dict[str, dict[str, float | None]] = {}
    for stage in STAGES:
        values = [s.timings.get(stage, 0.0) for s in ok]
        if any(v > 0 for v in values) or (stage == "total" and values):
            stages[stage] = latency_summary(values)
    errors = Counter(str(s.status) for s in samples if s.status != 200)
    return {
        **latency_summary([s.ms for s in ok]),
        "stages": stages,
        "qps": round(len(ok) / wall_s, 3) if wall_s > 0 else None,
        "requests": len(samples),
        "errors": sum(errors.values()),
        "errors_by_status": dict(sorted(errors.items())),
    }


# ------------------------------------------------------------------------------------ output
def machine_info() -> dict[str, Any]:
    """CPU model and count, memory, OS, load average and library versions."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    out: dict[str, Any] = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
                           "python": platform.python_version()}
    try:
        out["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        pass
    if hasattr(os, "getloadavg"):
        out["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    try:
        import psutil

        out["memory_bytes"] = int(psutil.virtual_memory().total)
    except ImportError:  # pragma: no cover
        pass
    versions: dict[str, str | None] = {}
    for dist in ("onnxruntime", "faiss-cpu", "numpy", "fastapi", "uvicorn", "httpx", "locust", "torch"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    out["versions"] = versions
    return out


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """How ``script`` was run (``argv``: its arguments, default the process's), for the results file."""
    path = Path(script).resolve()
    shown = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
    return shlex.join(["python", shown, *(sys.argv[1:] if argv is None else argv)])


def record_entry(out: Path, key: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Put ``entry`` under ``key`` in the results file ``out`` (one entry per build config,
    each with its own command), with this machine's :func:`machine_info`; written atomically.
    Returns every entry the file now holds."""
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.pop("command", None)
    results[key] = entry
    results["machine"] = machine_info()
    write_json_atomic(out, results)
    return results


def require_artifact(parser: argparse.ArgumentParser, artifact: Path) -> None:
    """Stop with a usage error when ``artifact`` holds no manifest."""
    if not (artifact / "manifest.json").is_file():
        parser.error(f"{artifact}: no manifest.json (build it with `index-build all --config ...`)")


def benchmark_logging() -> None:
    """INFO lines with timestamps; httpx's per-request lines left out."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


# ------------------------------------------------------------------------------------ server process
def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_env(artifact_dir: Path, port: int, threads: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a ``python -m service`` child: this one without any ``NRS_*``
    variable, plus the artifact, loopback address, port, threads and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NRS_")}
    env.update(
        NRS_ARTIFACT_DIR=str(Path(artifact_dir).resolve()), NRS_HOST="127.0.0.1", NRS_PORT=str(port),
        NRS_THREADS=str(threads), NRS_LOG_LEVEL="warning", OMP_NUM_THREADS=str(max(1, threads)),
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
    )
    env.update(extra or {})
    return env


class ServerProcess:
    """A server subprocess on a loopback port: start it, wait for ``/ready``, stop it with
    SIGTERM (then SIGKILL after ``stop_timeout_s``). Output goes to ``log_path``."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], port: int, log_path: Path,
                 name: str = "service") -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.port = port
        self.log_path = Path(log_path)
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, ready_timeout_s: float = 600.0) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as logf:
            self.proc = subprocess.Popen(self.argv, cwd=REPO, env=self.env, stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/ready", timeout=2.0).status_code == 200:
                    log.info("%s ready on %s (pid %d)", self.name, self.base_url, self.proc.pid)
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {ready_timeout_s:.0f} s; log {self.log_path}:\n"
                           f"{self.log_tail()}")

    def stop(self, stop_timeout_s: float = 30.0) -> int | None:
        if self.proc is None or self.returncode is not None:
            return self.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s ignored SIGTERM for %.0f s: killing it", self.name, stop_timeout_s)
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode
        return self.returncode

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def running_service(artifact_dir: Path, *, threads: int = 1, extra_env: Mapping[str, str] | None = None,
                    log_path: Path | None = None, ready_timeout_s: float = 600.0) -> Iterator[ServerProcess]:
    """``python -m service`` on a free loopback port, ready; stopped on exit."""
    port = free_port()
    log_path = log_path or Path(tempfile.gettempdir()) / f"nrs-service-{port}.log"
    server = ServerProcess([sys.executable, "-m", "service"], service_env(artifact_dir, port, threads, extra_env),
                           port, log_path)
    with server:
        server.start(ready_timeout_s)
        yield server


# ------------------------------------------------------------------------------------ queries
def load_test_queries(data_dir: Path, split: str = "test") -> list[tuple[str, str]]:
    """``(query id, text)`` of the queries judged in ``qrels/<split>.tsv``, in file order."""
    data_dir = Path(data_dir)
    judged: set[str] = set()
    with (data_dir / "qrels" / f"{split}.tsv").open() as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.rstrip("\n").split("\t")
            if lineno == 1 and parts[0] == "query-id":
                continue
            if len(parts) >= 2:
                judged.add(parts[0])
    out = []
    with (data_dir / "queries.jsonl").open() as f:
        for line in f:
            if line.strip():
                q = json.loads(line)
                if str(q["_id"]) in judged:
                    out.append((str(q["_id"]), str(q["text"])))
    if not out:
        raise ValueError(f"{data_dir}: no queries judged in qrels/{split}.tsv")
    return out


# ------------------------------------------------------------------------------------ load generation
async def closed_loop(base_url: str, payloads: Sequence[dict[str, Any]], *, concurrency: int, max_requests: int,
                      max_seconds: float, route: str = "/search", timeout_s: float = 60.0,
                      headers: Mapping[str, str] | None = None) -> tuple[list[Sample], float]:
    """``concurrency`` workers, each sending the next payload (round-robin) as soon as its
    previous request is answered, until ``max_requests`` are sent or ``max_seconds`` pass.
    Returns the samples and the wall time in seconds."""
    samples: list[Sample] = []
    counter = itertools.count()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits,
                                 headers=dict(headers or {})) as client:
        started = time.perf_counter()
        deadline = started + max_seconds

        async def worker() -> None:
            while True:
                i = next(counter)
                if i >= max_requests or time.perf_counter() >= deadline:
                    return
                t0 = time.perf_counter()
                try:
                    r = await client.post(route, json=payloads[i % len(payloads)])
                    status = r.status_code
                    timings = r.json().get("timings_ms", {}) if status == 200 else {}
                except httpx.HTTPError:
                    status, timings = 0, {}
                samples.append(Sample((time.perf_counter() - t0) * 1000.0, status, timings))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return samples, wall


def mode_request(mode: str) -> tuple[str, str]:
    """The ``(first_stage, rerank)`` a benchmark mode requests: ``hybrid`` and
    ``hybrid+<rerank>`` the hybrid first stage, any other a rerank mode after the dense one."""
    if mode == "hybrid":
        return "hybrid", "none"
    stage, _, rerank = mode.rpartition("+")
    return (stage or "dense"), rerank


def search_payloads(texts: Sequence[str], *, rerank: str, k: int, candidates: int | None) -> list[dict[str, Any]]:
    """One ``/search`` body per query text in benchmark mode ``rerank`` (:func:`mode_request`;
    ``candidates`` None: the service's default depth for that mode), or for ``default`` no
    mode at all (the artifact's served default, see ``/info``)."""
    if rerank == DEFAULT_MODE:
        return [{"query": t, "k": k} for t in texts]
    depth = {} if candidates is None else {"candidates": candidates}
    first_stage, mode = mode_request(rerank)
    return [{"query": t, "k": k, "rerank": mode, "first_stage": first_stage, **depth} for t in texts]


async def ranked_lists(base_url: str, payloads: Sequence[dict[str, Any]], qids: Sequence[str], *,
                       concurrency: int = 2, timeout_s: float = 60.0) -> dict[str, dict[str, float]]:
    """The service's ranking of each payload as a run ``{qid: {doc id: score}}``."""
    run: dict[str, dict[str, float]] = {}
    todo = iter(zip(qids, payloads))
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s) as client:

        async def worker() -> None:
            for qid, body in todo:
                r = await client.post("/search", json=body)
                r.raise_for_status()
                run[qid] = {h["id"]: float(h["score"]) for h in r.json()["hits"]}

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return run


def quality(base_url: str, payloads: Sequence[dict[str, Any]], qids: Sequence[str], data_dir: Path, split: str,
            timeout_s: float) -> dict[str, Any]:
    """nDCG@10 of the service's answers to every judged query, as served (the builder's
    qrels loader and metrics)."""
    from index_build.data import load_collection
    from index_build.metrics import metrics

    qrels = load_collection(data_dir, splits=[split]).qrels[split]
    run = asyncio.run(ranked_lists(base_url, payloads, qids, timeout_s=timeout_s))
    return {"nDCG@10": metrics(qrels, run)["nDCG@10"], "queries": len(run)}


# ------------------------------------------------------------------------------------ live check
def live_check(base_url: str, artifact_dir: Path, texts: Sequence[str], *, k: int = 10, candidates: int = 100,
               config: Path | None = None) -> dict[str, Any]:
    """Service top-``k`` (``rerank=none``) vs the same artifact's encoder and FAISS index
    in-process, one query at a time (as the service encodes them at concurrency 1); with
    ``config``, also vs exact search over the builder's corpus vectors (its offline evaluation)."""
    import numpy as np

    from models.artifacts import load_manifest
    from models.dense_index import DenseIndex
    from models.docstore import DocStore
    from models.encoders import DenseEncoder

    root = Path(artifact_dir)
    manifest = load_manifest(root)
    dense_info = manifest.models["dense"]
    index = DenseIndex.load_entry(root, manifest.indexes["dense"])
    docstore = DocStore.open(root / str(manifest.docstore["path"]))
    try:
        ids = list(docstore.ids)
    finally:
        docstore.close()
    depth = max(k, candidates)
    served: list[list[str]] = []
    with httpx.Client(base_url=base_url, timeout=60.0) as client:
        # the ONNX file the service loaded (int8 or not)
        onnx_file = str(client.get("/info").raise_for_status().json()["models"]["dense"]["onnx_file"])
        for t in texts:
            r = client.post("/search", json={"query": t, "k": k, "rerank": "none", "first_stage": "dense",
                                              "candidates": candidates})
            r.raise_for_status()
            served.append([h["id"] for h in r.json()["hits"]])
    encoder = DenseEncoder(root / str(dense_info["path"]), onnx_file=onnx_file, threads=1)
    vectors = np.concatenate([encoder.encode_queries([t]) for t in texts])
    _, local = index.search(vectors, depth)
    in_process = [[ids[int(j)] for j in row[:k] if j >= 0] for row in local]
    same = sum(a == b for a, b in zip(served, in_process))
    out: dict[str, Any] = {
        "queries": len(texts), "k": k, "candidates": candidates, "identical_top10": same,
        "reference": f"the same artifact's DenseEncoder ({onnx_file}) + DenseIndex ({index.factory}, default nprobe) "
                     "in-process",
        "nprobe": index.default_nprobe if index.is_ivf else None, "index": index.factory,
    }
    mismatched = [i for i, (a, b) in enumerate(zip(served, in_process)) if a != b]
    if mismatched:
        out["mismatched_queries"] = mismatched
    if config is not None:
        from index_build.config import load_config
        from index_build.stages import Pipeline
        from models.dense_index import exact_search

        pipeline = Pipeline(load_config(config), progress=False)
        corpus = pipeline.corpus_vectors()
        _, exact = exact_search(corpus, vectors, k)
        exact_ids = [[ids[int(j)] for j in row if j >= 0] for row in exact]
        overlaps = [len(set(a) & set(b)) / k for a, b in zip(served, exact_ids)]
        out["vs_builder_exact"] = {
            "identical_top10": sum(a == b for a, b in zip(served, exact_ids)),
            "mean_overlap_at_10": round(sum(overlaps) / len(overlaps), 4),
            "reference": f"exact inner product over the builder's cached corpus vectors ({config})",
        }
    return out


# ------------------------------------------------------------------------------------ encoder reference
def encoder_reference(artifact_dir: Path, texts: Sequence[str], *, threads: int, base: str = "packaged:minilm",
                      repeats: int = 2) -> dict[str, Any]:
    """In-process query-encode time, one query per call as at concurrency 1, of the artifact's
    dense model and, where it has one, the hybrid first stage's query encoder (fp32 and int8
    graphs), and of the base model's int8 graph (``base`` without training: the reference the
    served query encoders are held to), interleaved in one run on
    the same threads; p50/p95 in ms and each encoder's p50 over the base int8 one's."""
    from index_build.export import base_dense_onnx
    from models.artifacts import load_manifest
    from models.encoders import DenseEncoder

    manifest = load_manifest(artifact_dir)
    dense = manifest.models["dense"]
    encoders = {"base-int8": DenseEncoder(base_dense_onnx(base)[0], onnx_file="model.int8.onnx", threads=threads)}
    for role in ("dense", "hybrid"):  # the hybrid first stage's own query encoder, where the artifact has one
        model = manifest.models.get(role) or {}
        for precision, key in (("fp32", "onnx_file"), ("int8", "int8_onnx_file")):
            if model.get(key):
                encoders[f"artifact-{role}-{precision}"] = DenseEncoder(artifact_dir / model["path"],
                                                                        onnx_file=model[key], threads=threads)
    times: dict[str, list[float]] = {name: [] for name in encoders}
    for enc in encoders.values():  # warm-up
        enc.encode_queries(list(texts[:5]))
    for _ in range(repeats):
        for text in texts:
            for name, enc in encoders.items():
                started = time.perf_counter()
                enc.encode_queries([text])
                times[name].append((time.perf_counter() - started) * 1000.0)
    base_p50 = percentile(times["base-int8"], 50)
    out: dict[str, Any] = {
        "encoders": {name: {"p50_ms": round(percentile(v, 50), 3), "p95_ms": round(percentile(v, 95), 3),
                            "dim": encoders[name].dim, "ratio_to_base_int8_p50": round(percentile(v, 50) / base_p50, 3)}
                     for name, v in times.items()},
        "base": base, "calls": len(texts) * repeats, "threads": threads,
        "how": "DenseEncoder.encode_queries([query]) in this process, encoders interleaved query by query",
    }
    colbert = manifest.models.get("colbert") or {}
    if colbert.get("query_token_map") and "artifact-dense-fp32" in encoders:
        out["colbert_query_tokens"] = query_token_passes(artifact_dir, dense, colbert, texts, threads, repeats)
    return out


def query_token_passes(artifact_dir: Path, dense: Mapping[str, Any], colbert: Mapping[str, Any],
                       texts: Sequence[str], threads: int, repeats: int) -> dict[str, Any]:
    """What a dense first stage plus ColBERT costs on the query side, in-process, one query a
    call, interleaved (fp32 graphs): one pass (the dense graph's embedding and token states,
    ColBERT's query tokens projected from the states, as the service serves it) against two
    (the dense graph, then ColBERT's own query encoder)."""
    import numpy as np

    from models.encoders import ColbertEncoder, DenseEncoder, project_query_tokens

    enc = DenseEncoder(artifact_dir / dense["path"], onnx_file=dense["onnx_file"], threads=threads)
    col = ColbertEncoder(artifact_dir / colbert["path"], onnx_file=colbert["onnx_file"], threads=threads)
    token_map = np.load(artifact_dir / colbert["path"] / colbert["query_token_map"]["file"])

    def one_pass(text: str) -> None:
        _, states, mask = enc.encode_queries_with_states([text])
        project_query_tokens(states, mask, token_map)

    def two_passes(text: str) -> None:
        enc.encode_queries([text])
        col.encode_queries([text])

    runs: dict[str, Callable[[str], None]] = {"one-pass": one_pass, "two-pass": two_passes}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        for text in texts[:5]:
            fn(text)
    for _ in range(repeats):
        for text in texts:
            for name, fn in runs.items():
                started = time.perf_counter()
                fn(text)
                times[name].append((time.perf_counter() - started) * 1000.0)
    p50 = {name: percentile(v, 50) for name, v in times.items()}
    return {**{name: {"p50_ms": round(p50[name], 3), "p95_ms": round(percentile(v, 95), 3)}
               for name, v in times.items()},
            "one_pass_over_two_pass_p50": round(p50["one-pass"] / p50["two-pass"], 3),
            "how": "fp32 graphs in this process, one query a call, the two interleaved query by query"}


# ------------------------------------------------------------------------------------ main
def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    queries = load_test_queries(args.data, args.split)
    texts = [t for _, t in queries]
    extra_env = dict(kv.split("=", 1) for kv in args.env)
    results: dict[str, Any] = {}
    with running_service(args.artifact, threads=args.threads, extra_env=extra_env,
                         log_path=args.server_log) as server:
        info = httpx.get(f"{server.base_url}/info", timeout=10).json()
        limits = info.get("limits", {})
        reranks, stages = info.get("rerank_modes", MODES), info.get("first_stages", ["dense"])
        available = [m for m in MODES if m == DEFAULT_MODE or (
            mode_request(m)[0] in stages and mode_request(m)[1] in reranks)]
        # the client waits longer than the server's own time budget, so a slow request is the
        # server's 504, not a client-side disconnect (status 0)
        client_timeout_s = float(limits.get("request_timeout_ms", 60000.0)) / 1000.0 + 10.0
        for mode in args.modes:
            if mode not in available:
                log.warning("rerank %s is not available in this artifact: skipped", mode)
                continue
            candidates: int | None = args.candidates
            if mode == DEFAULT_MODE:
                candidates = int(limits.get("default_candidates", args.candidates))
            elif mode == "cross-encoder":  # the depth the service rescores by default
                candidates = None
            payloads = search_payloads(texts, rerank=mode, k=args.k, candidates=candidates)
            if candidates is None:
                candidates = info.get("models", {}).get("cross-encoder", {}).get("default_candidates")
            asyncio.run(closed_loop(server.base_url, payloads[: args.warmup], concurrency=1,
                                    max_requests=args.warmup, max_seconds=60))
            results[mode] = {}
            for c in args.concurrency:
                samples, wall = asyncio.run(closed_loop(
                    server.base_url, payloads, concurrency=c, max_requests=args.requests,
                    max_seconds=args.max_seconds, timeout_s=client_timeout_s))
                summary = summarize_run(samples, wall)
                summary["candidates"] = candidates
                results[mode][f"c{c}"] = summary
                log.info("%s c%d: p50 %s ms p99 %s ms, %s qps, %d errors", mode, c, summary["p50_ms"],
                         summary["p99_ms"], summary["qps"], summary["errors"])
            if args.quality:
                results[mode]["quality"] = quality(server.base_url, payloads, [q for q, _ in queries],
                                                   args.data, args.split, client_timeout_s)
                log.info("%s: %s", mode, results[mode]["quality"])
        if args.live_check > 0:
            results["live_check"] = live_check(server.base_url, args.artifact, texts[: args.live_check], k=args.k,
                                               candidates=args.candidates, config=args.config)
            log.info("live check: %s", results["live_check"])
        results["encoder_reference"] = encoder_reference(args.artifact, texts[:200], threads=args.threads)
        log.info("encoder reference: %s", results["encoder_reference"]["encoders"])
        results["info"] = {key: info.get(key) for key in ("artifact_version", "n_docs", "rerank_modes", "providers",
                                                          "limits", "default_mode")}
        results["info"]["dense_index"] = {key: info.get("indexes", {}).get("dense", {}).get(key)
                                          for key in ("factory", "default_nprobe", "ntotal")}
    results["machine"] = machine_info()
    results["command"] = command_line(__file__, args.argv)
    results["settings"] = {
        "artifact": str(args.artifact), "queries": f"{len(texts)} {args.split} queries of {args.data}",
        "k": args.k, "candidates": args.candidates, "concurrency": list(args.concurrency),
        "max_requests_per_run": args.requests, "max_seconds_per_run": args.max_seconds,
        "warmup_requests_per_mode": args.warmup, "NRS_THREADS": args.threads, "env": extra_env,
        "client": "httpx.AsyncClient in one asyncio process on the same machine (it shares the CPUs); "
                  "its timeout is the server's request_timeout_ms + 10 s",
        "latency": "end-to-end client latency of answered (HTTP 200) requests; stages from timings_ms",
    }
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", type=Path, required=True, help="artifact directory (holds manifest.json)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="BEIR folder with queries.jsonl and qrels/")
    p.add_argument("--split", default="test", help="qrels split whose judged queries are sent")
    p.add_argument("--modes", default=",".join(MODES), type=lambda s: [m for m in s.split(",") if m])
    p.add_argument("--concurrency", default="1,16", type=lambda s: [int(c) for c in s.split(",") if c])
    p.add_argument("--requests", type=int, default=300, help="most requests per (mode, concurrency)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="longest run per (mode, concurrency)")
    p.add_argument("--warmup", type=int, default=5, help="requests per mode before measuring (not recorded)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="NRS_THREADS (ONNX Runtime intra-op threads)")
    p.add_argument("--env", action="append", default=[], metavar="NRS_X=VALUE", help="extra service setting")
    p.add_argument("--live-check", type=int, default=20, help="queries in the live check (0 skips it)")
    p.add_argument("--quality", action=argparse.BooleanOptionalAction, default=True,
                   help="per mode, nDCG@10 of the service's answers to every judged query")
    p.add_argument("--config", type=Path, default=None,
                   help="build config: also compare the live check with the builder's exact search")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "latency.json")
    p.add_argument("--server-log", type=Path, default=None, help="service output (default: a temp file)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown rerank modes {bad}; choose from {list(MODES)}")
    require_artifact(p, args.artifact)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    benchmark_logging()
    args = parse_args(argv)
    results = run_benchmark(args)
    write_json_atomic(args.out, results)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
