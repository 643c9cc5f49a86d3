"""Online scoring over HTTP (``spade-faiss serve``, extra ``serve``): one warm Spade,
micro-batched.

Concurrent requests are decoded in the server's thread pool, queued (bounded: a full queue
answers 503 with Retry-After), and a single worker thread gathers up to ``max_batch`` of them
for at most ``batch_window_ms`` into one backbone batch and one pass of the scorer.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import queue
import threading
import time
from concurrent.futures import Future

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse

from .. import images as imglib
from ..detector import Spade
from . import pictures

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)


class Metrics:
    """Prometheus counters and histograms, rendered as text."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.batches = [0] * (len(BATCH_BUCKETS) + 1)
        self.batch_sum = 0

    def request(self, path: str, code: int, seconds: float):
        with self.lock:
            self.requests[(path, code)] = self.requests.get((path, code), 0) + 1
            self.latency[_bucket(seconds, LATENCY_BUCKETS)] += 1
            self.latency_sum += seconds

    def batch(self, size: int):
        with self.lock:
            self.batches[_bucket(size, BATCH_BUCKETS)] += 1
            self.batch_sum += size

    def render(self, queue_depth: int) -> str:
        with self.lock:
            lines = ["# TYPE spade_requests_total counter"]
            lines += [f'spade_requests_total{{path="{p}",code="{c}"}} {n}'
                      for (p, c), n in sorted(self.requests.items())]
            lines += ["# TYPE spade_errors_total counter",
                      f"spade_errors_total {sum(n for (_, c), n in self.requests.items() if c >= 400)}"]
            lines += _histogram("spade_request_seconds", LATENCY_BUCKETS, self.latency, self.latency_sum)
            lines += _histogram("spade_batch_size", BATCH_BUCKETS, self.batches, self.batch_sum)
            lines += ["# TYPE spade_queue_depth gauge", f"spade_queue_depth {queue_depth}"]
        return "\n".join(lines) + "\n"


def _bucket(value, bounds) -> int:
    return next((i for i, b in enumerate(bounds) if value <= b), len(bounds))


def _histogram(name, bounds, counts, total) -> list[str]:
    out, cum = [f"# TYPE {name} histogram"], 0
    for b, c in zip(list(bounds) + ["+Inf"], counts):
        cum += c
        out.append(f'{name}_bucket{{le="{b}"}} {cum}')
    return out + [f"{name}_sum {total}", f"{name}_count {cum}"]


class Batcher:
    """The one thread that runs the model: gathers queued requests into batches."""

    def __init__(self, spade: Spade, max_batch: int, window_s: float, queue_size: int, metrics: Metrics):
        self.spade, self.max_batch, self.window_s, self.metrics = spade, max_batch, window_s, metrics
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.thread = threading.Thread(target=self._run, name="spade-batcher", daemon=True)
        self.thread.start()

    def submit(self, image, want_map: bool) -> Future:
        """Queue one decoded image; raises ``queue.Full`` when the queue is full."""
        fut: Future = Future()
        self.queue.put_nowait(((image, want_map), fut))
        return fut

    def _gather(self) -> list:
        batch = [self.queue.get()]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self):
        while True:
            live = [(p, f) for p, f in self._gather() if f.set_running_or_notify_cancel()]
            if not live:
                continue
            self.metrics.batch(len(live))
            try:
                retrieved = self.spade.retrieve([image for (image, _), _ in live])
                self.spade.segment([r for r, ((_, want), _) in zip(retrieved, live) if want])
                for r, (_, f) in zip(retrieved, live):
                    f.set_result(self.spade.result(r))
            except Exception as e:  # answer every waiting request, keep serving
                log.exception("scoring failed")
                for _, f in live:
                    f.set_exception(e)


def create_app(spade: Spade, token: str | None = None, max_upload_bytes: int = 32 * 2**20,
               max_pixels: int = 50_000_000, timeout_s: float = 30.0, queue_size: int = 64,
               max_batch: int = 8, batch_window_ms: float = 5.0):
    """The FastAPI application serving ``spade`` (an opened Spade)."""
    app = FastAPI(title="spade-faiss", version="1")
    metrics = Metrics()
    batcher = Batcher(spade, max_batch, batch_window_ms / 1000, queue_size, metrics)
    info = spade.info()
    scale = pictures.colour_scale_max(spade.theta_, 2 * spade.leave_one_out_theta())

    def error(code: int, message: str, headers=None):
        return JSONResponse({"error": message}, status_code=code, headers=headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        start = time.perf_counter()
        if token is not None and request.url.path != "/v1/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                response = error(401, "missing or wrong bearer token")
                response.headers["WWW-Authenticate"] = "Bearer"
                metrics.request(request.url.path, 401, time.perf_counter() - start)
                return response
        response = await call_next(request)
        metrics.request(request.url.path, response.status_code, time.perf_counter() - start)
        return response

    @app.get("/v1/health")
    async def health():
        return {"status": "ok", "queue_depth": batcher.queue.qsize()}

    @app.get("/v1/info")
    async def get_info():
        return info

    @app.get("/metrics")
    async def get_metrics():
        return PlainTextResponse(metrics.render(batcher.queue.qsize()), media_type="text/plain; version=0.0.4")

    @app.post("/v1/score")
    async def score(request: Request, map: bool = False):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_upload_bytes:
            return error(413, f"upload of {length} bytes exceeds {max_upload_bytes}")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > max_upload_bytes:
                return error(413, f"upload exceeds {max_upload_bytes} bytes")
        data, name = bytes(body), "upload"
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            data, name = await _multipart_file(request, bytes(body))
            if data is None:
                return error(400, "multipart request without a file field")
        if not data:
            return error(400, "empty request body: send the image bytes or a multipart 'file'")
        pixels = await run_in_threadpool(imglib.header_pixels, data)
        if pixels is not None and pixels > max_pixels:
            return error(413, f"image has {pixels} pixels, more than {max_pixels}")
        try:
            image = await run_in_threadpool(imglib.load_bytes, data, name)
        except imglib.ImageError as e:
            return error(400, str(e))
        try:
            fut = batcher.submit(image, map)
        except queue.Full:
            return error(503, "server busy: queue full", headers={"Retry-After": "1"})
        try:
            r = await asyncio.wait_for(asyncio.wrap_future(fut), timeout_s)
        except TimeoutError:
            fut.cancel()
            return error(504, f"scoring took longer than {timeout_s} s")
        except Exception as e:
            return error(500, f"scoring failed: {type(e).__name__}")
        out = {"score": r.score, "neighbours": r.neighbour_paths}
        if r.is_anomalous is not None:
            out["is_anomalous"] = r.is_anomalous
        if r.map is not None:
            out["map_max"] = r.map_max
            out["map_png"] = base64.b64encode(pictures.map_png(r.map, scale)).decode()
        return out

    app.state.batcher = batcher
    return app


async def _multipart_file(request, body: bytes):
    from starlette.requests import Request as StarletteRequest

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}
    form = await StarletteRequest(request.scope, replay).form()
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        return None, None
    return await upload.read(), upload.filename or "upload"


def run(spade: Spade, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Serve until interrupted."""
    import uvicorn
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: reachable from other machines; use --token-file", host)
    uvicorn.run(create_app(spade, **options), host=host, port=port, log_level="warning")
