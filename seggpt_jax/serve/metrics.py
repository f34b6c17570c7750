"""Prometheus metrics of the service (prometheus-client), in a registry of its own.

Names and what they count:

* ``seggpt_http_request_duration_seconds{route, method, status}``: request latency, histogram;
* ``seggpt_queue_wait_seconds``: how long each query waited for the device, histogram;
* ``seggpt_device_seconds``: device time per batch, histogram;
* ``seggpt_batch_size``: queries per batch (before padding), histogram; ``seggpt_batch_padding_total``:
  padded queries added to reach a compiled size;
* ``seggpt_queue_depth``: queries waiting for the device; ``seggpt_in_flight_requests``: requests
  being handled;
* ``seggpt_rejections_total{reason}``: requests refused or dropped, by reason;
* ``seggpt_compiles_total{phase}``: programs compiled (or read from the compilation cache), ``warmup``
  before ready and ``serving`` after (0 when every shape was compiled ahead);
* ``seggpt_ready``: 1 when every batch size is compiled; ``process_*``: the server's memory and CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               generate_latest)

from .batcher import BatchObserver

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
REJECTION_REASONS = ("bad_image", "too_large", "body_too_large", "media_type", "invalid_field", "unknown_prompt",
                     "not_acceptable", "queue_full", "warming_up", "draining", "deadline", "client_gone")


class Metrics(BatchObserver):
    """The service's metrics; also the batcher's observer."""

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        self.latency = Histogram("seggpt_http_request_duration_seconds", "HTTP request latency",
                                 ("route", "method", "status"), buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_wait = Histogram("seggpt_queue_wait_seconds", "Time a query waited for the device",
                                    buckets=LATENCY_BUCKETS, registry=registry)
        self.device = Histogram("seggpt_device_seconds", "Device time per batch", buckets=LATENCY_BUCKETS,
                                registry=registry)
        self.batch_size = Histogram("seggpt_batch_size", "Queries per batch (before padding)", buckets=BATCH_BUCKETS,
                                    registry=registry)
        self.padding = Counter("seggpt_batch_padding", "Padded queries added to reach a compiled batch size",
                               registry=registry)
        self.queue_depth = Gauge("seggpt_queue_depth", "Queries waiting for the device", registry=registry)
        self.in_flight = Gauge("seggpt_in_flight_requests", "Requests being handled", registry=registry)
        self.rejections = Counter("seggpt_rejections", "Requests refused or dropped, by reason", ("reason",),
                                  registry=registry)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)
        self.compiles = Counter("seggpt_compiles", "Programs compiled or read from the compilation cache, by phase",
                                ("phase",), registry=registry)
        for phase in ("warmup", "serving"):
            self.compiles.labels(phase)
        self.ready = Gauge("seggpt_ready", "1 when every batch size is compiled", registry=registry)

    # ------------------------------------------------------------------------------ BatchObserver
    def batch_done(self, key: Any, size: int, bucket: int, queue_waits: Sequence[float],
                   device_seconds: float) -> None:
        self.batch_size.observe(size)
        self.padding.inc(bucket - size)
        self.device.observe(device_seconds)
        for wait in queue_waits:
            self.queue_wait.observe(wait)

    def queue_changed(self, depth: int) -> None:
        self.queue_depth.set(depth)

    # ------------------------------------------------------------------------------ exposition
    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
