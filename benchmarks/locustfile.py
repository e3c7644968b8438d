"""Locust workload for the search service: used by ``benchmarks/load.py`` (one machine, no
Docker) and by the ``locust`` service of ``docker-compose.yml`` (profile ``load``).

Only the standard library and locust are imported, so the stock ``locustio/locust`` image
runs it. Everything is configured from the environment:

``LOCUST_QUERIES``      a BEIR ``queries.jsonl`` (one ``{"_id", "text"}`` per line); required
``LOCUST_MIX``          weighted modes, ``none:3,colbert:5,cross-encoder:1,default:1`` (default ``none:1``;
                       ``default``: requests that name no mode)
``LOCUST_BATCH_SHARE``  share of requests sent to ``/search/batch`` (default 0)
``LOCUST_BATCH_SIZE``   queries per ``/search/batch`` request (default 8)
``LOCUST_K``            hits per query (default 10)
``LOCUST_CANDIDATES``   first-stage depth for ``none`` / ``colbert`` (default 100)
``LOCUST_CE_CANDIDATES`` first-stage depth for ``cross-encoder`` (default 100, the server's cap)
``LOCUST_USER_RPS``     requests per second per user (``constant_throughput``); 0 = back to back
``LOCUST_API_KEY``      sent as ``X-API-Key`` when the service requires one
``LOCUST_RETRY_AFTER``  ``1`` (default): a user told to back off (429 or 503 with ``Retry-After``)
                        waits that long (at most 10 s) before its next request, as a
                        well-behaved client does; ``0``: it retries at once
``LOCUST_SAMPLES``      when set, every request's ``[start, mode, route, status, ms, stages]`` is
                        written there as JSON lines when the test stops (read by
                        ``benchmarks/load.py``); ``stages`` is the server's ``timings_ms`` of an
                        accepted answer (``{"encode": ms, "ann": ms, ...}``), else null
``LOCUST_SEED``         random seed (default 0)

Stats are named per route and mode (``/search [colbert]``, ``/search/batch [none]``);
answers other than 200 are reported as failures (``HTTP 429``) under their own name
(``/search [colbert] HTTP 429``), so the percentiles of each mode's row cover accepted
requests only.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from locust import FastHttpUser, constant, constant_throughput, events, task

#: rerank modes after the dense first stage, and ``default``: no mode named (the artifact's served default)
MODES = ("none", "colbert", "cross-encoder", "default")


def parse_mix(text: str) -> list[tuple[str, float]]:
    """``"none:3,colbert:5"`` -> ``[("none", 3.0), ("colbert", 5.0)]``; a mode without a
    weight counts 1; zero weights are dropped.

    >>> parse_mix("none:3, colbert:5,cross-encoder:1")
    [('none', 3.0), ('colbert', 5.0), ('cross-encoder', 1.0)]
    >>> parse_mix("colbert")
    [('colbert', 1.0)]
    """
    out: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        mode, _, weight = part.partition(":")
        mode = mode.strip()
        if mode not in MODES:
            raise ValueError(f"LOCUST_MIX: unknown rerank mode {mode!r} in {text!r}; expected one of {MODES}")
        try:
            w = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ValueError(f"LOCUST_MIX: weight {weight!r} of {mode!r} is not a number") from None
        if w < 0:
            raise ValueError(f"LOCUST_MIX: weight of {mode!r} is negative")
        if w > 0:
            out[mode] = out.get(mode, 0.0) + w
    if not out:
        raise ValueError(f"LOCUST_MIX={text!r} gives no mode a positive weight")
    return list(out.items())


def load_queries(path: Path) -> list[str]:
    """Query texts of a BEIR ``queries.jsonl``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LOCUST_QUERIES: {path} not found")
    texts = []
    with path.open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a BEIR query line ({exc})") from None
    if not texts:
        raise ValueError(f"{path}: no queries")
    return texts


