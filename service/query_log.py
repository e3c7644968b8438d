"""The served queries, written to a JSON-lines log the builder reads back (opt-in).

A corpus-only build trains its query encoder on pseudo-queries cut from the documents; real
users' queries, even unjudged, teach it far more (``label_free.query_log``). With
``NRS_QUERY_LOG_PATH`` set, the service appends each answered query to that file as one
BEIR ``queries.jsonl`` line, ``{"_id", "text", "time", "artifact_version", "first_stage",
"rerank"}``; a later build reads the file, or the folder holding it with its rotated parts,
as its query log.

Writing never blocks a search: lines go to a bounded queue that one thread drains into a
size-rotated file (``queries.jsonl``, then ``queries.1.jsonl`` ... up to
``NRS_QUERY_LOG_BACKUPS``). A line the full queue cannot take is dropped and counted
(``nrs_query_log_lines_total{outcome="dropped"}``). The log holds raw query text: keep it
where your users' data may be kept.
"""

from __future__ import annotations

import json
import logging
import queue
import random
from collections.abc import Sequence
from datetime import datetime, timezone
from logging.handlers import QueueHandler, QueueListener, RotatingFileHandler
from pathlib import Path

from prometheus_client import Counter

#: lines waiting for the writer thread before new ones are dropped
QUEUE_LINES = 10_000


def rotated_name(path: str) -> str:
    """``queries.jsonl.1`` -> ``queries.1.jsonl``: rotated parts keep the ``.jsonl`` suffix,
    so a folder of them reads as one query log.

    >>> rotated_name("/logs/queries.jsonl.2")
    '/logs/queries.2.jsonl'
    >>> rotated_name("/logs/queries.jsonl")
    '/logs/queries.jsonl'
    """
    stem, dot, number = path.rpartition(".")
    if not dot or not number.isdigit():
        return path
    base = Path(stem)
    return str(base.with_name(f"{base.stem}.{number}{base.suffix}"))


class _DroppingQueueHandler(QueueHandler):
    """Enqueue without blocking; a full queue drops the line and counts it."""

    def __init__(self, lines: queue.Queue[logging.LogRecord], counter: Counter) -> None:
        super().__init__(lines)
        self._queued = counter.labels("queued")
        self._dropped = counter.labels("dropped")

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record  # the message is already the finished JSON line

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self._dropped.inc()
        else:
            self._queued.inc()


class QueryLog:
    """Append answered queries to ``path`` (see the module docstring); :meth:`start` opens
    the file and the writer thread, :meth:`close` writes what is queued and closes it."""

    def __init__(self, path: Path, *, sample: float, max_bytes: int, backups: int, counter: Counter) -> None:
        self.path = Path(path)
        self.sample = sample
        self.max_bytes = max_bytes
        self.backups = backups
        self._counter = counter
        self._queue: _DroppingQueueHandler | None = None
        self._listener: QueueListener | None = None
        self._file: RotatingFileHandler | None = None

    def start(self) -> None:
        """Open (append to) the log file; an unwritable path raises :class:`OSError`."""
        if self.path.is_dir():
            raise IsADirectoryError(f"{self.path} is a directory; name the log file in it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = RotatingFileHandler(self.path, maxBytes=self.max_bytes, backupCount=self.backups,
                                         encoding="utf-8")
        self._file.namer = rotated_name
        self._file.setFormatter(logging.Formatter("%(message)s"))
        lines: queue.Queue[logging.LogRecord] = queue.Queue(QUEUE_LINES)
        self._queue = _DroppingQueueHandler(lines, self._counter)
        self._listener = QueueListener(lines, self._file)
        self._listener.start()

    def record(self, queries: Sequence[str], request_id: str, *, artifact_version: str,
               first_stage: str, rerank: str) -> None:
        """Queue one line per query of an answered request (a ``sample`` share of requests)."""
        if self._queue is None or (self.sample < 1.0 and random.random() >= self.sample):
            return
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        many = len(queries) > 1
        for i, text in enumerate(queries):
            line = json.dumps({"_id": f"{request_id}-{i}" if many else request_id, "text": text, "time": now,
                               "artifact_version": artifact_version, "first_stage": first_stage,
                               "rerank": rerank}, ensure_ascii=False)
            self._queue.emit(logging.makeLogRecord({"msg": line}))

    def close(self) -> None:
        """Write the queued lines, stop the thread, close the file."""
        self._queue = None
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        if self._file is not None:
            self._file.close()
            self._file = None
