"""Load tests with locust on one machine, without Docker: the topology of
``docker-compose.yml`` (``api`` + ``locust``), all on 127.0.0.1.

Run from the repository root once the SciFact artifact (and the builder's work dir, for the
baseline) exist::

    # service vs baseline at the same p99 budget, then a soak and an overload run
    .venv/bin/python benchmarks/load.py --artifact artifacts/scifact --compare
    # the service alone: a user-count sweep only
    .venv/bin/python benchmarks/load.py --artifact artifacts/scifact --only sweep

The service is ``python -m service``: one process (uvicorn, one event loop, a thread pool
for the CPU work; it has no multi-worker mode, so it runs one process; scale out with
compose replicas). Each phase starts a fresh server, runs ``locust --headless`` as a
subprocess with ``benchmarks/locustfile.py`` for a bounded time, samples the server's CPU
and RSS with psutil every 0.5 s, and summarizes the per-request samples the locustfile
writes (``LOCUST_SAMPLES``); locust's own CSV and HTML reports go to ``--locust-dir``.

Phases:

``sweep``
    Closed-loop users (no think time) at each ``--users`` level for ``--step-seconds``;
    stops at the first level whose p99 is over ``--p99-budget-ms``. ``qps_at_p99_budget``
    is the best throughput of a level within the budget and without errors.
``soak``
    ``--soak-seconds`` at the sustainable user count (the level that gave
    ``qps_at_p99_budget``): zero errors expected, RSS at start and end.
``overload``
    ``--overload-factor`` times the sustainable throughput offered with
    ``constant_throughput`` users, against a server with a small ``NRS_MAX_QUEUE``
    (``--overload-max-queue``): expect fast 429s and no 5xx; reports the 429 and 5xx
    counts and the p99 of accepted requests.

With ``--compare`` the sweep runs against the service and against
``benchmarks/baseline_service.py`` (the torch students behind a plain FastAPI app, flat
FAISS, float32 ColBERT vectors) under the same locust load, and the results go to
``benchmarks/results/load.json``: ``service`` / ``baseline`` (``qps_at_p99_budget``,
``p99_budget_ms``, ``p50_ms``, ``p99_ms``, ``errors``, ``rss_bytes``,
``stages_at_p99_budget``: p50/p95/p99 of each server-reported stage, ...), ``ratio_qps``,
``ratios`` (QPS, RSS, end-to-end and per-stage p50/p99: :func:`compare_targets`), ``soak``,
``overload`` and ``aims`` (whether each target of the issue was met).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.latency import (  # noqa: E402
    DEFAULT_DATA,
    REPO,
    RESULTS_DIR,
    ServerProcess,
    benchmark_logging,
    command_line,
    free_port,
    latency_summary,
    machine_info,
    require_artifact,
    service_env,
    write_json_atomic,
)
from service.settings import PERMITS_PER_CORE, available_cores  # noqa: E402

log = logging.getLogger("benchmarks.load")

LOCUSTFILE = REPO / "benchmarks" / "locustfile.py"
BASELINE = REPO / "benchmarks" / "baseline_service.py"
PHASES = ("sweep", "soak", "overload")
PHASE_KEYS = {"sweep": "service", "soak": "soak", "overload": "overload"}  # phase -> its key in the summary
#: Targets of the deployment issue.
AIM_QPS_RATIO = 3.0


# ------------------------------------------------------------------------------------ samples
@dataclass
class RequestSample:
    """One locust request as the locustfile logs it."""

    start: float
    mode: str
    route: str
    status: int
    ms: float
    stages: dict[str, float] | None = None  # the server's timings_ms (accepted answers)


def read_samples(path: Path) -> list[RequestSample]:
    """The JSON lines written by the locustfile's ``SampleLog``."""
    out = []
    with Path(path).open() as f:
        for line in f:
            if line.strip():
                start, mode, route, status, ms, *rest = json.loads(line)
                stages = rest[0] if rest and isinstance(rest[0], dict) else None
                out.append(RequestSample(float(start), str(mode), str(route), int(status), float(ms), stages))
    return out


