"""Online scoring over HTTP (``spade-faiss serve``, extra ``serve``): warm Spades, one per
corpus, each behind a deadline-aware scheduler (``scheduler.py``); corpora built with the same
weights share one model (``served.py``).

What a request asks decides what runs: ``map=false`` (default) the backbone and stage 1 only,
``map=true`` stage 2 too, ``map=auto`` stage 2 only when the image score exceeds the calibrated
threshold (the paper's gating); the response says which happened. A request that cannot be
served before its deadline is answered 503 at once, with ``Retry-After``.

Routes: ``/v1/corpora/NAME/score`` and ``/v1/corpora/NAME/info`` per corpus, ``/v1/corpora``
(the list), and, when one corpus is served, ``/v1/score`` and ``/v1/info`` for it.
"""

from __future__ import annotations

import base64
import logging
import math
import time

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import images as imglib
from .. import video
from ..config import SERVICE_DEFAULTS, Maps, check_values
from ..detector import Spade
from ..regions import find_regions
from ..scoring import map_to_original
from . import pictures
from .http import DEADLINE_HEADER, Guard, error, header_seconds, read_image, wait_for
from .scheduler import Busy, Job
from .served import Metrics, ServedCorpus

MAX_CLIP_FRAMES = 64  # frames of one uploaded clip (each also within the pixel limit)

log = logging.getLogger(__name__)



def create_app(spades: Spade | dict[str, Spade], token: str | None = None,
               max_upload_bytes: int = int(SERVICE_DEFAULTS["max_upload_mb"] * 2**20),
               max_pixels: int = SERVICE_DEFAULTS["max_pixels"], timeout_s: float = SERVICE_DEFAULTS["timeout_s"],
               queue_size: int = SERVICE_DEFAULTS["queue_size"], max_batch: int = SERVICE_DEFAULTS["max_batch"],
               batch_window_ms: float = SERVICE_DEFAULTS["batch_window_ms"],
               refresh_s: float = SERVICE_DEFAULTS["refresh_s"]) -> FastAPI:
    """The FastAPI application serving ``spades`` (an opened Spade, or {name: Spade}); the
    schedulers start with the application and, at shutdown, serve what is queued before they
    stop. Every ``refresh_s`` seconds (0: never) each takes in images appended and thresholds
    calibrated beside its corpus meanwhile."""
    check_values({"max_upload_mb": max_upload_bytes / 2**20, "max_pixels": max_pixels, "timeout_s": timeout_s,
                  "queue_size": queue_size, "max_batch": max_batch, "batch_window_ms": batch_window_ms,
                  "refresh_s": refresh_s})
    if isinstance(spades, Spade):
        spades = {"default": spades}
    metrics = Metrics()
    corpora = {name: ServedCorpus(name, spade, metrics, max_batch, batch_window_ms / 1000, queue_size, refresh_s)
               for name, spade in spades.items()}
    only = next(iter(corpora.values())) if len(corpora) == 1 else None

    async def lifespan(app):
        for c in corpora.values():
            await run_in_threadpool(c.scheduler.start)
        yield
        for c in corpora.values():
            await run_in_threadpool(c.scheduler.stop)

    app = FastAPI(title="spade-faiss", version="2", lifespan=lifespan)
    app.add_middleware(Guard, token=token, metrics=metrics)

    def served(name: str | None) -> ServedCorpus | None:
        return only if name is None else corpora.get(name)

    def unknown(name: str | None):
        if name is None:
            return error(404, f"{len(corpora)} corpora are served: use /v1/corpora/NAME/..., NAME one of "
                              f"{sorted(corpora)}")
        return error(404, f"no corpus {name!r}: served are {sorted(corpora)}")

    @app.get("/v1/health")
    async def health():
        """``ok``, ``degraded`` (a corpus answers from its last good state: the reason is named) or
        ``down`` (a corpus's worker stopped: 503, so that a load balancer stops sending)."""
        depth = {n: {lane: c.scheduler.depth(lane) for lane in c.scheduler.lanes} for n, c in corpora.items()}
        states = {n: c.health() for n, c in corpora.items()}
        worst = max((s for s, _ in states.values()), key=("ok", "degraded", "down").index)
        body = {"status": worst, "queue_depth": depth[only.name] if only else depth}
        problems = {n: reason for n, (_, reason) in states.items() if reason}
        if problems:
            body["problems"] = problems
        return JSONResponse(body, status_code=503 if worst == "down" else 200)

    @app.get("/v1/corpora")
    async def list_corpora():
        return {"corpora": {n: {"images": c.state.served["images"], "store": c.state.info["store"]}
                            for n, c in corpora.items()},
                "models": len({id(c.spade.extractor_) for c in corpora.values()})}

    async def info(name: str | None = None):
        c = served(name)
        if c is None:
            return unknown(name)
        return {**c.info(), "timeout_s": timeout_s, "max_batch": max_batch}

    app.get("/v1/info")(info)
    app.get("/v1/corpora/{name}/info")(info)

    @app.get("/metrics")
    async def get_metrics():
        for c in corpora.values():
            for lane in c.scheduler.lanes:
                c.metrics.queue_depth.labels(lane).set(c.scheduler.depth(lane))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # 404, 405, ...: the service's one error schema
        return error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return error(422, f"{where}: {first.get('msg', 'invalid request')}")

    async def score(request: Request, name: str | None = None, map: str = "false", raw: bool = False,
                    timeout: float | None = None):
        c = served(name)
        if c is None:
            return unknown(name)
        return await _score(c, request, map, raw, timeout, timeout_s, max_upload_bytes, max_pixels)

    app.post("/v1/score")(score)
    app.post("/v1/corpora/{name}/score")(score)
    app.state.corpora = corpora
    app.state.metrics = metrics
    return app


