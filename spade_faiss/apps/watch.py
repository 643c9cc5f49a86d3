"""``spade-faiss watch SOURCE CORPUS --out RUN``: a live source scored as it comes (issue 37).

Every frame taken (``live.py``: the newest ones when scoring falls behind, the others dropped
and counted) gets the backbone and stage 1; stage 2 runs only for frames whose image score is
above tau (``--maps auto``, the default: the paper's gating, so the few anomalous frames get a
map and the rest cost a backbone pass). Each frame's row is committed to ``scores.csv`` as it
is scored; ``maps.h5`` keeps the maps of the frames that have one, and flagged frames get an
overlay. With ``--metrics-port`` the rate, lag, drops and counts are Prometheus metrics. SIGINT
or SIGTERM stops it after the frame being scored (its row committed), as does the end of a
source that ends (a file without ``--loop``), ``--max-frames`` or ``--seconds``.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

from ..clock import utc_now
from ..config import Maps
from ..detector import Spade
from ..images import LoadedImage, sha256_bytes
from ..live import LiveSource
from .pictures import colour_scale
from .runs import RunDir, run_manifest

STATUS_EVERY_S = 5.0
RATE_SMOOTHING = 0.2  # the frames-per-second gauge: an exponential average of frame intervals


class Tally:
    """What a watch did so far, and its Prometheus metrics when a port is given."""

    def __init__(self, port: int | None, host: str):
        self.scored = self.flagged = 0
        self.rate = 0.0
        self.lag = 0.0
        self._last = None
        self._read = self._dropped = 0
        self.metrics = None
        if port is not None:
            try:
                import prometheus_client as pc
            except ImportError:
                raise ValueError("--metrics-port needs prometheus_client: pip install 'spade_faiss[serve]'") from None
            registry = pc.CollectorRegistry()
            self.metrics = {
                "read": pc.Counter("spade_watch_frames_read", "frames taken from the source", registry=registry),
                "dropped": pc.Counter("spade_watch_frames_dropped", "frames pushed out unscored (scoring fell "
                                      "behind)", registry=registry),
                "scored": pc.Counter("spade_watch_frames_scored", "frames scored", registry=registry),
                "flagged": pc.Counter("spade_watch_frames_flagged", "frames above tau", registry=registry),
                "rate": pc.Gauge("spade_watch_frames_per_second", "frames scored per second (smoothed)",
                                 registry=registry),
                "lag": pc.Gauge("spade_watch_lag_seconds", "from a frame's capture to its committed row",
                                registry=registry)}
            try:
                pc.start_http_server(port, addr=host, registry=registry)
            except OSError as e:
                raise ValueError(f"--metrics-port {port}: cannot listen on {host}:{port} ({e.strerror})") from None

    def frame(self, source: LiveSource, flagged: bool, captured: float) -> None:
        now = time.monotonic()
        if self._last is not None:
            rate = 1.0 / max(now - self._last, 1e-6)
            self.rate = rate if not self.scored else (1 - RATE_SMOOTHING) * self.rate + RATE_SMOOTHING * rate
        self._last = now
        self.scored += 1
        self.flagged += int(flagged)
        self.lag = now - captured
        read, dropped = source.read, source.dropped
        if self.metrics:
            m = self.metrics
            m["read"].inc(read - self._read)
            m["dropped"].inc(dropped - self._dropped)
            m["scored"].inc()
            m["flagged"].inc(int(flagged))
            m["rate"].set(self.rate)
            m["lag"].set(self.lag)
        self._read, self._dropped = read, dropped


class _Signals:
    """SIGINT and SIGTERM set ``stop`` (the loop ends after the frame being scored) instead of
    interrupting a write; the previous handlers come back on exit."""

    def __init__(self):
        self.stop = threading.Event()
        self.name = None

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handler(self, signum, frame):
        self.name = signal.Signals(signum).name
        self.stop.set()

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)


def watch(args, params: dict) -> dict:
    """Run ``spade-faiss watch`` with the parsed ``args`` and the Spade ``params`` among them;
    returns its summary (``source_error`` set when the source failed)."""
    maps = Maps.from_cli(args.maps)
    run = RunDir(args.out)
    with Spade.open(args.store, **params) as spade:
        spade.set_thresholds(tau=args.tau, theta=args.theta)
        if maps is Maps.AUTO and spade.tau_ is None:
            raise ValueError("--maps auto (the default: stage 2 only for frames above tau) needs an image threshold: "
                             "run `spade-faiss calibrate` or pass --tau")
        source = LiveSource(args.source, args.buffer, args.frame_stride, args.loop)  # refused now if not a source
        tally = Tally(args.metrics_port, args.metrics_host)
        spade.load_backbone()
        run.open(run_manifest(spade, args.store, args.source, args.maps), args.restart)
        scale = None if args.no_overlays or maps is Maps.NONE else colour_scale(spade)
        writer = run.writer(spade.crop, spade.resize, colour_max=scale, theta=spade.theta_, all_maps=False)
        start = next_status = time.monotonic()
        why = "source ended"
        with source, _Signals() as signals:
            while True:
                if signals.stop.is_set():
                    why = f"stopped by {signals.name}"
                    break
                if args.max_frames is not None and tally.scored >= args.max_frames:
                    why = "--max-frames reached"
                    break
                if args.seconds is not None and time.monotonic() - start >= args.seconds:
                    why = "--seconds reached"
                    break
                frame = source.get(timeout=0.25)
                if frame is None:
                    if source.ended:
                        break
                    continue
                image = LoadedImage(frame.path, sha256_bytes(frame.rgb.tobytes()), frame.rgb)
                result = next(spade.iter_score([image], maps=maps))
                writer.write([result])
                tally.frame(source, bool(result.is_anomalous), frame.captured)
                if time.monotonic() >= next_status:
                    next_status += STATUS_EVERY_S
                    print(f"watching {args.source}: {tally.scored} scored ({tally.rate:.2f}/s), {tally.flagged} "
                          f"flagged, {source.dropped} dropped, lag {tally.lag:.2f} s", file=sys.stderr, flush=True)
            read, dropped, error = source.read, source.dropped, source.error
    seconds = time.monotonic() - start
    summary = {"run": args.out, "source": args.source, "read": read, "scored": tally.scored,
               "flagged": tally.flagged, "dropped": dropped, "seconds": round(seconds, 2),
               "frames_per_s": round(tally.scored / seconds, 3) if seconds > 0 else 0.0, "ended": why,
               **({"source_error": error} if error else {})}
    run.record_invocation({"watch": summary, "finished": utc_now()})
    return summary