def summarize_samples(samples: Sequence[RequestSample], warmup_s: float = 0.0) -> dict[str, Any]:
    """Throughput and latency of the accepted (200) requests, overall and per mode, and the
    non-200 answers by status. Requests that started in the first ``warmup_s`` seconds are
    left out; throughput is over the remaining window (first to last start).

    >>> rows = [RequestSample(float(i), "colbert", "/search", 200, 10.0 + i) for i in range(11)]
    >>> rows.append(RequestSample(5.5, "colbert", "/search", 429, 1.0))
    >>> s = summarize_samples(rows, warmup_s=1.0)
    >>> s["requests"], s["accepted"], s["errors_by_status"], s["qps"], s["p50_ms"], s["rejected"]["p99_ms"]
    (11, 10, {'429': 1}, 1.111, 15.5, 1.0)
    """
    if not samples:
        return {"requests": 0, "accepted": 0, "qps": 0.0, "errors": 0, "errors_by_status": {}, "errors_5xx": 0,
                "window_s": 0.0, **latency_summary([]), "per_mode": {}, "rejected": latency_summary([])}
    t0 = min(s.start for s in samples) + warmup_s
    kept = [s for s in samples if s.start >= t0]
    window = max((max(s.start for s in kept) - t0) if kept else 0.0, 1e-9)
    ok = [s for s in kept if s.status == 200]
    errors = Counter(str(s.status) for s in kept if s.status != 200)
    per_mode: dict[str, Any] = {}
    for key in sorted({f"{s.route} [{s.mode}]" for s in kept}):
        rows = [s for s in ok if f"{s.route} [{s.mode}]" == key]
        per_mode[key] = {**latency_summary([s.ms for s in rows]), "accepted": len(rows),
                         "qps": round(len(rows) / window, 3),
                         "errors": sum(1 for s in kept if f"{s.route} [{s.mode}]" == key and s.status != 200)}
    return {
        "requests": len(kept), "accepted": len(ok), "qps": round(len(ok) / window, 3),
        "offered_rps": round(len(kept) / window, 3), "window_s": round(window, 3),
        **latency_summary([s.ms for s in ok]),
        "errors": sum(errors.values()), "errors_by_status": dict(sorted(errors.items())),
        "errors_5xx": sum(n for status, n in errors.items() if status.startswith("5")),
        "errors_no_response": errors.get("0", 0),
        "per_mode": per_mode,
        "stages": stage_summary(ok),
        "rejected": latency_summary([s.ms for s in kept if s.status == 429]),
    }


def stage_summary(samples: Sequence[RequestSample]) -> dict[str, Any]:
    """p50 / p95 / p99 of each server-reported stage over ``samples`` that report it.

    >>> rows = [RequestSample(0.0, "colbert", "/search", 200, 9.0, {"encode": 2.0, "rerank": 1.0 + i})
    ...         for i in range(5)]
    >>> s = stage_summary(rows)
    >>> sorted(s), s["rerank"]["p50_ms"], s["encode"]["p99_ms"]
    (['encode', 'rerank'], 3.0, 2.0)
    """
    names = sorted({name for s in samples if s.stages for name in s.stages})
    return {name: latency_summary([s.stages[name] for s in samples if s.stages and name in s.stages])
            for name in names}


def best_level(levels: Sequence[Mapping[str, Any]], budget_ms: float) -> Mapping[str, Any] | None:
    """The sweep level with the highest throughput whose p99 is within ``budget_ms`` and
    that had no errors (``None`` if no level qualifies).

    >>> lv = [{"users": 1, "qps": 10, "p99_ms": 50, "errors": 0}, {"users": 4, "qps": 30, "p99_ms": 90, "errors": 0},
    ...       {"users": 8, "qps": 35, "p99_ms": 400, "errors": 0}]
    >>> best_level(lv, 100)["users"]
    4
    """
    ok = [lv for lv in levels if lv.get("p99_ms") is not None and lv["p99_ms"] <= budget_ms and not lv["errors"]]
    return max(ok, key=lambda lv: lv["qps"]) if ok else None


