"""`GET /metrics`: Prometheus text format. Request counts and latencies per route, jobs by
status, live workers per queue, queue lengths (read from Redis at scrape time)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from workers.celery_app import QUEUES
from workers.jobs import JobStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# a label value per method any client may invent would let anyone grow the series without end
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class JobsCollector:
    def __init__(self, store: JobStore, worker_ttl: float) -> None:
        self.store, self.worker_ttl = store, worker_ttl

    def describe(self) -> list[Metric]:
        return []  # nothing read from Redis at registration

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("merge_service_jobs", "jobs by status", labels=["status"])
        for status, count in self.store.counts().items():
            jobs.add_metric([status], count)
        yield jobs
        workers = GaugeMetricFamily("merge_service_workers", "live workers consuming a queue",
                                    labels=["queue"])
        live = self.store.live_workers(self.worker_ttl)
        queued = GaugeMetricFamily("merge_service_queue_length",
                                   "messages waiting in a Celery queue", labels=["queue"])
        for queue in QUEUES:
            workers.add_metric([queue], sum(queue in w["queues"] for w in live))
            queued.add_metric([queue], self.store.r.llen(queue))
        yield workers
        yield queued


class ApiMetrics:
    """One registry per app (tests build several apps in one process)."""

    def __init__(self, store: JobStore, worker_ttl: float) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("merge_service_http_requests", "HTTP requests answered",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("merge_service_http_request_duration_seconds",
                                 "time to answer an HTTP request (streams: to the first byte)",
                                 ["route"], registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5,
                                          5, 10, 30))
        self.submitted = Counter("merge_service_jobs_submitted", "jobs accepted, by queue",
                                 ["queue"], registry=self.registry)
        self.registry.register(JobsCollector(store, worker_ttl))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI (no per-request task or body copy): counts and times every HTTP request."""

    def __init__(self, app: Any, metrics: ApiMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                route = scope.get("route")
                self.metrics.latency.labels(getattr(route, "path", "unmatched")).observe(
                    time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.metrics.requests.labels(method, route, str(status["code"])).inc()
