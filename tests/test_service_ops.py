"""Operations: readiness, start-up failure, backpressure (429), timeouts (504), dynamic
batching, hot reload under load, logging, and the real server process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.batching import EncodeBatcher
from service.errors import StartupError
from service.metrics import LATENCY_BUCKETS
from service.search import EncodedQueries, SearchEngine
from service.state import ServiceState
from tests.service_fixtures import (
    ServiceArtifacts,
    assert_envelope,
    build_service_artifacts,
    held,
    make_settings,
    metric_value,
    slowed,
    wait_ready,
    wait_until,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_beir, tiny_bert) -> ServiceArtifacts:
    return build_service_artifacts(tmp_path_factory, tiny_beir, tiny_bert)


def service_of(client: TestClient) -> ServiceState:
    return client.app.state.service  # type: ignore[attr-defined]


def version_of(path: Path) -> str:
    return json.loads((path / "manifest.json").read_text())["artifact_version"]


# -- readiness and start-up -----------------------------------------------------------------------
def test_not_ready_until_warmed_up(artifacts, monkeypatch):
    release = threading.Event()
    original = SearchEngine.warmup

    def blocked_warmup(self):
        assert release.wait(10)
        return original(self)

    monkeypatch.setattr(SearchEngine, "warmup", blocked_warmup)
    with TestClient(create_app(make_settings(artifacts.first))) as c:
        assert c.get("/health").status_code == 200
        assert "warming up" in assert_envelope(c.get("/ready"), 503, "not_ready")["message"]
        r = c.post("/search", json={"query": "tumor"})
        assert_envelope(r, 503, "not_ready")
        assert r.headers["retry-after"] == "1"
        assert metric_value(c.get("/metrics").text, "nrs_ready") == 0
        release.set()
        wait_ready(c)
        assert c.post("/search", json={"query": "tumor"}).status_code == 200
        assert metric_value(c.get("/metrics").text, "nrs_ready") == 1


def test_start_refused_on_corrupt_artifact(artifacts, tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(artifacts.first, bad)
    index = bad / "dense" / "index.faiss"
    data = bytearray(index.read_bytes())
    data[len(data) // 2] ^= 0xFF
    index.write_bytes(bytes(data))
    with pytest.raises(StartupError, match=r"checksum mismatch for dense/index\.faiss"):
        with TestClient(create_app(make_settings(bad))):
            pass


def test_start_refused_on_missing_artifact(tmp_path):
    with pytest.raises(StartupError, match="does not exist"):
        with TestClient(create_app(make_settings(tmp_path / "nope"))):
            pass
    (tmp_path / "empty").mkdir()
    with pytest.raises(StartupError, match="manifest.json missing"):
        with TestClient(create_app(make_settings(tmp_path / "empty"))):
            pass


# -- backpressure and timeouts --------------------------------------------------------------------
def test_overload_gives_429_with_retry_after(artifacts, monkeypatch):
    with TestClient(create_app(make_settings(artifacts.first, max_concurrency=1, max_queue=0))) as c:
        wait_ready(c)
        svc = service_of(c)
        assert svc.engine is not None
        monkeypatch.setattr(svc.engine, "retrieve", slowed(svc.engine.retrieve, 0.6))
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(c.post, "/search", json={"query": "tumor"})
            wait_until(lambda: svc._admission is not None and svc._admission.in_flight == 1)
            r = c.post("/search", json={"query": "vaccine"})
            err = assert_envelope(r, 429, "overloaded")
            assert "max_concurrency=1" in err["message"]
            assert int(r.headers["retry-after"]) >= 1
            assert first.result().status_code == 200
        assert c.post("/search", json={"query": "vaccine"}).status_code == 200
        text = c.get("/metrics").text
        assert metric_value(text, "nrs_requests_total", route="/search", status="429", error_type="overloaded") == 1
        # the refusal's server-side time, by status: answered within 50 ms
        assert metric_value(text, "nrs_request_duration_seconds_bucket", route="/search", status="429",
                            le=next(f"{b!r}" for b in LATENCY_BUCKETS if b >= 0.05)) == 1


def test_admission_gate_refuses_before_reading_the_body():
    """Under overload a search request is refused from its headers alone: the body is never
    read (a refusal costs almost nothing) and the app behind the gate never runs. An admitted
    request runs with its reservation, which the gate hands back if no slot took it up."""
    from service.metrics import ServiceMetrics
    from service.middleware import ROUTE_SCOPE_KEY, AdmissionGateMiddleware
    from service.state import RESERVATION, AdmissionControl

    def control(full: bool) -> AdmissionControl:
        out = AdmissionControl(1, 0, ServiceMetrics(), deadline_s=1.0)
        out.in_flight = int(full)  # the one permit taken, no queue: the next request is refused
        return out

    reached: list[tuple[str, object, int]] = []

    async def app(scope, receive, send) -> None:
        r = RESERVATION.get()
        reached.append((scope["path"], r, r.control.waiting if r is not None else -1))

    async def receive():
        raise AssertionError("the gate read the body")

    async def call(control: AdmissionControl | None, method: str, path: str) -> tuple[list[dict], dict]:
        sent: list[dict] = []

        async def send(message) -> None:
            sent.append(message)

        scope = {"type": "http", "method": method, "path": path, "headers": []}
        await AdmissionGateMiddleware(app, admission=lambda: control, paths=("/search", "/search/batch"))(
            scope, receive, send)
        return sent, scope

    sent, scope = asyncio.run(call(control(full=True), "POST", "/search/batch"))
    assert sent[0]["status"] == 429 and any(k == b"retry-after" for k, _ in sent[0]["headers"])
    assert json.loads(sent[1]["body"])["error"]["type"] == "overloaded"
    assert scope[ROUTE_SCOPE_KEY] == "/search/batch" and reached == []
    admitting = control(full=False)
    sent, _ = asyncio.run(call(admitting, "POST", "/search"))
    path, reservation, waiting = reached[-1]
    assert sent == [] and path == "/search" and waiting == 1  # its place counted while the app ran
    assert reservation is not None and reservation.used and admitting.waiting == 0  # handed back after
    for ctl, method, path in ((None, "POST", "/search"), (control(full=True), "GET", "/info"),
                              (control(full=True), "POST", "/admin/reload")):
        sent, _ = asyncio.run(call(ctl, method, path))
        assert sent == [] and reached[-1] == (path, None, -1)


def test_admission_counts_reserved_places_and_slots_take_them_up():
    """A request admitted at the gate holds its place in the queue before its slot: the next
    arrival sees it (max_queue=1: refused); its slot then takes that place up and is not
    refused, whatever arrived meanwhile."""
    from service.errors import Overloaded
    from service.metrics import ServiceMetrics
    from service.state import RESERVATION, AdmissionControl, Reservation

    async def scenario() -> None:
        control = AdmissionControl(1, 1, ServiceMetrics(), deadline_s=10.0)
        control.service_s = 0.1  # as measured
        first, second = control.reserve(), control.reserve()
        assert isinstance(first, Reservation) and isinstance(second, Reservation)
        assert control.waiting == 2 and isinstance(control.reserve(), Overloaded)  # 1 permit + 1 queued
        token = RESERVATION.set(first)
        try:
            async with control.slot():
                assert first.used and control.in_flight == 1 and control.waiting == 1
                assert isinstance(control.refusal(), Overloaded)
                RESERVATION.set(second)
                waiter = asyncio.ensure_future(control.slot().__aenter__())
                await asyncio.sleep(0)
                assert second.used and control.waiting == 1 and not waiter.done()  # waits, not refused
            await waiter
            assert control.in_flight == 1 and control.waiting == 0
        finally:
            RESERVATION.reset(token)
        control.cancel(first)  # taken up already: nothing to hand back
        assert control.waiting == 0

    asyncio.run(scenario())


def test_thread_switch_interval_is_set_at_start(artifacts):
    before = sys.getswitchinterval()
    try:
        with TestClient(create_app(make_settings(artifacts.first, gil_switch_ms=2.0))) as c:
            wait_ready(c)
            assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        sys.setswitchinterval(before)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
@pytest.mark.parametrize("nice", [0, 7])
def test_search_threads_run_below_the_event_loop_priority(artifacts, nice):
    loop_nice = os.getpriority(os.PRIO_PROCESS, 0)
    with TestClient(create_app(make_settings(artifacts.first, worker_nice=nice))) as c:
        wait_ready(c)
        state = service_of(c)
        thread_nice = c.portal.call(state.run_in_thread, os.getpriority, os.PRIO_PROCESS, 0)
        assert thread_nice == min(19, loop_nice + nice)
        assert os.getpriority(os.PRIO_PROCESS, 0) == loop_nice  # the caller's (the loop's) is untouched


def test_queue_admits_up_to_max_queue(artifacts, monkeypatch):
    with TestClient(create_app(make_settings(artifacts.first, max_concurrency=1, max_queue=1))) as c:
        wait_ready(c)
        svc = service_of(c)
        assert svc.engine is not None and svc._admission is not None
        admission = svc._admission
        monkeypatch.setattr(svc.engine, "retrieve", slowed(svc.engine.retrieve, 0.4))
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(c.post, "/search", json={"query": "tumor"})
            wait_until(lambda: admission.in_flight == 1)
            # no service time measured yet: no request may wait
            assert_envelope(c.post("/search", json={"query": "virus"}), 429, "overloaded")
            assert first.result().status_code == 200
            first = pool.submit(c.post, "/search", json={"query": "tumor"})
            wait_until(lambda: admission.in_flight == 1)
            second = pool.submit(c.post, "/search", json={"query": "heart"})
            wait_until(lambda: admission.waiting == 1)
            assert metric_value(c.get("/metrics").text, "nrs_queue_depth") == 1
            assert_envelope(c.post("/search", json={"query": "virus"}), 429, "overloaded")
            assert first.result().status_code == 200 and second.result().status_code == 200


def test_queue_is_bounded_by_the_deadline(artifacts, monkeypatch):
    """With one permit, requests of about 0.5 s (their measured service time ``s``) and a
    deadline whose admitted share (``HEADROOM``) is 3.5 ``s``, two requests may wait (``s + s``
    and ``2s + s`` are within it); the next (``3s + s``) is refused at once instead of timing
    out in the queue."""
    settings = make_settings(artifacts.first, max_concurrency=1, max_queue=64, request_timeout_ms=10_000)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        svc = service_of(c)
        assert svc.engine is not None and svc._admission is not None
        admission = svc._admission
        monkeypatch.setattr(svc.engine, "retrieve", slowed(svc.engine.retrieve, 0.5))
        assert c.post("/search", json={"query": "tumor"}).status_code == 200  # measures the service time
        assert admission.service_s >= 0.45, admission.service_s  # at least the request's own 0.5 s
        admission.deadline_s = 3.5 * admission.service_s / admission.HEADROOM
        deadline_ms = round(admission.deadline_s * 1000)
        with ThreadPoolExecutor(3) as pool:
            running = [pool.submit(c.post, "/search", json={"query": "tumor"})]
            wait_until(lambda: admission.in_flight == 1)
            for n in (1, 2):
                running.append(pool.submit(c.post, "/search", json={"query": f"heart {n}"}))
                wait_until(lambda n=n: admission.waiting == n)
            started = time.perf_counter()
            r = c.post("/search", json={"query": "virus"})
            refused_s = time.perf_counter() - started
            err = assert_envelope(r, 429, "overloaded")
            assert f"of the {deadline_ms} ms deadline" in err["message"] and int(r.headers["retry-after"]) >= 1
            assert refused_s < 0.25  # answered at once, not after waiting
            assert [f.result().status_code for f in running] == [200, 200, 200]


def test_timeout_gives_504(artifacts, monkeypatch):
    with TestClient(create_app(make_settings(artifacts.first, request_timeout_ms=100))) as c:
        wait_ready(c)
        svc = service_of(c)
        assert svc.engine is not None
        monkeypatch.setattr(svc.engine, "retrieve", slowed(svc.engine.retrieve, 0.5))
        started = time.perf_counter()
        r = c.post("/search", json={"query": "tumor"})
        assert time.perf_counter() - started < 0.45
        assert "request_timeout_ms=100" in assert_envelope(r, 504, "timeout")["message"]
        wait_until(lambda: svc._admission is not None and svc._admission.in_flight == 0)


# -- dynamic batching -----------------------------------------------------------------------------
class _FakeEngine:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    def encode(self, kind, texts):
        if self.fail:
            raise ValueError("encoder exploded")
        self.calls.append(list(texts))
        return EncodedQueries(np.array([[float(len(t))] for t in texts], np.float32), 0.1, 0.2)


async def _direct(fn, *args):
    return fn(*args)


def test_batcher_groups_concurrent_requests():
    async def run():
        sizes: list[tuple[str, int]] = []
        b = EncodeBatcher(_direct, max_size=4, max_wait_ms=50, on_batch=lambda k, n: sizes.append((k, n)))
        b.start()
        engine, other = _FakeEngine(), _FakeEngine()
        texts = ["a", "bb", "ccc", "dddd", "eeeee", "ffffff"]
        results = await asyncio.gather(*(b.encode(engine, "dense", [t]) for t in texts[:5]),
                                       b.encode(other, "dense", ["zz"]))
        big = await b.encode(engine, "dense", ["x"] * 9)  # larger than max_size: one batch of its own
        await b.close()
        return engine, other, results, big, sizes

    engine, other, results, big, sizes = asyncio.run(run())
    assert engine.calls[:2] == [["a", "bb", "ccc", "dddd"], ["eeeee"]]
    assert other.calls == [["zz"]]  # another engine's items are never mixed in
    assert [float(r.vectors[0, 0]) for r in results] == [1, 2, 3, 4, 5, 2]
    assert all(r.vectors.shape == (1, 1) for r in results)
    assert big.vectors.shape == (9, 1) and engine.calls[-1] == ["x"] * 9
    assert ("dense", 4) in sizes and ("dense", 9) in sizes


def test_batcher_continuous_batching_without_wait():
    """max_wait_ms=0: a lone request is encoded at once, the requests that arrive while a batch
    is being encoded form the next batch, and one request's dense + ColBERT encodes share a batch."""
    async def run():
        release = asyncio.Event()
        started: list[list[str]] = []

        async def slow(fn, *args):  # the first batch blocks until released
            started.append(list(args[1]))
            if len(started) == 1:
                await release.wait()
            return fn(*args)

        b = EncodeBatcher(slow, max_size=16, max_wait_ms=0)
        b.start()
        engine = _FakeEngine()
        first = asyncio.ensure_future(b.encode(engine, "dense", ["lone"]))
        for _ in range(5):
            await asyncio.sleep(0)
        assert started == [["lone"]]  # encoded without waiting for company
        later = [asyncio.ensure_future(b.encode(engine, "dense", [f"q{i}"])) for i in range(3)]
        pair = asyncio.ensure_future(asyncio.gather(b.encode(engine, "dense", ["both"]),
                                                    b.encode(engine, "colbert", ["both"])))
        for _ in range(5):
            await asyncio.sleep(0)
        release.set()
        await asyncio.gather(first, *later, pair)
        await b.close()
        return started

    started = asyncio.run(run())
    assert started[0] == ["lone"]
    # the queued dense texts form one batch; the same request's ColBERT text is encoded beside it
    assert sorted(map(tuple, started[1:])) == [("both",), ("q0", "q1", "q2", "both")]


