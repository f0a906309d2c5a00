"""Prometheus metrics of one server, in their own registry (``GET /metrics``).

Where a request's time goes, stage by stage (``engine_request_<stage>_seconds``): ``parse`` (JSON
and request validation), ``tokenize``, ``queue`` (submitted to its first forward), ``inference``
(first forward to last row), ``serialize`` (post-processing and the response body); ``duration``
is the whole request as the HTTP layer sees it. Per forward: inputs, tokens, requests and seconds.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .scheduler import Scheduler

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
COUNT_BUCKETS = tuple(float(1 << p) for p in range(11))  # 1 .. 1024
TOKEN_BUCKETS = tuple(float(1 << p) for p in range(4, 18))  # 16 .. 131072
ENDPOINTS = ("/v1/embeddings", "/embed", "/health", "/info", "/metrics", "/v1/models")
STAGES = ("parse", "tokenize", "queue", "inference", "serialize")


class Metrics:
    """The server's metrics; also the scheduler's observer (``forward``, ``queue_wait``, ...)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("engine_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.duration = Histogram("engine_request_duration_seconds", "whole request, as the HTTP layer sees it",
                                  ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage = {s: Histogram(f"engine_request_{s}_seconds", f"{s} time per embedding request",
                                   buckets=LATENCY_BUCKETS, registry=r) for s in STAGES}
        self.queue_requests = Gauge("engine_queue_requests", "requests with inputs waiting for a forward", registry=r)
        self.queue_tokens = Gauge("engine_queue_tokens", "tokens waiting for a forward", registry=r)
        self.batch_inputs = Histogram("engine_batch_inputs", "inputs per forward", buckets=COUNT_BUCKETS, registry=r)
        self.batch_tokens = Histogram("engine_batch_tokens", "tokens per forward", buckets=TOKEN_BUCKETS, registry=r)
        self.batch_requests = Histogram("engine_batch_requests", "distinct requests per forward",
                                        buckets=COUNT_BUCKETS, registry=r)
        self.forward_seconds = Histogram("engine_forward_seconds", "one packed forward", buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("engine_tokens_embedded", "tokens embedded", registry=r)
        self.inputs = Counter("engine_inputs_embedded", "inputs embedded", registry=r)
        self.dropped = Counter("engine_inputs_dropped", "queued inputs dropped because their client disconnected",
                               registry=r)
        self.ready = Gauge("engine_ready", "1 when warmed up and accepting requests", registry=r)

    def bind(self, scheduler: Scheduler) -> None:
        """Read the queue gauges from ``scheduler`` at scrape time."""
        self.queue_requests.set_function(lambda: scheduler.stats.queued_requests)
        self.queue_tokens.set_function(lambda: scheduler.stats.queued_tokens)
        self.ready.set_function(lambda: float(scheduler.accepting))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        endpoint = endpoint if endpoint in ENDPOINTS else "other"  # bounded label values
        self.requests.labels(endpoint, str(status)).inc()
        self.duration.labels(endpoint).observe(seconds)

    # -- the scheduler's observer interface ----------------------------------------------------------

    def forward(self, n_inputs: int, n_tokens: int, n_requests: int, seconds: float) -> None:
        self.batch_inputs.observe(n_inputs)
        self.batch_tokens.observe(n_tokens)
        self.batch_requests.observe(n_requests)
        self.forward_seconds.observe(seconds)
        self.tokens.inc(n_tokens)
        self.inputs.inc(n_inputs)

    def queue_wait(self, seconds: float) -> None:
        self.stage["queue"].observe(seconds)

    def inference(self, seconds: float) -> None:
        self.stage["inference"].observe(seconds)

    def dropped_inputs(self, n: int) -> None:
        self.dropped.inc(n)
