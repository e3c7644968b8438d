"""Per-app runtime state and the asynchronous side of serving (no FastAPI import).

:class:`ServiceState` lives on ``app.state.service``. It owns the current
:class:`~service.search.SearchEngine` (one reference, swapped atomically by a hot reload),
the CPU thread pool, the encode batcher, admission control (bounded concurrency and wait
queue), readiness, the metrics and the optional query log. A request takes the engine
reference once when it starts and finishes on that engine even if a reload swaps in another
meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import gc
import logging
import math
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from models.artifacts import ArtifactError
from models.retrieval import QueryModel, StageTimings
from service.batching import EncodeBatcher
from service.errors import (
    Forbidden,
    InvalidArtifact,
    InvalidRequest,
    NotReady,
    Overloaded,
    ReloadInProgress,
    RequestTimeout,
    StartupError,
)
from service.metrics import ServiceMetrics
from service.native import libc
from service.query_log import QueryLog
from service.search import (
    EncodedQueries,
    SearchEngine,
    SearchOptions,
    SearchResult,
    colbert_queries,
    first_stage_queries,
    validate_query,
)
from service.settings import Settings

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Reservation:
    """A place in the wait queue that :meth:`AdmissionControl.reserve` gave a request at the
    admission gate, before its body was read; the request's :meth:`AdmissionControl.slot`
    takes it up (``used``), or the gate hands it back when the request ends before that (a
    bad body, a client that left)."""

    control: AdmissionControl
    used: bool = False


#: the reservation the admission gate made for the request this task serves (None: no gate)
RESERVATION: contextvars.ContextVar[Reservation | None] = contextvars.ContextVar("nrs_reservation", default=None)


class AdmissionControl:
    """At most ``max_concurrency`` requests run at once; the others wait for a permit, but
    only as many as can still be served within the deadline.

    The time a request holds its permit is tracked as a moving average (``service_s``). A
    request that arrives when ``max_concurrency`` admitted requests are ahead of it is refused
    at once with :class:`Overloaded` (429, ``Retry-After`` the expected wait) when
    ``max_queue`` requests already wait, or when its expected wait (``position * service_s /
    max_concurrency``) plus its own service time would pass :data:`HEADROOM` of
    ``deadline_s``: the rest of the deadline absorbs the spread of service times around their
    mean, so that an admitted request is answered rather than timed out (504) after it has
    used a slot. Until the first request has held a permit the service time is unknown and no
    request waits (a burst at start-up would otherwise be queued without bound but
    ``max_queue``).

    The decision is made once, at the admission gate, before the request's body is read
    (:meth:`reserve`): an admitted request holds its place in the queue from then on, so the
    requests that arrive while it is read and validated count it, and it is not refused later,
    after it has cost the server a body read and a validation (a refusal there would also wait
    behind whatever the event loop runs meanwhile)."""

    #: weight of the newest service time in the moving average
    SMOOTHING = 0.2
    #: share of the deadline that a request's expected wait and service may take
    HEADROOM = 0.5

    def __init__(self, max_concurrency: int, max_queue: int, metrics: ServiceMetrics, deadline_s: float) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.deadline_s = deadline_s
        self._metrics = metrics
        self._sem = asyncio.Semaphore(max_concurrency)
        #: admitted requests without a permit yet (reserved at the gate, or waiting for one)
        self.waiting = 0
        self.in_flight = 0
        self.service_s = 0.0

    def expected_wait_s(self, position: int) -> float:
        """Expected wait of the ``position``-th request in the queue (1 = next)."""
        return position * self.service_s / self.max_concurrency

    def _observe(self, held_s: float) -> None:
        a = self.SMOOTHING
        self.service_s = held_s if self.service_s == 0.0 else (1 - a) * self.service_s + a * held_s

    def _set_waiting(self, change: int) -> None:
        self.waiting += change
        self._metrics.queue_depth.set(self.waiting)

    def refusal(self) -> Overloaded | None:
        """The :class:`Overloaded` error a request arriving now gets, or None when it may
        wait for a permit. Cheap (a few comparisons)."""
        position = self.in_flight + self.waiting - self.max_concurrency + 1
        if position <= 0:
            return None
        wait_s = self.expected_wait_s(position)
        measured = self.service_s > 0.0  # until a request has held a permit, none may wait for one
        if measured and position <= self.max_queue and wait_s + self.service_s <= self.HEADROOM * self.deadline_s:
            return None
        return Overloaded(
            f"server busy: {self.in_flight} requests in flight and {self.waiting} waiting "
            f"(max_concurrency={self.max_concurrency}, max_queue={self.max_queue}); a new request "
            f"would wait about {wait_s * 1000:.0f} ms and take {self.service_s * 1000:.0f} ms, more than "
            f"{self.HEADROOM:.0%} of the {self.deadline_s * 1000:.0f} ms deadline; retry later",
            retry_after_s=math.ceil(wait_s),
        )

    def reserve(self) -> Reservation | Overloaded:
        """Admit a request at the gate (a place in the queue, held until its :meth:`slot`
        or :meth:`cancel`), or the refusal it gets."""
        refused = self.refusal()
        if refused is not None:
            return refused
        self._set_waiting(+1)
        return Reservation(self)

    def cancel(self, reservation: Reservation) -> None:
        """Hand back a reservation that no :meth:`slot` took up."""
        if not reservation.used:
            reservation.used = True
            self._set_waiting(-1)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Hold a permit for the ``async with`` block; yields the ms spent waiting for it.
        A request the gate admitted (:data:`RESERVATION`) waits in the place it reserved;
        any other is admitted or refused now."""
        reservation = RESERVATION.get()
        if reservation is None or reservation.control is not self or reservation.used:
            admitted = self.reserve()
            if isinstance(admitted, Overloaded):
                raise admitted
            reservation = admitted
        reservation.used = True  # its counted place in the queue is now this wait
        started = time.perf_counter()
        try:
            await self._sem.acquire()
        finally:
            self._set_waiting(-1)
        self.in_flight += 1
        self._metrics.in_flight.set(self.in_flight)
        held_from = time.perf_counter()
        try:
            yield (held_from - started) * 1000.0
        finally:
            self._observe(time.perf_counter() - held_from)
            self.in_flight -= 1
            self._metrics.in_flight.set(self.in_flight)
            self._sem.release()