def test_batcher_errors_and_cancellation():
    async def run():
        b = EncodeBatcher(_direct, max_size=8, max_wait_ms=20)
        b.start()
        with pytest.raises(ValueError, match="exploded"):
            await b.encode(_FakeEngine(fail=True), "dense", ["q"])
        engine = _FakeEngine()
        gave_up = asyncio.ensure_future(b.encode(engine, "dense", ["cancelled"]))
        await asyncio.sleep(0)
        gave_up.cancel()
        kept = await b.encode(engine, "dense", ["kept"])
        await b.close()
        with pytest.raises(RuntimeError, match="not running"):
            await b.encode(engine, "dense", ["late"])
        return engine, kept

    engine, kept = asyncio.run(run())
    assert kept.vectors.shape == (1, 1)
    assert ["cancelled"] not in engine.calls and any("kept" in c for c in engine.calls)


def test_concurrent_requests_share_encode_batches(artifacts):
    settings = make_settings(artifacts.first, batch_max_wait_ms=50, max_concurrency=8)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        queries = [f"tumor growth {i}" for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda q: c.post("/search", json={"query": q}).status_code, queries))
        assert statuses == [200] * 8
        text = c.get("/metrics").text
        count = metric_value(text, "nrs_encode_batch_size_count", model="dense")
        total = metric_value(text, "nrs_encode_batch_size_sum", model="dense")
        ones = metric_value(text, "nrs_encode_batch_size_bucket", model="dense", le="1.0")
        assert total == 8 and count is not None and ones is not None
        assert ones < count, "no encode batch held more than one query"


