"""Deadline-aware scheduling of scoring requests over one warm Spade (the service's engine).

Two lanes share one worker thread (the machine's cores belong to the model):

- the **score** lane runs the backbone and stage 1 (the image score) for batches of up to
  ``max_batch`` images, waiting at most ``window_s`` for a batch to fill; it is served first;
- the **map** lane runs stage 2, one image at a time, whenever the score lane is empty: the
  expensive work never starves image decisions.

Every job has a deadline. A job is admitted only when the work queued ahead of it, at the
measured service times, ends before its deadline; otherwise :class:`Busy` is raised at once
with the time the backlog needs to clear. Work for a job that was answered or abandoned is
never started, and a map whose deadline can no longer be met is skipped (the image decision is
still returned, saying so).

Between jobs, at most every ``refresh_s`` seconds, the worker takes in what was committed
beside the corpus (``Spade.refresh``: images appended, thresholds calibrated), so a job is
scored against one corpus state from start to end, and its answer says which.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from concurrent.futures import Future

from ..config import SERVICE_DEFAULTS, Maps
from ..detector import Spade
from ..images import LoadedImage

log = logging.getLogger(__name__)

SMOOTHING = 0.2  # weight of the newest measurement in the service-time averages
SAFETY = 1.25  # admission budgets this much more than the measured service times


class Busy(Exception):
    """A request that cannot be served before its deadline (or at all: shutting down)."""

    def __init__(self, reason: str, retry_after: float):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


@dataclasses.dataclass
class Job:
    """One image to score; ``future`` receives ``(ScoredImage, map status)``."""

    image: LoadedImage
    maps: Maps
    deadline: float  # time.monotonic()
    future: Future = dataclasses.field(default_factory=Future)
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    retrieved: object = None
    corpus: dict | None = None  # the corpus state it was scored against: images, generation
    started: bool = False  # the worker has taken it
    abandoned: bool = False  # the client left or its answer was given: do no more work

    def live(self, now: float) -> bool:
        return not self.abandoned and not self.future.done() and now < self.deadline


class Scheduler:
    """The worker thread and its two lanes. ``metrics`` is an object with the service's
    instruments (see ``served.CorpusMetrics``) or None; ``clock`` gives the time deadlines are in
    (``time.monotonic``; tests inject their own)."""

    def __init__(self, spade: Spade, max_batch: int = SERVICE_DEFAULTS["max_batch"],
                 window_s: float = SERVICE_DEFAULTS["batch_window_ms"] / 1000,
                 queue_size: int = SERVICE_DEFAULTS["queue_size"],
                 metrics=None, clock=time.monotonic, refresh_s: float | None = None, on_refresh=None):
        self.spade, self.max_batch, self.window_s, self.queue_size = spade, max_batch, window_s, queue_size
        self.clock = clock
        self.refresh_s, self.on_refresh = refresh_s, on_refresh
        self.next_refresh = clock() + (refresh_s or 0)
        self.metrics = metrics
        self.lanes: dict[str, collections.deque] = {"score": collections.deque(), "map": collections.deque()}
        self.cond = threading.Condition()
        self.times = {"score": 0.0, "map": 0.0}  # seconds per image, measured
        self.busy_until = 0.0
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="spade-scheduler", daemon=True)

    # --- control -------------------------------------------------------------------------

    def start(self) -> Scheduler:
        """Warm the model and caches with a generated image, measure both lanes, start."""
        self.times.update(self.spade.warm_up())
        self._publish_times()
        self.thread.start()
        return self

    def stop(self) -> None:
        """Refuse new jobs, serve everything queued, and end the worker."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join()

    def depth(self, lane: str) -> int:
        return len(self.lanes[lane])

    def settle_late(self, job: Job) -> None:
        """A job past its deadline that still waits for its map: answer it now with its image
        decision (the map is skipped, and said so)."""
        with self.cond:
            if job in self.lanes["map"]:
                self.lanes["map"].remove(job)
                self._answer(job, "skipped: the deadline passed")

    # --- admission -----------------------------------------------------------------------

    def admit(self, wants_map: bool, deadline: float) -> None:
        """Raise :class:`Busy` (with the seconds after which to retry) when a job asking this
        could not be queued now. The service asks before decoding an image, so that a refusal
        costs next to nothing when the server is overloaded; :meth:`submit` asks again."""
        with self.cond:
            self._admit(self.clock(), wants_map, deadline)

    def submit(self, job: Job) -> None:
        """Queue ``job`` or raise :class:`Busy` (with the seconds after which to retry)."""
        with self.cond:
            self._admit(self.clock(), job.maps is not Maps.NONE, job.deadline)
            self.lanes["score"].append(job)
            self.cond.notify_all()

    def _admit(self, now: float, wants_map: bool, deadline: float) -> None:
        if self.stopping:
            raise Busy("shutting down", 5.0)
        if len(self.lanes["score"]) >= self.queue_size:
            raise Busy("queue full", self._backlog(now))
        done = self._estimate(now, wants_map)
        if done > deadline:
            raise Busy("cannot be served before the deadline", max(0.0, done - deadline))

    def _estimate(self, now: float, wants_map: bool) -> float:
        """When a new job would be answered: the work queued ahead at the measured times."""
        start = max(now, self.busy_until)
        scores = len(self.lanes["score"]) + 1
        done = start + SAFETY * (scores * self.times["score"] + self.window_s)
        if wants_map:
            maps = len(self.lanes["map"]) + 1 + sum(j.maps is not Maps.NONE for j in self.lanes["score"])
            done += SAFETY * maps * self.times["map"]
        return done

    def _backlog(self, now: float) -> float:
        return self._estimate(now, False) - now

    # --- the worker ----------------------------------------------------------------------

    def _run(self) -> None:
        """The worker: nothing that goes wrong in one job or refresh ends it (the jobs in hand are
        answered with the error, a failed refresh keeps the last good state)."""
        while True:
            try:
                if self._step():
                    return
            except Exception:  # the worker must outlive any one failure
                log.exception("the scheduler's worker hit an error; it goes on")

    def _step(self) -> bool:
        """One turn of the worker; True when it should end."""
        with self.cond:
            while not (self.lanes["score"] or self.lanes["map"] or self.stopping or self._refresh_due()):
                self.cond.wait(None if not self.refresh_s else max(0.0, self.next_refresh - self.clock()))
            if self.stopping and not (self.lanes["score"] or self.lanes["map"]):
                return True
            lane = "refresh" if self._refresh_due() else "score" if self.lanes["score"] else "map"
        if lane == "refresh":  # between jobs (ids are stable: a queued map needs no redo)
            self._refresh()
            return False
        try:
            self._serve_scores() if lane == "score" else self._serve_map()
        except Exception as e:  # answer the jobs in hand, keep serving
            log.exception("scoring failed")
            self._fail(e)
        return False

    def _refresh_due(self) -> bool:
        return bool(self.refresh_s) and self.clock() >= self.next_refresh

    def _refresh(self) -> None:
        self.next_refresh = self.clock() + self.refresh_s
        try:
            changes = self.spade.refresh()
        except Exception as e:  # a damaged segment or thresholds record: keep the last good state, say so
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            log.warning("taking in the corpus's new state failed (the last good state is served): %s", reason)
            changes = {"error": reason}
        if self.on_refresh is not None:
            self.on_refresh(changes)

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (started and not ended)."""
        return self.thread.is_alive()

    def _take(self, lane: str, n: int) -> list[Job]:
        """Up to ``n`` live jobs of a lane; expired or abandoned ones are dropped, counted."""
        taken = []
        with self.cond:
            q = self.lanes[lane]
            now = self.clock()
            while q and len(taken) < n:
                job = q.popleft()
                if job.live(now):
                    job.started = True
                    taken.append(job)
                else:
                    self._dropped(job, now)
            self.in_hand = taken
        return taken

    def _serve_scores(self) -> None:
        if self.window_s and len(self.lanes["score"]) < self.max_batch:
            time.sleep(self.window_s)  # let concurrent requests join the batch
        batch = self._take("score", self.max_batch)
        if not batch:
            return
        t = time.perf_counter()
        with self.cond:
            self.busy_until = self.clock() + SAFETY * len(batch) * self.times["score"]
        retrieved = self.spade.retrieve([j.image for j in batch])
        self._measure("score", (time.perf_counter() - t) / len(batch), len(batch))
        state = {"images": len(self.spade.paths_), "generation": self.spade.generation_}
        for job, r in zip(batch, retrieved):
            job.retrieved, job.corpus = r, state
            wants = job.maps is Maps.ALL or (job.maps is Maps.AUTO and r.score > self.spade.tau_)
            if not wants:
                self._answer(job, "not requested" if job.maps is Maps.NONE else "below the image threshold")
                continue
            with self.cond:
                self.lanes["map"].append(job)

    def _serve_map(self) -> None:
        jobs = self._take("map", 1)
        if not jobs:
            return
        job = jobs[0]
        now = self.clock()
        if now + self.times["map"] > job.deadline:
            self._answer(job, "skipped: the deadline would pass")
            return
        with self.cond:
            self.busy_until = now + SAFETY * self.times["map"]
        t = time.perf_counter()
        self.spade.segment([job.retrieved])
        self._measure("map", time.perf_counter() - t, None)
        self._answer(job, "computed")

    # --- bookkeeping ---------------------------------------------------------------------

    def _answer(self, job: Job, map_status: str) -> None:
        if not job.future.done():
            job.future.set_result((self.spade.result(job.retrieved), map_status))

    def _fail(self, error: Exception) -> None:
        for job in getattr(self, "in_hand", []):
            if not job.future.done():
                job.future.set_exception(error)

    def _dropped(self, job: Job, now: float) -> None:
        reason = "abandoned" if job.abandoned or job.future.done() else "expired"
        if reason == "expired" and job.retrieved is not None:
            # Scored, then past its deadline while waiting for its map: its client waits for an
            # answer (it was started, so it does not answer itself "late"): the image decision.
            self._answer(job, "skipped: the deadline passed")
        if self.metrics is not None:
            self.metrics.dropped.labels(reason).inc()

    def _measure(self, lane: str, seconds: float, batch: int | None) -> None:
        self.times[lane] = (1 - SMOOTHING) * self.times[lane] + SMOOTHING * seconds
        if self.metrics is not None:
            if batch is not None:
                self.metrics.batch_size.observe(batch)
            self._publish_times()

    def _publish_times(self) -> None:
        if self.metrics is not None:
            for lane, value in self.times.items():
                self.metrics.service_seconds.labels(lane).set(value)
