"""What a service serves: each corpus (its Spade, scheduler and reported state) under its name,
the Prometheus instruments with a ``corpus`` label, and models shared between corpora."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..clock import utc_now
from ..detector import Spade
from .pictures import colour_scale
from .scheduler import Scheduler

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)


class Metrics:
    """The service's Prometheus instruments, in a registry of their own (nothing global); all
    but the request counts are per corpus (:meth:`of`)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        c = ["corpus"]
        self.requests = Counter("spade_requests", "HTTP requests by route (routes, else 'other') and status code",
                                ["path", "code"], registry=r)
        self.latency = Histogram("spade_request_seconds", "time to answer a scoring request, by lane",
                                 c + ["lane"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("spade_queue_depth", "jobs waiting, by lane", c + ["lane"], registry=r)
        self.batch_size = Histogram("spade_batch_size", "images per backbone batch", c, buckets=BATCH_BUCKETS,
                                    registry=r)
        self.dropped = Counter("spade_dropped", "queued work dropped before it ran (expired, abandoned)",
                               c + ["reason"], registry=r)
        self.disconnected = Counter("spade_client_disconnects", "requests whose client left before the answer",
                                    c, registry=r)
        self.rejected = Counter("spade_rejected", "requests answered 503 at once, by reason", c + ["reason"],
                                registry=r)
        self.corpus_images = Gauge("spade_corpus_images", "images of the corpus state served", c, registry=r)
        self.corpus_generation = Gauge("spade_corpus_generation", "segments appended beside the corpus file, "
                                       "taken in", c, registry=r)
        self.refreshes = Counter("spade_corpus_refreshes", "takings-in of the corpus's new state, by result",
                                 c + ["result"], registry=r)
        self.service_seconds = Gauge("spade_service_seconds", "measured seconds per image, by lane", c + ["lane"],
                                     registry=r)

    def of(self, corpus: str) -> CorpusMetrics:
        return CorpusMetrics(self, corpus)


class _Bound:
    """One instrument with its ``corpus`` label given."""

    def __init__(self, metric, corpus: str):
        self.metric, self.corpus = metric, corpus

    def labels(self, *values):
        return self.metric.labels(self.corpus, *values)

    def __getattr__(self, name):  # inc, observe, set of an instrument with no other label
        return getattr(self.metric.labels(self.corpus), name)


class CorpusMetrics:
    """The instruments of one corpus, used as if it were served alone."""

    PER_CORPUS = ("latency", "queue_depth", "batch_size", "dropped", "disconnected", "rejected", "corpus_images",
                  "corpus_generation", "refreshes", "service_seconds")

    def __init__(self, metrics: Metrics, corpus: str):
        for name in self.PER_CORPUS:
            setattr(self, name, _Bound(getattr(metrics, name), corpus))


class CorpusState:
    """What the service tells of a corpus (``info``, metrics), kept up to date by its
    scheduler's refreshes (on its worker thread; readers get whole values)."""

    def __init__(self, spade: Spade, metrics: CorpusMetrics):
        self.spade, self.metrics = spade, metrics
        self.info, self.scale = spade.info(), colour_scale(spade)
        self.refreshed_at, self.thresholds_changed_at, self.failures = utc_now(), None, 0
        self.problem: str | None = None  # why the last refresh failed (the last good state is served)
        self._publish()

    def update(self, changes: dict) -> None:
        if changes.get("error"):
            self.failures += 1
            self.problem = f"taking in the corpus's new state failed: {changes['error']}"
            self.metrics.refreshes.labels("failed").inc()
            return
        self.problem = None
        self.metrics.refreshes.labels("ok").inc()
        if changes["thresholds_changed"]:
            self.scale, self.thresholds_changed_at = colour_scale(self.spade), utc_now()
        if changes["added"] or changes["thresholds_changed"]:
            self.info = self.spade.info()
        self.refreshed_at = utc_now()
        self._publish()

    def _publish(self) -> None:
        # One whole value, replaced: a reader never sees half an update.
        self.served = {"images": len(self.spade.paths_), "generation": self.spade.generation_,
                       "thresholds": {"tau": self.spade.tau_, "theta": self.spade.theta_}}
        self.metrics.corpus_images.set(self.served["images"])
        self.metrics.corpus_generation.set(self.served["generation"])

    def summary(self, refresh_s: float) -> dict:
        return {**self.served, "thresholds_changed_at": self.thresholds_changed_at,
                "refreshed_at": self.refreshed_at, "refresh_s": refresh_s, "refresh_failures": self.failures,
                "problem": self.problem}


class ServedCorpus:
    """One corpus of a service: its Spade, its scheduler (a worker thread of its own) and its
    reported state."""

    def __init__(self, name: str, spade: Spade, metrics: Metrics, max_batch: int, window_s: float,
                 queue_size: int, refresh_s: float):
        self.name, self.spade, self.refresh_s = name, spade, refresh_s
        self.metrics = metrics.of(name)
        self.state = CorpusState(spade, self.metrics)
        self.scheduler = Scheduler(spade, max_batch, window_s, queue_size, self.metrics, refresh_s=refresh_s,
                                   on_refresh=self.state.update)

    def health(self) -> tuple[str, str | None]:
        """``ok``; ``degraded`` (answering from the last good state, with the reason); or ``down``
        (its worker has stopped: nothing would be answered)."""
        if not self.scheduler.alive and not self.scheduler.stopping:
            return "down", "its scoring worker has stopped"
        if self.state.problem:
            return "degraded", self.state.problem
        return "ok", None

    def info(self) -> dict:
        return {**self.state.info, "name": self.name, "corpus_state": self.state.summary(self.refresh_s),
                "service_seconds_per_image": dict(self.scheduler.times)}


def corpus_names(paths: list[str]) -> dict[str, str]:
    """``NAME=PATH`` or ``PATH`` (named by its file stem) -> {name: path}; names must differ."""
    named = {}
    for item in paths:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = os.path.splitext(os.path.basename(item))[0], item
        if not name or "/" in name:
            raise ValueError(f"{item}: expected PATH or NAME=PATH with a non-empty NAME without '/'")
        if name in named:
            raise ValueError(f"two corpora named {name!r} ({named[name]}, {path}): name them, e.g. {name}2={path}")
        named[name] = path
    return named


def share_models(spades: list[Spade]) -> int:
    """Build each distinct model once: corpora built with the same architecture and weights
    (the sha256 of their tensors) on the same device share one; returns how many were built."""
    built = {}
    for spade in spades:
        key = spade.model_key
        if key in built:
            spade.share_backbone(built[key])
        else:
            built[key] = spade.load_backbone()
    return len(built)
