"""Overload and reload-under-load check of the real service; writes
``benchmarks/results/overload.json``.

    .venv/bin/python benchmarks/overload.py --artifact artifacts/labelfree-scifact

Three phases, each on a fresh ``python -m service`` on loopback with its default admission
settings (``NRS_MAX_CONCURRENCY``, ``NRS_MAX_QUEUE``, ``NRS_REQUEST_TIMEOUT_MS``), driven by
locust through ``benchmarks/load.py``'s helpers:

1. **sweep**: closed-loop users at each ``--users`` level for ``--step-seconds``; the best
   throughput, and the capacity: the most users served with no refusal and p99 within the
   request deadline (``--deadline-ms``, given to every server as ``NRS_REQUEST_TIMEOUT_MS``).
2. **overload**: ``--factor`` times the capacity, closed loop, for ``--seconds``; a refused
   user waits the 429's ``Retry-After`` before its next request, as well-behaved clients do
   (``--ignore-retry-after``: it retries at once). The
   server-side time of its 429 answers comes from the service's own histogram
   (``nrs_request_duration_seconds{route="/search",status="429"}``, scraped from ``/metrics``
   before and after the run; the p99 is the upper bound of the bucket that holds it).
3. **reloads**: ``--reloads`` hot reloads of the same artifact (``POST /admin/reload``) while
   ``--reload-users`` closed-loop clients search; the server's RSS after the first reloads and
   after the last (``rss_growth``, a fraction: the median of ``--settled-reads`` readings at
   each end, since the searches running beside a reading move it by tens of MiB), each read
   ``--settle-s`` after the reload answered (the replaced engine is closed when its last
   search ends, and its memory handed back by the admin thread after that: read at once, RSS
   may still hold both engines), the RSS right after each reload (``rss_mib``, the trend),
   and every search answer's status.

``aims`` says whether each target was met: 429 p99 server-side <= 10 ms, accepted p99 <= the
deadline, no 5xx, overload QPS >= 0.9 x the sweep's best, ``rss_growth`` <= 0.10, no failed
search during the reloads.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.latency import (  # noqa: E402
    DEFAULT_DATA,
    RESULTS_DIR,
    benchmark_logging,
    command_line,
    machine_info,
    require_artifact,
    write_json_atomic,
)
from benchmarks.load import Workload, run_locust, start_target, sweep  # noqa: E402

log = logging.getLogger("benchmarks.overload")

ADMIN_KEY = "overload-check"
AIM_429_P99_MS = 10.0
AIM_QPS_SHARE = 0.9
AIM_RSS_GROWTH = 0.10


# ------------------------------------------------------------------------------------ /metrics
def histogram_buckets(text: str, name: str, labels: Mapping[str, str]) -> dict[float, float]:
    """Cumulative counts by upper bound (``le``) of histogram ``name`` for the series whose
    labels include ``labels``, from a Prometheus text exposition.

    >>> text = 'h_bucket{route="/s",status="429",le="0.001"} 3.0\\nh_bucket{route="/s",status="429",le="+Inf"} 4.0'
    >>> histogram_buckets(text, "h", {"status": "429"})
    {0.001: 3.0, inf: 4.0}
    """
    out: dict[float, float] = {}
    for line in text.splitlines():
        if not line.startswith(f"{name}_bucket{{"):
            continue
        body, value = line[len(name) + 8 :].rsplit("} ", 1)
        found = dict(re.findall(r'(\w+)="([^"]*)"', body))
        if all(found.get(k) == v for k, v in labels.items()):
            le = found["le"]
            out[float("inf") if le == "+Inf" else float(le)] = out.get(float("inf") if le == "+Inf" else float(le),
                                                                        0.0) + float(value)
    return out


def bucket_quantile(before: Mapping[float, float], after: Mapping[float, float], q: float) -> tuple[float | None, int]:
    """The upper bound of the bucket holding quantile ``q`` of the observations made between
    two scrapes of one histogram, and how many there were.

    >>> bucket_quantile({0.001: 1, 0.01: 1, float("inf"): 1}, {0.001: 91, 0.01: 101, float("inf"): 101}, 0.99)
    (0.01, 100)
    """
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return None, 0
    for bound, cumulative in zip(bounds, counts):
        if cumulative >= q * total:
            return bound, int(total)
    return bounds[-1], int(total)


def scrape(base_url: str) -> str:
    return httpx.get(f"{base_url}/metrics", timeout=10).text


# ------------------------------------------------------------------------------------ phases
def overload_run(args: argparse.Namespace, workload: Workload, users: int) -> dict[str, Any]:
    """``users`` closed-loop clients for ``args.seconds`` against a fresh service."""
    with start_target("service", args, tag="-overload-check") as server:
        limits = httpx.get(f"{server.base_url}/info", timeout=10).json()["limits"]
        before = histogram_buckets(scrape(server.base_url), "nrs_request_duration_seconds",
                                   {"route": "/search", "status": "429"})
        s = run_locust(server, workload, users=users, seconds=args.seconds, out_dir=args.locust_dir,
                       name="service-overload-check", warmup_s=args.warmup_s)
        after = histogram_buckets(scrape(server.base_url), "nrs_request_duration_seconds",
                                  {"route": "/search", "status": "429"})
    p99_429, n_429 = bucket_quantile(before, after, 0.99)
    aim_s = AIM_429_P99_MS / 1000.0
    within = after.get(aim_s, 0.0) - before.get(aim_s, 0.0)
    return {
        "users": users, "duration_s": args.seconds, "requests": s["requests"], "accepted": s["accepted"],
        "qps": s["qps"], "share_429": round(s["errors_by_status"].get("429", 0) / max(1, s["requests"]), 4),
        "errors_by_status": s["errors_by_status"], "errors_5xx": s["errors_5xx"],
        "accepted_p50_ms": s["p50_ms"], "accepted_p99_ms": s["p99_ms"],
        "p99_429_server_ms": None if p99_429 is None else round(p99_429 * 1000.0, 3),
        "answers_429_server_side": n_429,
        "share_429_server_within_aim": round(within / n_429, 4) if n_429 else None,
        "p99_429_client_ms": s["rejected"]["p99_ms"],
        "deadline_ms": limits["request_timeout_ms"], "max_concurrency": limits["max_concurrency"],
        "max_queue": limits["max_queue"], "server": s["server"],
    }


def reloads_under_load(args: argparse.Namespace, queries: Sequence[str]) -> dict[str, Any]:
    """``args.reloads`` reloads while ``args.reload_users`` clients search in a closed loop."""
    import psutil

    statuses: Counter[str] = Counter()
    stop = threading.Event()

    def client(base_url: str, offset: int) -> None:
        with httpx.Client(timeout=60) as http:
            i = offset
            while not stop.is_set():
                try:
                    r = http.post(f"{base_url}/search", json={"query": queries[i % len(queries)], "k": 10})
                    statuses[str(r.status_code)] += 1
                except httpx.HTTPError as e:
                    statuses[type(e).__name__] += 1
                i += args.reload_users

    with start_target("service", args, extra_env={"NRS_ADMIN_KEY": ADMIN_KEY}, tag="-reloads") as server:
        proc = psutil.Process(server.pid)
        threads = [threading.Thread(target=client, args=(server.base_url, k), daemon=True)
                   for k in range(args.reload_users)]
        for t in threads:
            t.start()
        reload_ms: list[float] = []
        rss: list[int] = []
        settled: list[int] = []
        failed_reloads = 0
        ends = max(1, min(args.settled_reads, args.reloads // 2))  # settled readings at each end
        started = time.perf_counter()
        with httpx.Client(timeout=600, headers={"X-API-Key": ADMIN_KEY}) as admin:
            for n in range(args.reloads):
                t0 = time.perf_counter()
                r = admin.post(f"{server.base_url}/admin/reload")
                reload_ms.append((time.perf_counter() - t0) * 1000.0)
                failed_reloads += r.status_code != 200
                rss.append(int(proc.memory_info().rss))
                if n < ends or n >= args.reloads - ends:
                    time.sleep(args.settle_s)
                    settled.append(int(proc.memory_info().rss))
        stop.set()
        for t in threads:
            t.join(timeout=120)
        wall = time.perf_counter() - started
    answered = sum(statuses.values())
    first, last = int(statistics.median(settled[:ends])), int(statistics.median(settled[-ends:]))
    return {
        "reloads": args.reloads, "failed_reloads": failed_reloads, "clients": args.reload_users,
        "searches": answered, "searches_by_status": dict(sorted(statuses.items())),
        "failed_searches": answered - statuses.get("200", 0),
        "settle_s": args.settle_s,
        # the median settled RSS after the first reloads and after the last ones
        "rss_after_first_reload": first, "rss_after_last_reload": last, "rss_max": max(rss),
        "rss_growth": round((last - first) / first, 4),
        "rss_settled_mib": [round(x / 2**20) for x in settled],
        "rss_mib": [round(x / 2**20) for x in rss],
        "reload_ms": {"p50": round(sorted(reload_ms)[len(reload_ms) // 2], 1), "max": round(max(reload_ms), 1)},
        "wall_s": round(wall, 1),
    }


def aims(out: Mapping[str, Any]) -> dict[str, Any]:
    o, r, best = out["overload"], out["reloads"], out["sweep"]["qps_at_p99_budget"]
    return {
        "p99_429_server_ms": {"target": f"<= {AIM_429_P99_MS}", "value": o["p99_429_server_ms"],
                              "met": o["p99_429_server_ms"] is not None and o["p99_429_server_ms"] <= AIM_429_P99_MS},
        "accepted_p99_within_deadline": {"target": f"<= {o['deadline_ms']} ms", "value": o["accepted_p99_ms"],
                                         "met": o["accepted_p99_ms"] is not None
                                         and o["accepted_p99_ms"] <= o["deadline_ms"]},
        "errors_5xx": {"target": 0, "value": o["errors_5xx"], "met": o["errors_5xx"] == 0},
        "qps_under_overload": {"target": f">= {AIM_QPS_SHARE} x {best}", "value": o["qps"],
                               "met": bool(best) and o["qps"] >= AIM_QPS_SHARE * best},
        "rss_growth": {"target": f"<= {AIM_RSS_GROWTH}", "value": r["rss_growth"],
                       "met": r["rss_growth"] <= AIM_RSS_GROWTH},
        "failed_searches_during_reloads": {"target": 0, "value": r["failed_searches"] + r["failed_reloads"],
                                           "met": r["failed_searches"] + r["failed_reloads"] == 0},
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", type=Path, required=True, help="artifact directory (holds manifest.json)")
    p.add_argument("--queries", type=Path, default=DEFAULT_DATA / "queries.jsonl", help="LOCUST_QUERIES")
    p.add_argument("--mix", default="default:1", help="LOCUST_MIX (default: requests that name no mode)")
    p.add_argument("--users", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--deadline-ms", type=float, default=250.0, help="NRS_REQUEST_TIMEOUT_MS of every server")
    p.add_argument("--step-seconds", type=float, default=20.0, help="duration of each sweep level")
    p.add_argument("--factor", type=float, default=4.0, help="overload users = factor x the sweep's capacity")
    p.add_argument("--seconds", type=float, default=60.0, help="duration of the overload run")
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument("--reloads", type=int, default=100)
    p.add_argument("--reload-users", type=int, default=2, help="clients searching during the reloads")
    p.add_argument("--settled-reads", type=int, default=3,
                   help="settled RSS readings after the first and after the last reloads (their medians compared)")
    p.add_argument("--settle-s", type=float, default=2.0,
                   help="wait after the first and the last reload before reading the RSS compared")
    p.add_argument("--threads", type=int, default=1, help="NRS_THREADS")
    p.add_argument("--max-concurrency", type=int, default=0,
                   help="NRS_MAX_CONCURRENCY (0: the service's default, two per core)")
    p.add_argument("--ignore-retry-after", action="store_true",
                   help="overloaded users retry at once instead of waiting the 429's Retry-After")
    p.add_argument("--env", action="append", default=[], metavar="NRS_X=VALUE", help="extra service setting")
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("--locust-dir", type=Path, default=RESULTS_DIR / "locust-overload")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "overload.json")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.env = [*args.env, f"NRS_REQUEST_TIMEOUT_MS={args.deadline_ms:g}"]
    args.p99_budget_ms = args.deadline_ms  # the sweep's p99 budget
    require_artifact(p, args.artifact)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    benchmark_logging()
    args = parse_args(argv)
    started = time.perf_counter()
    workload = Workload(args.queries, mix=args.mix, honour_retry_after=not args.ignore_retry_after)
    swept = sweep("service", args, workload)
    served = [lv["users"] for lv in swept["sweep"] if not lv["errors"] and (lv["p99_ms"] or 0) <= args.deadline_ms]
    swept["capacity_users"] = max(served, default=args.users[0])
    out: dict[str, Any] = {"sweep": swept}
    out["overload"] = overload_run(args, workload, int(round(args.factor * swept["capacity_users"])))
    queries = [json.loads(line)["text"] for line in args.queries.read_text().splitlines() if line.strip()]
    out["reloads"] = reloads_under_load(args, queries)
    out["aims"] = aims(out)
    out["settings"] = {"artifact": str(args.artifact), "mix": args.mix, "threads": args.threads,
                       "deadline_ms": args.deadline_ms,
                       "NRS_MAX_CONCURRENCY": args.max_concurrency or out["overload"]["max_concurrency"],
                       "env": args.env, "factor": args.factor,
                       "client": "locust (sweep, overload) and httpx threads (reloads) on the same machine",
                       "refused_clients": "retry at once" if args.ignore_retry_after
                       else "wait the 429's Retry-After (at most 10 s), as well-behaved clients do"}
    out["machine"] = machine_info()
    out["command"] = command_line(__file__, args.argv)
    out["wall_s"] = round(time.perf_counter() - started, 1)
    write_json_atomic(args.out, out)
    log.info("wrote %s: %s", args.out, {k: v["met"] for k, v in out["aims"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