# ------------------------------------------------------------------------------------ resources
@dataclass
class ResourceSampler:
    """Samples a process's CPU (% of one core, summed over its threads) and RSS in a thread."""

    pid: int
    interval_s: float = 0.5
    cpu: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)

    def _run(self) -> None:
        import psutil

        proc = psutil.Process(self.pid)
        proc.cpu_percent(None)
        while not self._stop.wait(self.interval_s):
            try:
                self.cpu.append(proc.cpu_percent(None))
                self.rss.append(int(proc.memory_info().rss))
            except psutil.Error:
                return

    def __enter__(self) -> ResourceSampler:
        import psutil

        try:
            self.rss.append(int(psutil.Process(self.pid).memory_info().rss))
        except psutil.Error:
            pass
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def summary(self) -> dict[str, Any]:
        cpu = self.cpu or [0.0]
        return {
            "cpu_percent_mean": round(sum(cpu) / len(cpu), 1), "cpu_percent_max": round(max(cpu), 1),
            "rss_start": self.rss[0] if self.rss else None, "rss_end": self.rss[-1] if self.rss else None,
            "rss_max": max(self.rss) if self.rss else None,
        }


# ------------------------------------------------------------------------------------ locust
@dataclass
class Workload:
    """What locust sends (``LOCUST_*`` variables of the locustfile)."""

    queries: Path
    mix: str = "colbert:1"
    k: int = 10
    candidates: int = 100
    batch_share: float = 0.0
    seed: int = 0
    honour_retry_after: bool = True  # a refused user waits the answer's Retry-After

    def env(self) -> dict[str, str]:
        return {"LOCUST_QUERIES": str(self.queries), "LOCUST_MIX": self.mix, "LOCUST_K": str(self.k),
                "LOCUST_CANDIDATES": str(self.candidates), "LOCUST_CE_CANDIDATES": str(min(self.candidates, 100)),
                "LOCUST_BATCH_SHARE": str(self.batch_share), "LOCUST_SEED": str(self.seed),
                "LOCUST_RETRY_AFTER": "1" if self.honour_retry_after else "0"}


def locust_argv(host: str, users: int, seconds: float, csv_prefix: Path, spawn_rate: float | None = None) -> list[str]:
    """The headless locust command (loopback hosts only)."""
    if not host.startswith(("http://127.0.0.1:", "http://localhost:")):
        raise ValueError(f"load.py only targets loopback servers, not {host}")
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users),
            "-r", str(spawn_rate or users), "-t", f"{max(1, round(seconds))}s", "--host", host,
            "--csv", str(csv_prefix), "--html", f"{csv_prefix}.html", "--only-summary", "--stop-timeout", "10",
            "--exit-code-on-error", "0", "--loglevel", "WARNING"]


