"""The service's admission with an injected clock: a request is refused exactly when the work
queued ahead of it, at the measured service times and the safety factor, ends past its
deadline; and the retry hint says by how much."""

import numpy as np
import pytest

from spade_faiss.apps.scheduler import SAFETY, Busy, Job, Scheduler
from spade_faiss.config import Maps
from spade_faiss.images import LoadedImage


class Clock:
    def __init__(self, now=100.0):
        self.now = now

    def __call__(self):
        return self.now


def scheduler(clock, score=0.1, map_=0.5, queue_size=4, window=0.0):
    s = Scheduler(None, max_batch=8, window_s=window, queue_size=queue_size, clock=clock)
    s.times.update(score=score, map=map_)
    return s


def job(maps, deadline):
    return Job(LoadedImage("x", "0" * 64, np.zeros((2, 2, 3), np.uint8)), Maps.from_http(maps), deadline)


def test_a_score_is_admitted_exactly_when_it_can_finish_before_its_deadline():
    clock = Clock()
    s = scheduler(clock)
    s.admit(False, clock.now + SAFETY * 0.1 + 1e-9)  # just in time
    with pytest.raises(Busy, match="before the deadline") as refused:
        s.admit(False, clock.now + SAFETY * 0.1 - 1e-3)
    assert refused.value.retry_after == pytest.approx(1e-3)


def test_queued_work_and_maps_count_ahead_of_a_new_request():
    clock = Clock()
    s = scheduler(clock)
    s.submit(job("true", clock.now + 10))
    s.submit(job("false", clock.now + 10))
    # A map request now waits for 3 scores and 2 maps (its own and the queued one).
    need = SAFETY * (3 * 0.1) + SAFETY * (2 * 0.5)
    s.admit(True, clock.now + need + 1e-9)
    with pytest.raises(Busy):
        s.admit(True, clock.now + need - 1e-6)
    s.admit(False, clock.now + SAFETY * 3 * 0.1 + 1e-9)  # a score-only request skips the maps


def test_a_busy_worker_delays_admission_until_it_is_free_and_time_moves_on():
    clock = Clock()
    s = scheduler(clock)
    s.busy_until = clock.now + 2.0
    with pytest.raises(Busy):
        s.admit(False, clock.now + 1.0)
    clock.now += 2.0  # the worker's batch is done
    s.admit(False, clock.now + SAFETY * 0.1 + 1e-9)


def test_a_full_queue_and_a_stopping_service_refuse_with_a_retry_hint():
    clock = Clock()
    s = scheduler(clock, queue_size=2)
    for _ in range(2):
        s.submit(job("false", clock.now + 60))
    with pytest.raises(Busy, match="queue full") as full:
        s.admit(False, clock.now + 60)
    assert full.value.retry_after > 0
    s.stopping = True
    with pytest.raises(Busy, match="shutting down"):
        s.admit(False, clock.now + 60)


def test_the_worker_outlives_a_failing_refresh_and_a_failing_report():
    """A refresh that raises (here: no Spade at all) and a report of it that raises too: the worker
    goes on refreshing, observed by its calls, and is alive until stopped."""
    import threading

    calls = []
    done = threading.Event()

    def report(changes):
        calls.append(changes)
        if len(calls) >= 3:
            done.set()
        raise RuntimeError("the report failed")

    s = Scheduler(None, max_batch=1, window_s=0.0, queue_size=1, refresh_s=0.001, on_refresh=report)
    s.thread.start()  # the worker alone (start() warms a model first)
    try:
        assert done.wait(30), calls
        assert s.alive and all("error" in c for c in calls)
    finally:
        s.stop()
    assert not s.alive


def test_a_scored_job_whose_deadline_passes_in_the_map_lane_is_answered_not_dropped():
    """The race CI met: a job scored (so started), queued for its map, whose deadline passes
    before the worker takes it: the worker drops the map but answers the image decision; a
    client waiting on it never hangs (its own "late" path is only for jobs never started)."""
    class Fake:
        tau_ = None

        def result(self, retrieved):
            return ("result of", retrieved)

    clock = Clock()
    s = Scheduler(Fake(), max_batch=8, window_s=0.0, queue_size=4, clock=clock)
    j = job("true", deadline=clock.now + 1.0)
    j.started, j.retrieved = True, "retrieved"
    s.lanes["map"].append(j)
    never = job("true", deadline=clock.now + 1.0)  # expired before it was scored: the client answers itself
    s.lanes["map"].append(never)
    clock.now += 2.0
    assert s._take("map", 1) == []
    assert j.future.done() and j.future.result() == (("result of", "retrieved"), "skipped: the deadline passed")
    assert not never.future.done()
