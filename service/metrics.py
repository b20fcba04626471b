"""Prometheus metrics of one gateway. Each app owns its registry, so several apps in one process (tests)
never collide and ``/metrics`` shows only this gateway's series."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServiceMetrics:
    """The gateway's series: HTTP traffic, the queue, the batches and the model work."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("ponder_http_requests_total", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("ponder_http_request_duration_seconds", "HTTP request latency by route and status",
                                 ["route", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("ponder_http_requests_in_flight", "HTTP requests being handled", registry=r)
        self.queue_depth = Gauge("ponder_queue_depth", "requests waiting for the model", registry=r)
        self.rejected = Counter("ponder_queue_rejected_total", "requests refused because the queue was full",
                                registry=r)
        self.batch_size = Histogram("ponder_batch_size", "requests merged into one forward pass",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.worker_latency = Histogram("ponder_worker_duration_seconds", "model time per batch by worker kind",
                                        ["worker"], buckets=LATENCY_BUCKETS, registry=r)
        self.preprocess_latency = Histogram("ponder_preprocess_duration_seconds",
                                            "decode + voxelise time per request", buckets=LATENCY_BUCKETS,
                                            registry=r)
        self.points = Counter("ponder_points_processed_total", "input points processed, by route",
                              ["route"], registry=r)
        self.voxels = Counter("ponder_voxels_processed_total", "voxels sent through the model", registry=r)
        self.triton_errors = Counter("ponder_triton_errors_total", "failed Triton calls by endpoint",
                                     ["endpoint"], registry=r)
        self.breaker_open = Gauge("ponder_triton_breaker_open", "1 while an endpoint's circuit breaker is open",
                                  ["endpoint"], registry=r)