def release_memory() -> None:
    """Collect unreachable objects, then return the C heap's free pages to the system
    (glibc ``malloc_trim``; a no-op elsewhere). ONNX Runtime, FAISS and NumPy free a closed
    engine's buffers into the heap, where the allocator would otherwise keep them."""
    gc.collect()
    c = libc()
    if c is not None and hasattr(c, "malloc_trim"):
        c.malloc_trim(0)


@dataclass
class BatchOutcome:
    """Results of one ``/search`` or ``/search/batch`` request and its request-level timings."""

    results: list[SearchResult]
    timings: StageTimings
    engine: SearchEngine
    queries: list[str]  # the texts searched (cleaned), one per result


def merge_timings(parts: Sequence[StageTimings], total_ms: float) -> StageTimings:
    """Request-level timings of a batch: shared stages (queue, tokenize, encode, ann) once,
    per-query stages (sparse, rerank, fetch) summed."""
    if not parts:
        return StageTimings(total=total_ms)
    first = parts[0]
    return StageTimings(
        queue=first.queue, tokenize=first.tokenize, encode=first.encode, ann=first.ann,
        sparse=sum(p.sparse for p in parts), rerank=sum(p.rerank for p in parts),
        fetch=sum(p.fetch for p in parts), total=total_ms,
    )


def lower_thread_priority(by: int) -> None:
    """Raise the calling thread's nice value by ``by`` (Linux keeps one per thread; a thread
    made afterwards by this one inherits it). Where that is not possible (another OS, a limit
    reached) the thread keeps its priority."""
    if by <= 0 or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except OSError as exc:
        logger.warning("search threads keep the event loop's CPU priority: %s", exc)


