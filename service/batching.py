"""Dynamic batching of query encodes across concurrent requests.

Requests put their query texts on an asyncio queue and await a future. One worker task
takes every item waiting (up to ``max_size`` texts), optionally keeps collecting for up to
``max_wait_ms``, then encodes them together: one ONNX call per (engine, encoder) group,
run in the CPU thread pool so the event loop never blocks.

With ``max_wait_ms = 0`` (the default) this is continuous batching: a lone request is
encoded at once (no waiting at low load), and the requests that arrive while a batch is
being encoded form the next batch, so batches grow with the load by themselves. A request's texts always stay
in one batch (a ``/search/batch`` request is encoded in a single ONNX call, even when it
is larger than ``max_size``).

When a batched encode fails, each request of the batch is encoded again on its own, so a
request whose text breaks the encoder fails alone and its batch-mates get their vectors.

Items are grouped by engine, so requests that started on an old engine during a hot
reload are encoded by that engine, never by the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.retrieval import QueryModel
from service.search import EncodedQueries, SearchEngine

logger = logging.getLogger(__name__)

#: ``run_in_thread(fn, *args)``: how the batcher runs the blocking encode.
ThreadRunner = Callable[..., Awaitable[Any]]


@dataclass
class _Item:
    engine: SearchEngine
    kind: QueryModel
    texts: list[str]
    future: asyncio.Future[EncodedQueries]
    enqueued: float = field(default_factory=time.perf_counter)


class EncodeBatcher:
    """Collects concurrent encode requests into ONNX batches.

    Parameters
    ----------
    run_in_thread
        Coroutine function running a blocking callable in a thread pool.
    max_size
        Most texts per batch (a single larger request is encoded alone).
    max_wait_ms
        How long the first item of a batch waits for company (0: take only what is queued).
    on_batch
        Called with ``(model kind, batch size)`` for every encode batch (metrics).
    """

    def __init__(
        self,
        run_in_thread: ThreadRunner,
        *,
        max_size: int,
        max_wait_ms: float,
        on_batch: Callable[[str, int], None] | None = None,
    ) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        self._run_in_thread = run_in_thread
        self.max_size = max_size
        self.max_wait_s = max(0.0, max_wait_ms) / 1000.0
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Item] | None = None
        self._carry: _Item | None = None
        self._current: list[_Item] = []  # the batch being encoded
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker task on the running event loop."""
        if self._task is not None:
            return
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._worker(), name="encode-batcher")

    async def close(self) -> None:
        """Stop the worker; waiting requests get a ``RuntimeError``."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        pending = [*self._current, *([self._carry] if self._carry is not None else [])]
        self._carry, self._current = None, []
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for item in pending:
            if not item.future.done():
                item.future.set_exception(RuntimeError("the encode batcher was shut down"))

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # -- requests ---------------------------------------------------------------------------------
    async def encode(self, engine: SearchEngine, kind: QueryModel, texts: Sequence[str]) -> EncodedQueries:
        """Encode ``texts`` with ``engine``'s ``kind`` encoder, batched with concurrent callers.

        The returned ``vectors`` hold this caller's rows only; the timings are the batch's.
        """
        if self._queue is None or not self.running:
            raise RuntimeError("the encode batcher is not running")
        future: asyncio.Future[EncodedQueries] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(engine, kind, list(texts), future))
        return await future

    # -- worker -----------------------------------------------------------------------------------
    async def _next(self, timeout: float | None) -> _Item | None:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        assert self._queue is not None
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            try:
                return self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _collect(self) -> list[_Item]:
        first = await self._next(None)
        assert first is not None
        batch, size = [first], len(first.texts)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while size < self.max_size:
            item = await self._next(deadline - loop.time())
            if item is None:
                break
            if size + len(item.texts) > self.max_size:
                self._carry = item  # first of the next batch
                break
            batch.append(item)
            size += len(item.texts)
        return batch

    async def _worker(self) -> None:
        while True:
            batch = self._current = await self._collect()
            groups: dict[tuple[int, str], list[_Item]] = {}
            for item in batch:
                if not item.future.done():  # skip callers that gave up (timeout, disconnect)
                    groups.setdefault((id(item.engine), item.kind), []).append(item)
            # different models (dense and ColBERT queries of the same requests) encode in parallel
            # threads: ONNX Runtime releases the GIL, so one request's two encoders overlap
            await asyncio.gather(*(self._encode_group(items) for items in groups.values()))
            self._current = []

    async def _encode_group(self, items: list[_Item]) -> None:
        engine, kind = items[0].engine, items[0].kind
        texts = [t for item in items for t in item.texts]
        if self._on_batch is not None:
            self._on_batch(kind, len(texts))
        try:
            encoded: EncodedQueries = await self._run_in_thread(engine.encode, kind, texts)
        except Exception as exc:
            if len(items) == 1:
                _resolve(items[0], exc)
            else:  # one caller's text may be at fault: encode each caller alone, so only it fails
                logger.warning("a batched %s encode of %d requests failed (%s: %s); encoding them one by one",
                               kind, len(items), type(exc).__name__, exc)
                await asyncio.gather(*(self._encode_group([item]) for item in items if not item.future.done()))
            return
        start = 0
        for item in items:
            part = slice(start, start + len(item.texts))
            start += len(item.texts)
            tokens = None if encoded.tokens is None else np.asarray(encoded.tokens[part])
            _resolve(item, EncodedQueries(np.asarray(encoded.vectors[part]), encoded.tokenize_ms, encoded.encode_ms,
                                          tokens))


def _resolve(item: _Item, outcome: EncodedQueries | BaseException) -> None:
    """Hand ``outcome`` to a caller that is still waiting."""
    if item.future.done():
        return
    if isinstance(outcome, BaseException):
        item.future.set_exception(outcome)
    else:
        item.future.set_result(outcome)