def run_locust(server: ServerProcess, workload: Workload, *, users: int, seconds: float, out_dir: Path, name: str,
               warmup_s: float, user_rps: float = 0.0) -> dict[str, Any]:
    """One bounded locust run against ``server``; the summary of its samples plus the
    server's CPU and RSS over the run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_path = out_dir / f"{name}.samples.jsonl"
    samples_path.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCUST_", "NRS_"))}
    env.update(workload.env(), LOCUST_SAMPLES=str(samples_path), LOCUST_USER_RPS=str(user_rps))
    argv = locust_argv(server.base_url, users, seconds, out_dir / name)
    log.info("locust %s: %d users for %.0f s%s", name, users, seconds,
             f" at {user_rps:.2f} req/s each" if user_rps else "")
    with ResourceSampler(server.pid) as sampler:
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=seconds + 120)
    if not samples_path.is_file():
        raise RuntimeError(f"locust {name} wrote no samples (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = summarize_samples(read_samples(samples_path), warmup_s=warmup_s)
    summary.update(users=users, seconds=seconds, user_rps=user_rps or None, server=sampler.summary())
    log.info("%s: %s accepted req/s, p50 %s ms, p99 %s ms, errors %s, server CPU %s%%, RSS %s MiB", name,
             summary["qps"], summary["p50_ms"], summary["p99_ms"], summary["errors_by_status"],
             summary["server"]["cpu_percent_mean"], (summary["server"]["rss_max"] or 0) >> 20)
    return summary


# ------------------------------------------------------------------------------------ servers
def service_settings(args: argparse.Namespace) -> dict[str, str]:
    """The ``--env NRS_X=VALUE`` settings every service run of this benchmark gets."""
    out = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("NRS_"):
            raise SystemExit(f"--env {item!r}: expected NRS_X=VALUE")
        out[key] = value
    return out


@contextmanager
def start_target(target: str, args: argparse.Namespace, *, extra_env: Mapping[str, str] | None = None,
                 tag: str = "") -> Iterator[ServerProcess]:
    """The service (``python -m service``) or the baseline app on a free loopback port."""
    port = free_port()
    log_path = args.locust_dir / f"{target}{tag}.server.log"
    if target == "service":
        env = service_env(args.artifact, port, args.threads, {"NRS_MAX_CONCURRENCY": str(args.max_concurrency),
                                                               **service_settings(args), **(extra_env or {})})
        argv = [sys.executable, "-m", "service"]
    elif target == "baseline":
        env = {k: v for k, v in os.environ.items() if not k.startswith("NRS_")}
        env.update(OMP_NUM_THREADS=str(max(1, args.threads)),
                   PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p))
        argv = [sys.executable, str(BASELINE), "--config", str(args.config), "--port", str(port),
                "--threads", str(args.threads), *[f"--set={s}" for s in args.set]]
    else:
        raise ValueError(f"unknown target {target!r}")
    server = ServerProcess(argv, env, port, log_path, name=target)
    with server:
        server.start(args.ready_timeout)
        yield server


def sweep(target: str, args: argparse.Namespace, workload: Workload) -> dict[str, Any]:
    """User-count sweep of one target; stops at the first level over the p99 budget."""
    levels: list[dict[str, Any]] = []
    with start_target(target, args) as server:
        for users in args.users:
            level = run_locust(server, workload, users=users, seconds=args.step_seconds, out_dir=args.locust_dir,
                               name=f"{target}-sweep-u{users}", warmup_s=args.warmup_s)
            levels.append(level)
            if level["p99_ms"] is None or level["p99_ms"] > args.p99_budget_ms:
                break
    best = best_level(levels, args.p99_budget_ms)
    rss = max((lv["server"]["rss_max"] or 0) for lv in levels) if levels else None
    out: dict[str, Any] = {
        "qps_at_p99_budget": best["qps"] if best else None,
        "p99_budget_ms": args.p99_budget_ms,
        "users_at_p99_budget": best["users"] if best else None,
        "p50_ms": best["p50_ms"] if best else None,
        "p99_ms": best["p99_ms"] if best else None,
        "errors": sum(lv["errors"] for lv in levels),
        "rss_bytes": rss,
        "cpu_percent_at_p99_budget": best["server"]["cpu_percent_mean"] if best else None,
        "stages_at_p99_budget": best["stages"] if best else None,
        "sweep": [_level_row(lv) for lv in levels],
    }
    return out


def _level_row(level: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("users", "qps", "p50_ms", "p95_ms", "p99_ms", "requests", "errors", "errors_by_status", "per_mode",
            "stages")
    return {**{k: level.get(k) for k in keys}, "server": level["server"]}


def soak(args: argparse.Namespace, workload: Workload, users: int) -> dict[str, Any]:
    with start_target("service", args, tag="-soak") as server:
        s = run_locust(server, workload, users=users, seconds=args.soak_seconds, out_dir=args.locust_dir,
                       name="service-soak", warmup_s=0.0)
    return {"duration_s": args.soak_seconds, "users": users, "requests": s["requests"], "accepted": s["accepted"],
            "errors": s["errors"], "errors_5xx": s["errors_5xx"], "errors_by_status": s["errors_by_status"],
            "qps": s["qps"], "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"],
            "rss_start": s["server"]["rss_start"], "rss_end": s["server"]["rss_end"],
            "rss_max": s["server"]["rss_max"], "cpu_percent_mean": s["server"]["cpu_percent_mean"]}


def overload(args: argparse.Namespace, workload: Workload, qps: float, users: int) -> dict[str, Any]:
    """``overload_factor`` x ``qps`` offered by ``constant_throughput`` users."""
    target_rps = args.overload_factor * qps
    # closed-loop users hold at most one request each: more users than the service's slots plus
    # its queue are needed before admission control can answer 429 at all
    slots = args.max_concurrency + args.overload_max_queue
    n_users = max(int(round(args.overload_factor * users)), args.overload_min_users,
                  int(math.ceil(args.overload_factor * slots)))
    extra = {"NRS_MAX_QUEUE": str(args.overload_max_queue)}
    with start_target("service", args, extra_env=extra, tag="-overload") as server:
        s = run_locust(server, workload, users=n_users, seconds=args.overload_seconds, out_dir=args.locust_dir,
                       name="service-overload", warmup_s=args.warmup_s, user_rps=target_rps / n_users)
    return {
        "offered_load": {"factor": args.overload_factor, "sustainable_qps": qps, "target_rps": round(target_rps, 3),
                         "achieved_rps": s["offered_rps"], "users": n_users},
        "max_queue": args.overload_max_queue, "max_concurrency": args.max_concurrency,
        "duration_s": args.overload_seconds, "requests": s["requests"], "accepted": s["accepted"],
        "429": s["errors_by_status"].get("429", 0), "5xx": s["errors_5xx"],
        "errors_by_status": s["errors_by_status"],
        "accepted_p50_ms": s["p50_ms"], "accepted_p99_ms": s["p99_ms"], "accepted_qps": s["qps"],
        "rejected_p50_ms": s["rejected"]["p50_ms"], "rejected_p99_ms": s["rejected"]["p99_ms"],
        "server": s["server"],
    }


def _speedup(baseline: float | None, service: float | None) -> float | None:
    return round(baseline / service, 3) if baseline and service else None


def _latency_ratios(service: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, Any]:
    stages = {}
    for name in sorted(set(service.get("stages") or {}) & set(baseline.get("stages") or {})):
        s, b = service["stages"][name], baseline["stages"][name]
        stages[name] = {q: _speedup(b.get(f"{q}_ms"), s.get(f"{q}_ms")) for q in ("p50", "p99")}
    return {"p50": _speedup(baseline.get("p50_ms"), service.get("p50_ms")),
            "p99": _speedup(baseline.get("p99_ms"), service.get("p99_ms")), "stages": stages}


def compare_targets(service: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, Any]:
    """Service vs baseline from two sweeps: QPS at the p99 budget (service / baseline), RSS and
    latencies as baseline / service (how many times less the service needs), end to end and
    per server-reported stage, at each one's best level within the budget and at the largest
    user count both sweeps ran.

    >>> lv = lambda u, p50, enc: {"users": u, "p50_ms": p50, "p99_ms": 2 * p50, "stages": {"encode": {
    ...     "p50_ms": enc, "p99_ms": 2 * enc}}}
    >>> svc = {"qps_at_p99_budget": 90.0, "rss_bytes": 100, "sweep": [lv(1, 10, 2), lv(2, 12, 3)]}
    >>> base = {"qps_at_p99_budget": 30.0, "rss_bytes": 300, "sweep": [lv(1, 30, 12), lv(2, 60, 24)]}
    >>> svc.update(p50_ms=12, p99_ms=24, stages_at_p99_budget=svc["sweep"][1]["stages"])
    >>> base.update(p50_ms=30, p99_ms=60, stages_at_p99_budget=base["sweep"][0]["stages"])
    >>> r = compare_targets(svc, base)
    >>> r["qps"], r["rss"], r["at_p99_budget"]["p50"], r["at_same_users"]["users"], r["at_same_users"]["stages"]
    (3.0, 3.0, 2.5, 2, {'encode': {'p50': 8.0, 'p99': 8.0}})
    """
    out: dict[str, Any] = {
        "definition": "qps: service / baseline; rss and latencies: baseline / service",
        "qps": _speedup(service.get("qps_at_p99_budget"), baseline.get("qps_at_p99_budget")),
        "rss": _speedup(baseline.get("rss_bytes"), service.get("rss_bytes")),
        "at_p99_budget": _latency_ratios(
            {"p50_ms": service.get("p50_ms"), "p99_ms": service.get("p99_ms"),
             "stages": service.get("stages_at_p99_budget")},
            {"p50_ms": baseline.get("p50_ms"), "p99_ms": baseline.get("p99_ms"),
             "stages": baseline.get("stages_at_p99_budget")}),
    }
    s_levels = {lv["users"]: lv for lv in service.get("sweep", [])}
    b_levels = {lv["users"]: lv for lv in baseline.get("sweep", [])}
    common = sorted(set(s_levels) & set(b_levels))
    if common:
        users = common[-1]
        out["at_same_users"] = {"users": users, **_latency_ratios(s_levels[users], b_levels[users])}
    return out


# ------------------------------------------------------------------------------------ main
def run(args: argparse.Namespace, previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The phases in ``args.only``; ``previous`` (an earlier summary) supplies the sweep's
    sustainable rate when the sweep is not rerun."""
    workload = Workload(args.queries, mix=args.mix, k=args.k, candidates=args.candidates,
                        batch_share=args.batch_share)
    out: dict[str, Any] = {}
    targets = ["service", "baseline"] if args.compare else [args.target]
    if "sweep" in args.only:
        for target in targets:
            out[target] = sweep(target, args, workload)
    if args.compare and out.get("service", {}).get("qps_at_p99_budget") and out.get("baseline", {}).get(
            "qps_at_p99_budget"):
        out["ratios"] = compare_targets(out["service"], out["baseline"])
        out["ratio_qps"] = out["ratios"]["qps"]
    svc = out.get("service") or (previous or {}).get("service", {})
    users = svc.get("users_at_p99_budget") or args.fallback_users
    qps = svc.get("qps_at_p99_budget")
    if "soak" in args.only and args.soak_seconds > 0 and "service" in targets:
        out["soak"] = soak(args, workload, users)
    if "overload" in args.only and args.overload_seconds > 0 and "service" in targets:
        if qps is None:  # no sweep (or nothing within budget): measure the sustainable rate now
            with start_target("service", args, tag="-probe") as server:
                probe = run_locust(server, workload, users=users, seconds=args.step_seconds,
                                   out_dir=args.locust_dir, name="service-probe", warmup_s=args.warmup_s)
            qps = probe["qps"]
        out["overload"] = overload(args, workload, qps, users)
    out["aims"] = aims(out)
    out["workload"] = {"mix": args.mix, "k": args.k, "candidates": args.candidates, "batch_share": args.batch_share,
                       "queries": str(args.queries), "users": args.users, "step_seconds": args.step_seconds,
                       "warmup_s": args.warmup_s, "think_time": "none (closed loop) except in the overload run"}
    out["settings"] = {"artifact": str(args.artifact), "baseline_config": str(args.config), "threads": args.threads,
                       "NRS_MAX_CONCURRENCY": args.max_concurrency, "NRS_MAX_QUEUE (overload)": args.overload_max_queue,
                       "service_processes": 1, "env": service_settings(args)}
    out["notes"] = [
        "python -m service is one process (uvicorn, one event loop, a thread pool for CPU work); it has no "
        "multi-worker mode, so one process ran here; scale out with compose replicas.",
        "locust, the server and (in --compare) the baseline ran one after another on the same machine; "
        "locust shares the CPUs with the server under test.",
        "latencies are locust's client-side times of accepted (HTTP 200) requests; qps counts accepted requests.",
    ]
    out["machine"] = machine_info()
    out["command"] = command_line(__file__, args.argv)
    return out


