"""Prometheus metrics of one service (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..manifest import GraphInfo

# Seconds: from a tiny-model step (ms) to an sd15 CPU generation (minutes).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("loramgr_requests", "HTTP requests by endpoint and status code",
                                ("endpoint", "status"), registry=r)
        self.queue_seconds = Histogram("loramgr_queue_wait_seconds", "time a generation waited in the queue",
                                       buckets=BUCKETS, registry=r)
        self.swap_seconds = Histogram("loramgr_swap_seconds", "adapter swaps and their seconds (_count: swaps, _sum: seconds)",
                                      buckets=BUCKETS, registry=r)
        self.denoise_seconds = Histogram("loramgr_denoise_seconds", "denoising loop time", buckets=BUCKETS,
                                         registry=r)
        self.total_seconds = Histogram("loramgr_generate_seconds", "POST /v1/generate time, request to response",
                                       buckets=BUCKETS, registry=r)
        self.swaps = Counter("loramgr_swaps", "adapter swaps (in place or by re-creating sessions)", registry=r)
        self.reopens = Counter("loramgr_session_recreations",
                               "session re-creations after start-up (weights outside the swappable set, "
                               "recovery from a failed swap)", registry=r)
        self.generations = Counter("loramgr_generations", "generations run, by outcome (ok, failed, cancelled)",
                                   ("outcome",), registry=r)
        self.cancelled = Counter("loramgr_cancelled", "generations cancelled because their client went away, by "
                                 "stage (queued: taken out of the queue; running: stopped at its next step)",
                                 ("stage",), registry=r)
        self.queue_depth = Gauge("loramgr_queue_depth", "generations waiting", registry=r)
        self.in_flight = Gauge("loramgr_in_flight", "generations running (0 or 1)", registry=r)
        self.ready = Gauge("loramgr_ready", "1 when the runner is open and the server accepts work", registry=r)
        self.controlnet_slots = Gauge("loramgr_controlnet_slots", "ControlNets the runner holds in slots, after the "
                                      "last generation (a request uses at most --max-controlnets)", registry=r)
        self.controlnet_slot_bytes = Gauge("loramgr_controlnet_slot_bytes",
                                           "bytes of the weights of the ControlNets in slots", registry=r)

    def record_slots(self, held: int, controlnet: GraphInfo) -> None:
        """``held`` ControlNets in slots, each with a whole ControlNet graph's weights (``controlnet``)."""
        self.controlnet_slots.set(held)
        self.controlnet_slot_bytes.set(held * sum(e.length for e in controlnet.weights.values()))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