async def _score(c: ServedCorpus, request: Request, map: str, raw: bool, timeout: float | None, timeout_s: float,
                 max_upload_bytes: int, max_pixels: int):
    spade, scheduler, metrics = c.spade, c.scheduler, c.metrics
    arrived = time.monotonic()
    try:
        client = timeout if timeout is not None else header_seconds(request.headers.get(DEADLINE_HEADER))
    except ValueError as e:
        return error(400, f"{DEADLINE_HEADER}: {e}")
    if client is not None and not (client > 0 and math.isfinite(client)):
        return error(400, f"timeout={client!r}: expected a positive number of seconds")
    deadline = arrived + (timeout_s if client is None else min(timeout_s, client))
    try:
        want = Maps.from_http(map)
    except ValueError as e:
        return error(400, str(e))
    if want is Maps.AUTO and spade.tau_ is None:
        return error(400, "map=auto needs an image threshold: calibrate the corpus first")
    data, name, problem = await read_image(request, max_upload_bytes)
    if problem:
        return error(*problem)
    if spade.config_.image_score != "knn" and want is not Maps.ALL:
        return error(400, f"image_score={spade.config_.image_score!r} is computed from the map: ask map=true")
    if video.is_video_bytes(data):
        return await _score_clip(c, request, data, name, want, raw, deadline, max_pixels, arrived)
    pixels = await run_in_threadpool(imglib.header_pixels, data)
    if pixels is not None and pixels > max_pixels:
        return error(413, f"image has {pixels} pixels, more than {max_pixels}")
    try:
        scheduler.admit(want is not Maps.NONE, deadline)  # before paying for decoding
        image = await run_in_threadpool(imglib.load_bytes, data, name)
        job = Job(image, want, deadline)
        scheduler.submit(job)
    except imglib.ImageError as e:
        return error(400, str(e))
    except Busy as busy:
        metrics.rejected.labels(busy.reason).inc()
        return error(503, f"server busy: {busy.reason}", headers={"Retry-After": str(math.ceil(busy.retry_after))})
    outcome = await wait_for(request, job, scheduler)
    lane = "map" if want is not Maps.NONE else "score"
    metrics.latency.labels(lane).observe(time.monotonic() - arrived)
    if outcome == "disconnected":
        metrics.disconnected.inc()
        return Response(status_code=499)
    if outcome == "late":
        metrics.rejected.labels("deadline passed").inc()
        return error(503, "not served within the deadline", headers={"Retry-After": "1"})
    return _answer(c, job, raw)


