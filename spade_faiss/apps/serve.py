"""Online scoring over HTTP (``spade-faiss serve``, extra ``serve``): one warm Spade behind a
deadline-aware scheduler (``scheduler.py``).

What a request asks decides what runs: ``map=false`` (default) the backbone and stage 1 only,
``map=true`` stage 2 too, ``map=auto`` stage 2 only when the image score exceeds the calibrated
threshold (the paper's gating); the response says which happened. A request that cannot be
served before its deadline is answered 503 at once, with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import math
import time

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import images as imglib
from ..detector import Spade
from . import pictures
from .runs import colour_scale
from .scheduler import MAPS, Busy, Job, Scheduler

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
DISCONNECT_POLL_S = 0.1
# Request counts are labelled by route, never by the raw path: anyone can send any path, and
# each new label value would be a new series kept for the life of the process.
ROUTES = ("/v1/health", "/v1/info", "/v1/score", "/metrics")
OTHER_ROUTE = "other"
DEADLINE_HEADER = "x-request-timeout"  # seconds the client will wait (also ?timeout=)
MAP_WORDS = {"false": "false", "0": "false", "no": "false", "true": "true", "1": "true", "yes": "true",
             "auto": "auto"}


class Metrics:
    """The service's Prometheus instruments, in a registry of their own (nothing global)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("spade_requests", "HTTP requests by route (ROUTES, else 'other') and status code",
                                ["path", "code"], registry=r)
        self.latency = Histogram("spade_request_seconds", "time to answer a scoring request, by lane",
                                 ["lane"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("spade_queue_depth", "jobs waiting, by lane", ["lane"], registry=r)
        self.batch_size = Histogram("spade_batch_size", "images per backbone batch", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.dropped = Counter("spade_dropped", "queued work dropped before it ran (expired, abandoned)",
                               ["reason"], registry=r)
        self.disconnected = Counter("spade_client_disconnects", "requests whose client left before the answer",
                                    registry=r)
        self.rejected = Counter("spade_rejected", "requests answered 503 at once, by reason", ["reason"], registry=r)
        self.service_seconds = Gauge("spade_service_seconds", "measured seconds per image, by lane", ["lane"],
                                     registry=r)


def create_app(spade: Spade, token: str | None = None, max_upload_bytes: int = 32 * 2**20,
               max_pixels: int = 50_000_000, timeout_s: float = 30.0, queue_size: int = 64,
               max_batch: int = 8, batch_window_ms: float = 5.0) -> FastAPI:
    """The FastAPI application serving ``spade`` (an opened Spade); the scheduler starts with
    the application and, at shutdown, serves what is queued before it stops."""
    metrics = Metrics()
    scheduler = Scheduler(spade, max_batch, batch_window_ms / 1000, queue_size, metrics)
    scale = colour_scale(spade)
    info = spade.info()

    async def lifespan(app):
        await run_in_threadpool(scheduler.start)
        yield
        await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="spade-faiss", version="2", lifespan=lifespan)
    app.add_middleware(Guard, token=token, metrics=metrics)

    @app.get("/v1/health")
    async def health():
        return {"status": "ok", "queue_depth": {lane: scheduler.depth(lane) for lane in scheduler.lanes}}

    @app.get("/v1/info")
    async def get_info():
        return {**info, "service_seconds_per_image": dict(scheduler.times), "timeout_s": timeout_s,
                "max_batch": max_batch}

    @app.get("/metrics")
    async def get_metrics():
        for lane in scheduler.lanes:
            metrics.queue_depth.labels(lane).set(scheduler.depth(lane))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # 404, 405, ...: the service's one error schema
        return error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return error(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.post("/v1/score")
    async def score(request: Request, map: str = "false", raw: bool = False, timeout: float | None = None):
        arrived = time.monotonic()
        client = timeout if timeout is not None else _header_seconds(request.headers.get(DEADLINE_HEADER))
        if client is not None and not (client > 0 and math.isfinite(client)):
            return error(400, f"timeout={client!r}: expected a positive number of seconds")
        deadline = arrived + (timeout_s if client is None else min(timeout_s, client))
        want = MAP_WORDS.get(map.lower())
        if want is None:
            return error(400, f"map={map!r}: expected one of {list(MAPS)}")
        if want == "auto" and spade.tau_ is None:
            return error(400, "map=auto needs an image threshold: calibrate the corpus first")
        data, name, problem = await _read_image(request, max_upload_bytes)
        if problem:
            return error(*problem)
        pixels = await run_in_threadpool(imglib.header_pixels, data)
        if pixels is not None and pixels > max_pixels:
            return error(413, f"image has {pixels} pixels, more than {max_pixels}")
        try:
            scheduler.admit(want != "false", deadline)  # before paying for decoding
            image = await run_in_threadpool(imglib.load_bytes, data, name)
            job = Job(image, want, deadline)
            scheduler.submit(job)
        except imglib.ImageError as e:
            return error(400, str(e))
        except Busy as busy:
            metrics.rejected.labels(busy.reason).inc()
            return error(503, f"server busy: {busy.reason}", headers={"Retry-After": str(math.ceil(busy.retry_after))})
        outcome = await _wait(request, job, scheduler)
        lane = "map" if want != "false" else "score"
        metrics.latency.labels(lane).observe(time.monotonic() - arrived)
        if outcome == "disconnected":
            metrics.disconnected.inc()
            return Response(status_code=499)
        if outcome == "late":
            metrics.rejected.labels("deadline passed").inc()
            return error(503, "not served within the deadline", headers={"Retry-After": "1"})
        try:
            result, map_status = job.future.result()
        except Exception as e:
            return error(500, f"scoring failed: {type(e).__name__}")
        out = {"score": result.score, "neighbours": result.neighbour_paths, "map": map_status}
        if result.is_anomalous is not None:
            out["is_anomalous"] = result.is_anomalous
        if result.map is not None:
            out["map_max"] = result.map_max
            out["map_png"] = base64.b64encode(pictures.map_png(result.map, scale)).decode()
            if raw:  # the map itself: float32, little-endian, crop x crop, row-major
                out["map_shape"] = list(result.map.shape)
                out["map_f32"] = base64.b64encode(result.map.astype("<f4").tobytes()).decode()
        return out

    app.state.scheduler = scheduler
    app.state.metrics = metrics
    return app


def error(code: int, message: str, headers=None) -> JSONResponse:
    """Every error the service answers: ``{"error": message}`` with its status code."""
    return JSONResponse({"error": message}, status_code=code, headers=headers)


def _header_seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return float("nan")  # refused with a 400 naming the value


def _authorized(header: bytes, token: str) -> bool:
    """``Authorization: Bearer TOKEN``, the scheme case-insensitive (RFC 7235), the token compared
    in constant time."""
    scheme, _, credentials = header.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), token.encode())


class Guard:
    """Bearer-token check (every path but ``/v1/health``) and request counting, as plain ASGI
    middleware (it leaves the client's disconnect visible to the handlers)."""

    def __init__(self, app, token: str | None, metrics: Metrics):
        self.app, self.token, self.metrics = app, token, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else OTHER_ROUTE
        if self.token is not None and path != "/v1/health":
            if not _authorized(dict(scope["headers"]).get(b"authorization", b""), self.token):
                response = error(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
                self.metrics.requests.labels(route, 401).inc()
                return await response(scope, receive, send)
        status = {}

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
        await self.app(scope, receive, send_and_note)
        self.metrics.requests.labels(route, status.get("code", 499)).inc()


async def _read_image(request: Request, max_upload_bytes: int):
    """(bytes, name, None) of the upload (raw body or multipart field ``file``), or
    (None, None, (status, message))."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_upload_bytes:
        return None, None, (413, f"upload of {length} bytes exceeds {max_upload_bytes}")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > max_upload_bytes:
            return None, None, (413, f"upload exceeds {max_upload_bytes} bytes")
    data, name = bytes(body), "upload"
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        data, name = await _multipart_file(request, data)
        if data is None:
            return None, None, (400, "multipart request without a file field")
    if not data:
        return None, None, (400, "empty request body: send the image bytes or a multipart 'file'")
    return data, name, None


async def _wait(request: Request, job: Job, scheduler: Scheduler) -> str:
    """``done``, ``disconnected`` or ``late`` (its deadline passed before the worker took it;
    admission makes this rare). Either way but ``done`` the job is abandoned: no more work."""
    future = asyncio.wrap_future(job.future)
    while True:
        done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
        if done:
            return "done"
        if await request.is_disconnected():
            job.abandoned = True
            return "disconnected"
        if time.monotonic() > job.deadline:
            if not job.started:
                job.abandoned = True
                return "late"
            scheduler.settle_late(job)


async def _multipart_file(request, body: bytes):
    from starlette.requests import Request as StarletteRequest

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}
    form = await StarletteRequest(request.scope, replay).form()
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            return None, None
        return await upload.read(), upload.filename or "upload"
    finally:
        await form.close()  # the spooled temporary files of every part


def run(spade: Spade, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Serve until SIGINT/SIGTERM: then stop accepting, answer what is queued, return (after
    SIGTERM normally, so that the process exits 0; SIGINT still interrupts)."""
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            # uvicorn re-raises a caught signal after its graceful shutdown (exit status -15);
            # a service that drained its queue on SIGTERM has ended normally.
            if sig == signal.SIGTERM and sig in getattr(self, "_captured_signals", []):
                self._captured_signals.remove(sig)

    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: reachable from other machines; use --token-file", host)
    Server(uvicorn.Config(create_app(spade, **options), host=host, port=port, log_level="warning")).run()
