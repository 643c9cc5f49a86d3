"""The service's HTTP plumbing: bearer-token checks and request counting (ASGI middleware),
reading an upload, waiting for a job while watching the client, the one error schema."""

from __future__ import annotations

import asyncio
import hmac
import re
import time

from fastapi import Request
from fastapi.responses import JSONResponse

from .scheduler import Job, Scheduler

DISCONNECT_POLL_S = 0.1
# Request counts are labelled by route, never by the raw path: anyone can send any path, and
# each new label value would be a new series kept for the life of the process.
ROUTES = ("/v1/health", "/v1/info", "/v1/score", "/v1/corpora", "/metrics")
CORPUS_ROUTE = re.compile(r"^/v1/corpora/[^/]+/(score|info)$")
OTHER_ROUTE = "other"
DEADLINE_HEADER = "x-request-timeout"  # seconds the client will wait (also ?timeout=)


def route_of(path: str) -> str:
    """The metrics label of a request path: a route, the corpus routes by template, else other."""
    if path in ROUTES:
        return path
    m = CORPUS_ROUTE.match(path)
    return f"/v1/corpora/{{name}}/{m.group(1)}" if m else OTHER_ROUTE


def error(code: int, message: str, headers=None) -> JSONResponse:
    """Every error the service answers: ``{"error": message}`` with its status code."""
    return JSONResponse({"error": message}, status_code=code, headers=headers)


def header_seconds(value: str | None) -> float | None:
    """A number of seconds given in a header; ``ValueError`` naming the text when it is not one."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{value!r}: expected a positive number of seconds") from None


def _authorized(header: bytes, token: str) -> bool:
    """``Authorization: Bearer TOKEN``, the scheme case-insensitive (RFC 7235), the token compared
    in constant time."""
    scheme, _, credentials = header.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), token.encode())


class Guard:
    """Bearer-token check (every path but ``/v1/health``) and request counting, as plain ASGI
    middleware (it leaves the client's disconnect visible to the handlers)."""

    def __init__(self, app, token: str | None, metrics):  # served.Metrics
        self.app, self.token, self.metrics = app, token, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = route_of(path)
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


async def read_image(request: Request, max_upload_bytes: int):
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


async def wait_for(request: Request, job: Job, scheduler: Scheduler) -> str:
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
