"""Prometheus metrics of one app, in its own ``CollectorRegistry`` (never the global one),
so several apps (tests, reloads) never share or clash on collectors.

Exposed at ``GET /metrics``:

- ``nrs_stage_latency_seconds{stage, rerank, first_stage}``: histogram per pipeline stage
  (``queue``, ``tokenize``, ``encode``, ``ann``, ``sparse``, ``rerank``, ``fetch``, ``total``);
  geometric buckets from 0.5 ms to 10 s
- ``nrs_requests_total{route, status, error_type}``: every HTTP request
- ``nrs_requests_in_flight``: search requests holding a permit
- ``nrs_queue_depth``: search requests waiting for a permit
- ``nrs_encode_batch_size{model}``: queries per ONNX encode batch (dynamic batching)
- ``nrs_index_documents``: documents in the served artifact
- ``nrs_artifact_info{artifact_version, dense_factory, ...}``: the served artifact (no filesystem paths)
- ``nrs_reloads_total{outcome}``, ``nrs_ready``
- ``nrs_query_log_lines_total{outcome}``: query-log lines ``queued`` for writing or ``dropped``
  (queue full); only with ``NRS_QUERY_LOG_PATH``
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from models.retrieval import StageTimings


def geometric_buckets(start: float, stop: float, factor: float = 2.0) -> tuple[float, ...]:
    """``start * factor**i`` up to and including ``stop``.

    >>> geometric_buckets(0.5, 4.0)
    (0.5, 1.0, 2.0, 4.0)
    >>> geometric_buckets(0.0005, 10.0)[-3:]
    (4.096, 8.192, 10.0)
    """
    out = []
    value = start
    while value < stop * (1 - 1e-9):
        out.append(round(value, 9))
        value *= factor
    out.append(stop)
    return tuple(out)


#: Latency buckets in seconds: 0.5 ms ... 10 s, doubling, plus the bounds that service aims are
#: stated in (10 ms for a 429 under overload, 250 ms and 1 s for a search), so a quantile can
#: be read against them
LATENCY_BUCKETS = tuple(sorted({*geometric_buckets(0.0005, 10.0), 0.01, 0.25, 1.0}))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    """Every collector of one app, registered in :attr:`registry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.stage_latency = Histogram(
            "nrs_stage_latency_seconds", "Time per pipeline stage of a search query.",
            ["stage", "rerank", "first_stage"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.requests = Counter(
            "nrs_requests", "HTTP requests by route, status and error type.",
            ["route", "status", "error_type"], registry=r,
        )
        self.request_latency = Histogram(
            "nrs_request_duration_seconds", "Server-side time of an HTTP request, by route and status.",
            ["route", "status"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = Gauge("nrs_requests_in_flight", "Search requests holding a concurrency permit.", registry=r)
        self.queue_depth = Gauge("nrs_queue_depth", "Search requests waiting for a concurrency permit.", registry=r)
        self.batch_size = Histogram(
            "nrs_encode_batch_size", "Query texts per ONNX encode batch.", ["model"], buckets=BATCH_BUCKETS, registry=r,
        )
        self.index_documents = Gauge("nrs_index_documents", "Documents in the served artifact.", registry=r)
        self.artifact = Info("nrs_artifact", "The served artifact.", registry=r)
        self.reloads = Counter("nrs_reloads", "Artifact reloads by outcome.", ["outcome"], registry=r)
        self.ready = Gauge("nrs_ready", "1 when artifacts are loaded and warmed up.", registry=r)
        self.query_log_lines = Counter(
            "nrs_query_log_lines", "Query-log lines queued for writing, or dropped with the queue full.",
            ["outcome"], registry=r,
        )

    def observe_timings(self, timings: StageTimings, rerank: str, first_stage: str) -> None:
        """One observation per stage of one query (stages that did not run are skipped)."""
        for stage, ms in timings.as_dict().items():
            if ms > 0 or stage == "total":
                self.stage_latency.labels(stage, rerank, first_stage).observe(ms / 1000.0)

    def set_artifact(self, info: Mapping[str, str], n_docs: int) -> None:
        """Describe the artifact now served."""
        self.artifact.info({k: str(v) for k, v in info.items()})
        self.index_documents.set(n_docs)

    def render(self) -> tuple[bytes, str]:
        """``(body, content type)`` of the Prometheus text exposition."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