@dataclass(frozen=True)
class Workload:
    """The request mix, read from the ``LOCUST_*`` environment (see the module docstring)."""

    queries: list[str]
    mix: list[tuple[str, float]]
    k: int = 10
    candidates: int = 100
    ce_candidates: int = 100
    batch_share: float = 0.0
    batch_size: int = 8
    user_rps: float = 0.0
    api_key: str = ""
    honour_retry_after: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Workload:
        if not env.get("LOCUST_QUERIES"):
            raise ValueError("set LOCUST_QUERIES to a BEIR queries.jsonl")
        share = float(env.get("LOCUST_BATCH_SHARE", "0") or 0)
        if not 0 <= share <= 1:
            raise ValueError(f"LOCUST_BATCH_SHARE={share} is outside [0, 1]")
        return cls(
            queries=load_queries(Path(env["LOCUST_QUERIES"])),
            mix=parse_mix(env.get("LOCUST_MIX", "none:1") or "none:1"),
            k=int(env.get("LOCUST_K", "10") or 10),
            candidates=int(env.get("LOCUST_CANDIDATES", "100") or 100),
            ce_candidates=int(env.get("LOCUST_CE_CANDIDATES", "100") or 100),
            batch_share=share,
            batch_size=max(1, int(env.get("LOCUST_BATCH_SIZE", "8") or 8)),
            user_rps=float(env.get("LOCUST_USER_RPS", "0") or 0),
            api_key=env.get("LOCUST_API_KEY", ""),
            honour_retry_after=(env.get("LOCUST_RETRY_AFTER", "1") or "1") != "0",
        )

    def candidates_for(self, mode: str) -> int:
        return self.ce_candidates if mode == "cross-encoder" else self.candidates

    def request(self, rng: random.Random) -> tuple[str, str, dict[str, Any]]:
        """``(route, mode, body)`` of the next request."""
        modes, weights = zip(*self.mix)
        mode = rng.choices(modes, weights=weights)[0]
        body: dict[str, Any] = {"k": self.k}
        if mode != "default":
            body.update(rerank=mode, first_stage="dense", candidates=self.candidates_for(mode))
        if self.batch_share > 0 and rng.random() < self.batch_share:
            body["queries"] = rng.sample(self.queries, min(self.batch_size, len(self.queries)))
            return "/search/batch", mode, body
        body["query"] = rng.choice(self.queries)
        return "/search", mode, body


#: the longest ``Retry-After`` a user honours
MAX_BACKOFF_S = 10.0


def retry_after_s(value: str | None) -> float:
    """Seconds to wait for a ``Retry-After`` header in seconds (0 when absent or an HTTP date).

    >>> retry_after_s("2"), retry_after_s(None), retry_after_s("60")
    (2.0, 0.0, 10.0)
    """
    try:
        return min(max(float(value or 0), 0.0), MAX_BACKOFF_S)
    except ValueError:
        return 0.0


def stage_timings(response: Any) -> dict[str, float] | None:
    """The server's per-stage ``timings_ms`` of a JSON answer (stages that ran), else None."""
    try:
        timings = json.loads(response.content).get("timings_ms")
    except (AttributeError, TypeError, ValueError):
        return None
    if not isinstance(timings, dict):
        return None
    return {k: float(v) for k, v in timings.items() if isinstance(v, (int, float)) and v > 0}


class SampleLog:
    """Every request's ``[start, mode, route, status, ms, stages]``, written as JSON lines at test stop."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rows: list[list[Any]] = []

    def on_request(self, response_time: float, start_time: float | None = None, response: Any = None,
                   context: Mapping[str, Any] | None = None, **_: Any) -> None:
        ctx = context or {}
        status = int(getattr(response, "status_code", 0) or 0)
        self.rows.append([start_time or time.time(), ctx.get("mode", ""), ctx.get("route", ""), status,
                          round(float(response_time), 3), stage_timings(response) if status == 200 else None])

    def on_test_stop(self, **_: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w") as f:
            for row in self.rows:
                f.write(json.dumps(row) + "\n")
        tmp.replace(self.path)


@events.init.add_listener
def _on_init(environment: Any, **_: Any) -> None:
    SearchUser.workload = Workload.from_env(os.environ)
    if os.environ.get("LOCUST_SAMPLES"):
        samples = SampleLog(Path(os.environ["LOCUST_SAMPLES"]))
        environment.events.request.add_listener(samples.on_request)
        environment.events.test_stop.add_listener(samples.on_test_stop)


class SearchUser(FastHttpUser):
    """Sends ``/search`` (and a share of ``/search/batch``) requests with the configured mix.

    ``FastHttpUser`` (geventhttpclient) spends several times less CPU per request than
    ``HttpUser`` (python-requests): on one machine the load generator takes less of the
    CPU that the server under test needs."""

    workload: ClassVar[Workload | None] = None

    def on_start(self) -> None:
        if self.workload is None:
            raise RuntimeError("the locustfile's init hook did not run (LOCUST_QUERIES missing?)")
        seed = int(os.environ.get("LOCUST_SEED", "0") or 0)
        self.rng = random.Random(f"{seed}-{id(self)}")
        rps = self.workload.user_rps
        self._wait: Callable[[FastHttpUser], float] = constant_throughput(rps) if rps > 0 else constant(0)
        self.headers = {"X-API-Key": self.workload.api_key} if self.workload.api_key else {}
        self.backoff_s = 0.0

    def wait_time(self) -> float:
        wait, self.backoff_s = max(self._wait(self), self.backoff_s), 0.0
        return wait

    @task
    def search(self) -> None:
        assert self.workload is not None
        route, mode, body = self.workload.request(self.rng)
        name = f"{route} [{mode}]"
        with self.client.post(route, json=body, headers=self.headers, name=name, catch_response=True,
                              context={"mode": mode, "route": route}) as resp:
            if resp.status_code == 200:
                resp.success()
            else:
                resp.request_meta["name"] = f"{name} HTTP {resp.status_code}"
                if self.workload.honour_retry_after:
                    self.backoff_s = retry_after_s(resp.headers.get("Retry-After"))
                resp.failure(f"HTTP {resp.status_code}")