def _answer(c: ServedCorpus, job: Job, raw: bool):
    """The JSON answer of one finished job (an image, or one frame of a clip), or an error."""
    spade = c.spade
    try:
        result, map_status = job.future.result()
    except Exception as e:
        return error(500, f"scoring failed: {type(e).__name__}")
    if result.error is not None:  # its gallery cannot be read: the corpus is damaged (named)
        return error(500, result.error)
    out = {"score": result.score, "knn_score": result.knn_score, "neighbours": result.neighbour_paths,
           "map": map_status, "corpus": job.corpus}
    if result.is_anomalous is not None:
        out["is_anomalous"] = result.is_anomalous
    if result.map is not None:
        out["map_max"] = result.map_max
        out["map_score"] = result.map_score
        out["map_png"] = base64.b64encode(pictures.map_png(result.map, c.state.scale)).decode()
        if spade.theta_ is not None and result.image is not None:  # defect regions, in the image's pixels
            found = find_regions(map_to_original(result.map, result.image.size, spade.resize), spade.theta_)
            out["regions"] = [g.as_dict() for g in found]
        if raw:  # the map itself: float32, little-endian, crop x crop, row-major
            out["map_shape"] = list(result.map.shape)
            out["map_f32"] = base64.b64encode(result.map.astype("<f4").tobytes()).decode()
    return out


async def _score_clip(c: ServedCorpus, request: Request, data: bytes, name: str, want: Maps, raw: bool,
                      deadline: float, max_pixels: int, arrived: float):
    """A short video clip: each frame scored as an image (in frame order), answered per frame."""
    scheduler, metrics = c.scheduler, c.metrics
    try:
        frames = await run_in_threadpool(video.clip_frames, data, name, max_pixels, MAX_CLIP_FRAMES)
    except video.VideoError as e:
        return error(413 if "more than" in str(e) else 400, str(e))
    jobs = []
    try:
        for ref, rgb in frames:
            scheduler.admit(want is not Maps.NONE, deadline)
            job = Job(imglib.LoadedImage(ref.path, imglib.sha256_bytes(rgb.tobytes()), rgb), want, deadline)
            scheduler.submit(job)
            jobs.append((ref, job))
    except Busy as busy:
        for _, job in jobs:
            job.abandoned = True
        metrics.rejected.labels(busy.reason).inc()
        return error(503, f"server busy: {busy.reason} (a clip of {len(frames)} frames)",
                     headers={"Retry-After": str(math.ceil(busy.retry_after))})
    answers = []
    for ref, job in jobs:
        outcome = await wait_for(request, job, scheduler)
        if outcome != "done":
            for _, rest in jobs:
                rest.abandoned = True
            if outcome == "disconnected":
                metrics.disconnected.inc()
                return Response(status_code=499)
            metrics.rejected.labels("deadline passed").inc()
            return error(503, "not served within the deadline", headers={"Retry-After": "1"})
        one = _answer(c, job, raw)
        if not isinstance(one, dict):
            return one
        answers.append({"frame": ref.frame, "time_s": ref.time_s, **one})
    metrics.latency.labels("map" if want is not Maps.NONE else "score").observe(time.monotonic() - arrived)
    return {"frames": answers, "corpus": answers[-1]["corpus"] if answers else None}


def run(spades: Spade | dict[str, Spade], host: str = SERVICE_DEFAULTS["host"], port: int = SERVICE_DEFAULTS["port"],
        **options) -> None:
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
    Server(uvicorn.Config(create_app(spades, **options), host=host, port=port, log_level="warning")).run()