class ServiceState:
    """Everything one app serves with; see the module docstring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = ServiceMetrics()
        self.engine: SearchEngine | None = None
        self.artifact_dir = Path(settings.artifact_dir)
        self.ready = False
        self.not_ready_reason = "artifacts are loading"
        self._executor: ThreadPoolExecutor | None = None
        self._admin_executor: ThreadPoolExecutor | None = None
        self._rerank_executor: ThreadPoolExecutor | None = None
        self._admission: AdmissionControl | None = None
        self._reload_lock: asyncio.Lock | None = None
        self._warmup_task: asyncio.Task[None] | None = None
        self.query_log: QueryLog | None = None
        self.batcher = EncodeBatcher(
            self.run_in_thread, max_size=settings.batch_max_size, max_wait_ms=settings.batch_max_wait_ms,
            on_batch=lambda kind, n: self.metrics.batch_size.labels(kind).observe(n),
        )

    @property
    def admission(self) -> AdmissionControl | None:
        """Admission control (None before :meth:`start`)."""
        return self._admission

    # -- threads ----------------------------------------------------------------------------------
    async def run_in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking CPU work in the search thread pool (never on the event loop). Work on
        an engine (a bound method of a :class:`SearchEngine`) leases that engine until the
        thread is done, even when the awaiting request gave up meanwhile."""
        if self._executor is None:
            raise RuntimeError("the service is not started")
        loop = asyncio.get_running_loop()
        engine = getattr(fn, "__self__", None)
        if not isinstance(engine, SearchEngine):
            return await loop.run_in_executor(self._executor, functools.partial(fn, *args))
        self._lease(engine)
        job = self._executor.submit(fn, *args)
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release, engine))
        return await asyncio.wrap_future(job)

    # -- engine lifetime --------------------------------------------------------------------------
    def _lease(self, engine: SearchEngine) -> None:
        engine.leases += 1

    def _release(self, engine: SearchEngine) -> None:
        """End one lease; a replaced engine is closed when its last lease ends."""
        engine.leases -= 1
        if engine.leases == 0 and engine is not self.engine:
            self._retire(engine)

    def _retire(self, engine: SearchEngine) -> None:
        """Close a replaced engine, then hand the memory it held back to the system (in the
        admin thread: a collection and a heap trim take milliseconds)."""
        engine.close()
        if self._admin_executor is not None:
            self._admin_executor.submit(release_memory)

    async def _run_admin(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._admin_executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._admin_executor, functools.partial(fn, *args))

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Create the pools and the batcher, load and verify the artifact (raises
        :class:`StartupError` naming the problem), then warm up in the background."""
        s = self.settings
        sys.setswitchinterval(s.gil_switch_ms / 1000.0)
        niced = functools.partial(lower_thread_priority, s.worker_nice)
        self._executor = ThreadPoolExecutor(max_workers=s.cpu_workers, thread_name_prefix="nrs-cpu",
                                            initializer=niced)
        # artifacts load here: ONNX Runtime's own intra-op threads (threads > 1) inherit its priority
        self._admin_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nrs-admin", initializer=niced)
        if s.rerank_threads > 1:  # helpers of a lone request's ColBERT rerank (see Settings.rerank_threads)
            self._rerank_executor = ThreadPoolExecutor(max_workers=s.rerank_threads - 1,
                                                       thread_name_prefix="nrs-rerank", initializer=niced)
        self._admission = AdmissionControl(s.max_concurrency, s.max_queue, self.metrics, s.request_timeout_s)
        self._reload_lock = asyncio.Lock()
        if s.query_log_path is not None:
            self.query_log = QueryLog(s.query_log_path, sample=s.query_log_sample,
                                      max_bytes=int(s.query_log_max_mb * (1 << 20)), backups=s.query_log_backups,
                                      counter=self.metrics.query_log_lines)
            try:
                self.query_log.start()
            except OSError as exc:
                raise StartupError(f"cannot start: query_log_path {s.query_log_path} is not writable: {exc}") from exc
        self.batcher.start()
        try:
            engine = await self._run_admin(SearchEngine.load, self.artifact_dir, s)
        except ArtifactError as exc:
            raise StartupError(f"cannot start: artifact {self.artifact_dir} is not usable: {exc}") from exc
        self._install(engine, self.artifact_dir)
        if s.warmup:
            self.not_ready_reason = "warming up"
            self._warmup_task = asyncio.get_running_loop().create_task(self._warmup(engine), name="warmup")
        else:
            self._set_ready(True)

    async def _warmup(self, engine: SearchEngine) -> None:
        try:
            modes = await self._run_admin(engine.warmup)
        except Exception as exc:  # the engine cannot answer queries: stay unready, say why
            logger.exception("warm-up failed; the service stays unready")
            self.not_ready_reason = f"warm-up failed: {type(exc).__name__}: {exc}"
            return
        logger.info("warm-up done", extra={"warmup_ms": modes})
        if self.engine is engine:
            self._set_ready(True)

    async def stop(self) -> None:
        """Stop the batcher and the pools, close the engine."""
        self._set_ready(False)
        if self._warmup_task is not None:
            self._warmup_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._warmup_task
        await self.batcher.close()
        for pool in (self._executor, self._admin_executor, self._rerank_executor):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        if self.engine is not None:
            self.engine.close()
        if self.query_log is not None:
            self.query_log.close()

    def _set_ready(self, ready: bool) -> None:
        self.ready = ready
        self.metrics.ready.set(1 if ready else 0)

    def _install(self, engine: SearchEngine, artifact_dir: Path) -> None:
        self.engine = engine  # one reference assignment: requests see the old or the new engine
        self.artifact_dir = artifact_dir
        dense = engine.manifest.indexes.get("dense", {})
        self.metrics.set_artifact(
            {"artifact_version": engine.artifact_version,
             "dense_factory": str(dense.get("factory", "")), "rerank_modes": ",".join(engine.rerank_modes()),
             "created_at": engine.manifest.created_at},
            engine.n_docs,
        )

    # -- engine access ----------------------------------------------------------------------------
    def ready_engine(self) -> SearchEngine:
        """The engine to serve a search with, or :class:`NotReady` (503)."""
        engine = self.engine
        if engine is None or not self.ready:
            raise NotReady(f"the service is not ready: {self.not_ready_reason}")
        return engine

    def loaded_engine(self) -> SearchEngine:
        """The loaded engine (warm-up may still run), or :class:`NotReady`."""
        engine = self.engine
        if engine is None:
            raise NotReady(f"the service is not ready: {self.not_ready_reason}")
        return engine

    # -- search -----------------------------------------------------------------------------------
    async def search(self, queries: Sequence[str], options: dict[str, Any], request_id: str = "") -> BatchOutcome:
        """Validate, admit, encode (batched), retrieve, all under ``request_timeout_ms``; the
        answered queries go to the query log when one is set.

        On a timeout the caller gets :class:`RequestTimeout` at once and the permit is
        released; CPU work already running in a thread finishes in the background and is
        discarded.
        """
        started = time.perf_counter()
        engine = self.ready_engine()
        self._lease(engine)  # the engine stays open until this request is done with it
        try:
            outcome = await self._search_on(engine, queries, options, started)
        finally:
            self._release(engine)
        if self.query_log is not None:
            first = outcome.results[0]
            self.query_log.record(outcome.queries, request_id, artifact_version=first.artifact_version,
                                  first_stage=first.first_stage, rerank=first.rerank)
        return outcome

    async def _search_on(
        self, engine: SearchEngine, queries: Sequence[str], options: dict[str, Any], started: float
    ) -> BatchOutcome:
        s = self.settings
        if not queries:
            raise InvalidRequest("queries must not be empty")
        if len(queries) > s.max_batch_queries:
            raise InvalidRequest(f"{len(queries)} queries in one batch; the maximum is {s.max_batch_queries}")
        cleaned = []
        for i, q in enumerate(queries):
            try:
                cleaned.append(validate_query(q, s.max_query_chars))
            except InvalidRequest as exc:
                if len(queries) == 1:
                    raise
                raise InvalidRequest(f"queries[{i}]: {exc.message}") from None
        opts = engine.resolve_options(**options)
        try:
            results = await asyncio.wait_for(self._search(engine, cleaned, opts, started), s.request_timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeout(
                f"the request took longer than request_timeout_ms={s.request_timeout_ms:g} ms"
            ) from None
        total_ms = (time.perf_counter() - started) * 1000.0
        for r in results:
            self.metrics.observe_timings(r.timings, r.rerank, r.first_stage)
        return BatchOutcome(results, merge_timings([r.timings for r in results], total_ms), engine, cleaned)

    async def _search(
        self, engine: SearchEngine, queries: list[str], opts: SearchOptions, started: float
    ) -> list[SearchResult]:
        assert self._admission is not None
        async with self._admission.slot() as permit_ms:
            kinds = engine.encoders_needed(opts)
            encode_started = time.perf_counter()
            encoded: dict[QueryModel, EncodedQueries] = dict(
                zip(kinds, await asyncio.gather(*(self.batcher.encode(engine, k, queries) for k in kinds)))
            )
            encode_wall = (time.perf_counter() - encode_started) * 1000.0
            tokenize_ms = sum((e.tokenize_ms for e in encoded.values()), 0.0)
            encode_ms = sum((e.encode_ms for e in encoded.values()), 0.0)
            batch_wait = max(0.0, encode_wall - max((e.tokenize_ms + e.encode_ms for e in encoded.values()), default=0))
            dense = first_stage_queries(encoded)
            colbert = colbert_queries(encoded)
            # a lone request may split its rerank over the idle cores; under load each uses one
            split = self._rerank_executor if self._admission.in_flight == 1 else None
            retrieved = await self.run_in_thread(engine.retrieve, queries, opts, dense, colbert, split)
        total_ms = (time.perf_counter() - started) * 1000.0
        out = []
        for hits, timings in retrieved:
            timings.queue = permit_ms + batch_wait
            timings.tokenize, timings.encode, timings.total = tokenize_ms, encode_ms, total_ms
            out.append(SearchResult(hits, timings, opts.rerank, opts.first_stage, engine.artifact_version))
        return out

    # -- hot reload -------------------------------------------------------------------------------
    def _load_and_warm(self, artifact_dir: Path) -> SearchEngine:
        engine = SearchEngine.load(artifact_dir, self.settings)
        if self.settings.warmup:
            try:
                engine.warmup()
            except Exception as exc:  # an engine that cannot answer a query is not swapped in
                engine.close()
                raise ArtifactError(f"{artifact_dir}: warm-up failed: {type(exc).__name__}: {exc}") from exc
        return engine

    async def reload(self, artifact_dir: str | Path | None = None) -> dict[str, Any]:
        """Load ``artifact_dir`` (default: the current directory, re-read) beside the served
        engine, verify and warm it up, then swap it in. On failure the old engine keeps
        serving and :class:`InvalidArtifact` (422) says why; a concurrent reload gets
        :class:`ReloadInProgress` (409)."""
        assert self._reload_lock is not None
        if self._reload_lock.locked():
            raise ReloadInProgress("another reload is in progress; try again when it has finished")
        async with self._reload_lock:
            target = Path(artifact_dir) if artifact_dir is not None else self.artifact_dir
            if not target.resolve().is_relative_to(self.settings.reload_root):
                raise Forbidden(f"artifact_dir {str(target)!r} is outside the directory reloads may load "
                                "from (NRS_ARTIFACT_ROOT)")
            previous = self.engine
            started = time.perf_counter()
            try:
                engine = await self._run_admin(self._load_and_warm, target)
            except ArtifactError as exc:
                self.metrics.reloads.labels("failed").inc()
                logger.warning("reload of %s failed, still serving %s: %s", target,
                               previous.artifact_version if previous else None, exc)
                raise InvalidArtifact(f"reload failed, still serving the previous artifact: {exc}") from None
            self._install(engine, target)
            if previous is not None and previous.leases == 0:  # else its last request closes it
                self._retire(previous)
            if self._warmup_task is not None and not self._warmup_task.done():
                self._warmup_task.cancel()
            self.not_ready_reason = ""
            self._set_ready(True)
            self.metrics.reloads.labels("ok").inc()
            load_ms = (time.perf_counter() - started) * 1000.0
            logger.info("reloaded artifact %s (version %s) in %.0f ms", target, engine.artifact_version, load_ms)
            return {
                "artifact_version": engine.artifact_version,
                "previous_artifact_version": previous.artifact_version if previous else None,
                "artifact_dir": str(target),
                "n_docs": engine.n_docs,
                "load_ms": round(load_ms, 3),
            }