# -- hot reload -----------------------------------------------------------------------------------
ADMIN = {"X-API-Key": "admin-s3cret"}


def admin_settings(artifacts: ServiceArtifacts, **overrides):
    """Settings with the admin routes on; reloads may load anything under the test session's
    base temp dir (where both test artifacts and every tmp_path live)."""
    return make_settings(artifacts.first, admin_key=ADMIN["X-API-Key"], artifact_root=artifacts.first.parents[1],
                         **overrides)


def test_hot_reload_under_load(artifacts):
    old, new = version_of(artifacts.first), version_of(artifacts.second)
    assert old != new
    with TestClient(create_app(admin_settings(artifacts, max_queue=256))) as c:
        wait_ready(c)
        stop = threading.Event()
        outcomes: list[tuple[int, str | None]] = []
        lock = threading.Lock()

        def hammer(i: int) -> None:
            modes = ["none", "colbert", "cross-encoder"]
            n = 0
            while not stop.is_set():
                r = c.post("/search", json={"query": f"vaccine trial {n}", "k": 3, "candidates": 10,
                                            "rerank": modes[(i + n) % 3]})
                with lock:
                    outcomes.append((r.status_code, r.json().get("artifact_version")))
                n += 1

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: len(outcomes) >= 8)
        r = c.post("/admin/reload", json={"artifact_dir": str(artifacts.second)}, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert r.json()["artifact_version"] == new and r.json()["previous_artifact_version"] == old
        n_at_swap = len(outcomes)
        wait_until(lambda: len(outcomes) >= n_at_swap + 8)
        stop.set()
        for t in threads:
            t.join()
        statuses = Counter(s for s, _ in outcomes)
        assert statuses == {200: len(outcomes)}, statuses
        versions = [v for _, v in outcomes]
        assert old in versions and versions[-1] == new
        assert c.get("/info").json()["artifact_version"] == new
        assert c.get("/ready").json()["artifact_version"] == new
        text = c.get("/metrics").text
        assert metric_value(text, "nrs_artifact_info", artifact_version=new) == 1
        assert metric_value(text, "nrs_reloads_total", outcome="ok") == 1


def test_in_flight_request_finishes_on_its_engine(artifacts, monkeypatch):
    with TestClient(create_app(admin_settings(artifacts))) as c:
        wait_ready(c)
        svc = service_of(c)
        old_engine = svc.engine
        assert old_engine is not None
        release = threading.Event()
        monkeypatch.setattr(old_engine, "retrieve", held(old_engine.retrieve, release))
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(c.post, "/search", json={"query": "heart"})
            wait_until(lambda: svc._admission is not None and svc._admission.in_flight == 1)
            r = c.post("/admin/reload", json={"artifact_dir": str(artifacts.second)}, headers=ADMIN)
            assert r.status_code == 200
            assert svc.engine is not old_engine and not old_engine.closed  # still in use
            assert c.post("/search", json={"query": "heart"}).json()["artifact_version"] == version_of(artifacts.second)
            release.set()
            assert pending.result().json()["artifact_version"] == version_of(artifacts.first)
        wait_until(lambda: old_engine.closed)  # closed by its last request
        assert old_engine.leases == 0 and not hasattr(old_engine, "dense_index")


def _open_files_under(root: Path) -> int:
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            if str(Path(os.readlink(fd))).startswith(str(root)):
                count += 1
    return count


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to count open files")
def test_reloads_release_the_old_artifact(artifacts):
    """Each reload closes the engine it replaces once no request uses it: the process holds
    the same open files under the artifacts after 12 reloads as after 2."""
    root = artifacts.first.parent
    with TestClient(create_app(admin_settings(artifacts))) as c:
        wait_ready(c)
        svc = service_of(c)
        engines, counts = [], []
        for i in range(12):
            engines.append(svc.engine)
            target = artifacts.second if i % 2 == 0 else artifacts.first
            assert c.post("/admin/reload", json={"artifact_dir": str(target)}, headers=ADMIN).status_code == 200
            assert c.post("/search", json={"query": "tumor", "rerank": "colbert"}).status_code == 200
            counts.append(_open_files_under(root))
        assert all(e is not None and e.closed for e in engines)
        assert counts[-1] <= counts[1], counts


def test_failed_reload_keeps_serving(artifacts, tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    shutil.copytree(artifacts.second, bad)
    (bad / "docs.sqlite").write_bytes(b"garbage")
    with TestClient(create_app(admin_settings(artifacts))) as c:
        wait_ready(c)
        err = assert_envelope(c.post("/admin/reload", json={"artifact_dir": str(bad)}, headers=ADMIN), 422,
                              "invalid_artifact")
        assert "docs.sqlite" in err["message"] and "still serving" in err["message"]
        err = assert_envelope(c.post("/admin/reload", json={"artifact_dir": str(tmp_path / "missing")},
                                     headers=ADMIN), 422)
        assert "does not exist" in err["message"]
        assert c.post("/search", json={"query": "tumor"}).json()["artifact_version"] == version_of(artifacts.first)
        assert metric_value(c.get("/metrics").text, "nrs_reloads_total", outcome="failed") == 2

        # a second reload while one runs is refused with 409
        svc = service_of(c)
        release = threading.Event()
        original = svc._load_and_warm

        def blocked(path):
            assert release.wait(10)
            return original(path)

        monkeypatch.setattr(svc, "_load_and_warm", blocked)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(c.post, "/admin/reload", json={}, headers=ADMIN)
            wait_until(lambda: svc._reload_lock is not None and svc._reload_lock.locked())
            assert_envelope(c.post("/admin/reload", json={}, headers=ADMIN), 409, "reload_in_progress")
            release.set()
            assert first.result().status_code == 200


def test_admin_routes_off_without_admin_key_and_confined_to_the_root(artifacts, tmp_path):
    with TestClient(create_app(make_settings(artifacts.first, api_key="user-key"))) as c:
        wait_ready(c)
        for headers in ({}, {"X-API-Key": "user-key"}):  # the search key does not open admin routes
            err = assert_envelope(c.post("/admin/reload", json={}, headers=headers), 403, "forbidden")
            assert "NRS_ADMIN_KEY" in err["message"]
    outside = tmp_path.parent.parent / "elsewhere"
    with TestClient(create_app(make_settings(artifacts.first, admin_key="adm",
                                             artifact_root=artifacts.first.parent))) as c:
        wait_ready(c)
        assert_envelope(c.post("/admin/reload", json={}), 401, "unauthorized")
        assert_envelope(c.post("/admin/reload", json={}, headers={"Authorization": "Bearer nope"}), 401)
        err = assert_envelope(c.post("/admin/reload", json={"artifact_dir": str(outside)},
                                     headers={"Authorization": "Bearer adm"}), 403, "forbidden")
        assert "outside" in err["message"] and str(artifacts.first.parent) not in err["message"]
        r = c.post("/admin/reload", json={"artifact_dir": str(artifacts.second)},
                   headers={"Authorization": "Bearer adm"})
        assert r.status_code == 200, r.text
        # no server paths where anyone (or any key holder) can read them
        info = c.get("/info").json()
        assert str(artifacts.first.parent) not in json.dumps(info) and info["checksums"]
        assert str(artifacts.first.parent) not in c.get("/metrics").text


# -- logging and import hygiene -------------------------------------------------------------------
def test_access_log_is_one_json_line_per_request(artifacts, caplog):
    from service.logs import JsonFormatter

    with TestClient(create_app(make_settings(artifacts.first, warmup=False))) as c:
        with caplog.at_level(logging.INFO, logger="service.access"):
            c.post("/search", json={"query": " "}, headers={"X-Request-Id": "log-me"})
    records = [r for r in caplog.records if r.name == "service.access" and getattr(r, "request_id", "") == "log-me"]
    assert len(records) == 1
    line = json.loads(JsonFormatter().format(records[0]))
    assert line["request_id"] == "log-me" and line["route"] == "/search" and line["status"] == 422
    assert line["error_type"] == "invalid_request" and line["total_ms"] >= 0 and line["level"] == "info"


def test_pipeline_module_does_not_import_fastapi():
    code = ("import sys, service.search, service.batching, service.state\n"
            "bad = [m for m in ('fastapi', 'torch', 'index_build') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# -- the real server ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_env(artifact_dir: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NRS_")}
    env.update(NRS_ARTIFACT_DIR=str(artifact_dir), NRS_PORT=str(port), NRS_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    return env


def test_server_process_serves_and_stops_cleanly(artifacts):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=_server_env(artifacts.first, port),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                    ready = True
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert ready, proc.stderr.read() if proc.poll() is not None else "not ready in 15 s"
        r = httpx.post(f"{base}/search", json={"query": "tumor growth", "k": 3, "rerank": "colbert"}, timeout=10)
        assert r.status_code == 200 and len(r.json()["hits"]) == 3
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    access = [x for x in lines if x.get("logger") == "service.access" and x.get("route") == "/search"]
    assert access and access[0]["status"] == 200 and access[0]["request_id"]


def test_server_process_exits_non_zero_on_corrupt_artifact(artifacts, tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(artifacts.first, bad)
    (bad / "dense" / "index.faiss").write_bytes(b"not a faiss index")
    proc = subprocess.run([sys.executable, "-m", "service"], cwd=REPO, env=_server_env(bad, _free_port()),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "dense/index.faiss" in proc.stderr
    # one error line that names the problem, no traceback
    errors = [line for line in proc.stderr.splitlines() if json.loads(line)["level"] == "error"]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "dense/index.faiss" in errors[0]


# -- native thread limits ---------------------------------------------------------------------------
def test_entrypoint_limits_native_threads_before_numpy(monkeypatch):
    from service.__main__ import NATIVE_THREAD_VARS, limit_native_threads

    for name in NATIVE_THREAD_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")  # an explicit setting wins
    limit_native_threads(1)
    assert [os.environ[n] for n in NATIVE_THREAD_VARS] == ["1", "3", "1"]
    limit_native_threads(0)  # 0: library defaults, nothing set
    assert os.environ["OPENBLAS_NUM_THREADS"] == "3"
    # the limits only work if NumPy is not loaded before main() sets them
    code = "import sys, service.__main__; print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


ARENA_PROBE = """
import ctypes, ctypes.util, sys, threading
from service.__main__ import limit_malloc_arenas
print(limit_malloc_arenas(int(sys.argv[1])))
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
together = threading.Barrier(8)
def allocate():  # eight threads allocating at once: glibc gives each its own arena, up to the cap
    together.wait()
    held = [libc.malloc(4096) for _ in range(2000)]
    together.wait()
    for p in held:
        libc.free(p)
threads = [threading.Thread(target=allocate) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc.malloc_stats()  # one "Arena N:" block per arena, on stderr
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_entrypoint_caps_malloc_arenas():
    def arenas(cap: int) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", ARENA_PROBE, str(cap)], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parents[1])
        return out.stdout.strip(), sum(line.startswith("Arena ") for line in out.stderr.splitlines())

    assert arenas(2) == ("True", 2)
    capped, uncapped = arenas(0)
    assert capped == "False" and uncapped > 2


def test_lone_request_splits_its_colbert_rerank(artifacts, monkeypatch):
    """rerank_threads=2: a request alone in flight gets the rerank helper pool; one that
    overlaps another request reranks on its own thread; the scores are the same."""
    settings = make_settings(artifacts.first, rerank_threads=2, max_concurrency=4)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        svc = service_of(c)
        engine = svc.engine
        assert engine is not None
        body = {"query": "tumor suppressor genes", "rerank": "colbert", "k": 5}
        serial = engine.search(body["query"], rerank="colbert", k=5)
        calls: list[tuple[str, bool]] = []
        original = engine.retrieve

        def recording(queries, opts, dense=None, colbert=None, rerank_executor=None):
            calls.append((queries[0], rerank_executor is not None))
            return original(queries, opts, dense, colbert, rerank_executor)

        monkeypatch.setattr(engine, "retrieve", recording)
        r = c.post("/search", json=body)
        assert r.status_code == 200 and calls == [(body["query"], True)]
        assert [h["id"] for h in r.json()["hits"]] == [h.id for h in serial.hits]
        np.testing.assert_allclose([h["score"] for h in r.json()["hits"]], [h.score for h in serial.hits], rtol=1e-5)

        calls.clear()
        monkeypatch.setattr(engine, "retrieve", slowed(recording, 0.5))
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(c.post, "/search", json={**body, "query": "first"})
            wait_until(lambda: len(calls) == 0 and svc._admission is not None and svc._admission.in_flight == 1)
            time.sleep(0.1)  # the first request is inside the slowed retrieve (decided alone)
            second = c.post("/search", json={**body, "query": "second"})
            assert first.result().status_code == 200 and second.status_code == 200
        assert sorted(calls) == [("first", True), ("second", False)]

    with TestClient(create_app(make_settings(artifacts.first, rerank_threads=1))) as c:
        wait_ready(c)
        assert service_of(c)._rerank_executor is None
        assert c.post("/search", json=body).status_code == 200


def test_python_m_service_help_and_unknown_arguments():
    """``python -m service --help`` explains the NRS_* settings and exits 0 without starting;
    any other argument is refused (exit 2) rather than ignored."""
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("NRS_")}
    ok = subprocess.run([sys.executable, "-m", "service", "--help"], capture_output=True, text=True, env=env,
                        timeout=60)
    assert ok.returncode == 0 and "NRS_ARTIFACT_DIR" in ok.stdout and "NRS_DEFAULT_FIRST_STAGE" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "service", "--port", "3"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert bad.returncode == 2 and "takes no arguments" in bad.stderr