def aims(out: Mapping[str, Any]) -> dict[str, Any]:
    """The issue's targets, on the phases that ran."""
    res: dict[str, Any] = {}
    if "ratio_qps" in out:
        res["qps_ratio_at_same_p99_budget"] = {"target": f">= {AIM_QPS_RATIO}x the baseline",
                                               "value": out["ratio_qps"], "met": out["ratio_qps"] >= AIM_QPS_RATIO}
    if "soak" in out:
        res["soak_zero_errors"] = {"target": "no errors during the soak", "value": out["soak"]["errors"],
                                   "met": out["soak"]["errors"] == 0}
    if "overload" in out:
        o = out["overload"]
        res["overload_fast_429_no_5xx"] = {
            "target": "429s (fast) and no 5xx under overload", "429": o["429"], "5xx": o["5xx"],
            "rejected_p99_ms": o["rejected_p99_ms"], "met": bool(o["429"] > 0 and o["5xx"] == 0),
        }
    return res


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    def ints(s: str) -> list[int]:
        return [int(x) for x in s.split(",") if x.strip()]

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", type=Path, required=True, help="artifact directory (holds manifest.json)")
    p.add_argument("--compare", action="store_true", help="sweep the service and the baseline, then soak and overload")
    p.add_argument("--target", choices=("service", "baseline"), default="service", help="without --compare")
    p.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], default=list(PHASES),
                   help=f"phases to run, from {','.join(PHASES)}")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "scifact.toml", help="baseline build config")
    p.add_argument("--set", action="append", default=[], help="baseline build config override key=value")
    p.add_argument("--queries", type=Path, default=DEFAULT_DATA / "queries.jsonl", help="LOCUST_QUERIES")
    p.add_argument("--mix", default="colbert:1", help="LOCUST_MIX, e.g. none:3,colbert:5,cross-encoder:1")
    p.add_argument("--batch-share", type=float, default=0.0, help="LOCUST_BATCH_SHARE (the baseline has no batch)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--users", type=ints, default=[1, 2, 4, 8, 16], help="sweep levels")
    p.add_argument("--step-seconds", type=float, default=20.0, help="duration of each sweep level")
    p.add_argument("--warmup-s", type=float, default=3.0, help="left out at the start of each run")
    p.add_argument("--p99-budget-ms", type=float, default=250.0)
    p.add_argument("--fallback-users", type=int, default=4, help="soak/overload users when no sweep ran")
    p.add_argument("--soak-seconds", type=float, default=300.0, help="0 skips the soak")
    p.add_argument("--overload-seconds", type=float, default=30.0, help="0 skips the overload run")
    p.add_argument("--overload-factor", type=float, default=3.0)
    p.add_argument("--overload-max-queue", type=int, default=4, help="NRS_MAX_QUEUE of the overload run")
    p.add_argument("--overload-min-users", type=int, default=12)
    p.add_argument("--threads", type=int, default=1, help="NRS_THREADS of the service, torch threads of the baseline")
    p.add_argument("--max-concurrency", type=int, default=0,
                   help="NRS_MAX_CONCURRENCY (0: the service's default, two per core)")
    p.add_argument("--env", action="append", default=[], metavar="NRS_X=VALUE",
                   help="extra service setting for every service run, e.g. NRS_USE_INT8=true")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds a server may take to get ready")
    p.add_argument("--locust-dir", type=Path, default=RESULTS_DIR / "locust", help="locust CSV/HTML and server logs")
    p.add_argument("--out", type=Path, default=None,
                   help="summary JSON (default: benchmarks/results/load.json with --compare, else load-<target>.json)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    # the effective permits: the overload phase sizes its users from them, the summary records them
    args.max_concurrency = args.max_concurrency or PERMITS_PER_CORE * available_cores()
    bad = [x for x in args.only if x not in PHASES]
    if bad:
        p.error(f"unknown phases {bad}; choose from {list(PHASES)}")
    require_artifact(p, args.artifact)
    if not args.queries.is_file():
        p.error(f"{args.queries}: queries file not found")
    if args.out is None:
        args.out = RESULTS_DIR / ("load.json" if args.compare else f"load-{args.target}.json")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    benchmark_logging()
    args = parse_args(argv)
    started = time.perf_counter()
    partial = set(args.only) != set(PHASES)
    previous = json.loads(args.out.read_text()) if partial and args.out.is_file() else None
    out = run(args, previous)
    out["wall_s"] = round(time.perf_counter() - started, 1)
    if previous is not None:
        # a rerun of some phases: keep the other phases' results and say which command made what
        ran_before = {ph: previous.get("command") for ph, key in PHASE_KEYS.items() if key in previous}
        commands = dict(previous.get("commands") or ran_before)
        commands.update({ph: out["command"] for ph in args.only})
        merged = {**previous, **{k: v for k, v in out.items() if k not in {"command", "wall_s"}}}
        merged["aims"] = aims(merged)
        merged["commands"] = commands
        out = merged
    write_json_atomic(args.out, out)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
