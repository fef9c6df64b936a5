"""A model bundle behind HTTP: `POST /predict`, `GET /health`, `GET /model` and a self-contained page at `/`.

Built to be reachable by strangers: the body is counted while it streams in (413 past the limit), images
are checked by decoding, never by name (415), an optional API key is compared in constant time (401),
errors never carry a traceback (500 is generic), and inference runs on a fixed number of threads behind
a bounded queue: a request beyond it is refused at once (503) before its body is read, so a burst costs
neither memory nor disk. With `batch_window_ms > 0` requests that wait together share one forward pass.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import logging
import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, List, Optional

from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader
from PIL import Image

from ..config import DataConfig
from ..errors import UserError
from ..predict import Predictor

__all__ = ["create_app", "InferencePool"]

log = logging.getLogger("effitune.serve")
MB = 1024 * 1024
API_KEY_HEADER = "X-API-Key"
# What /model shows: what a client needs to interpret predictions, never the server's paths or config.
PUBLIC_META_KEYS = ("format_version", "created", "versions", "classes", "backbone", "weight_source",
                    "preprocessing", "metrics", "temperature", "split_counts", "phases")
WRONG_KEY = f"missing or wrong API key: send it in the {API_KEY_HEADER} header"
READABLE = "Send JPEG, PNG, WebP, GIF, BMP or TIFF; the file's content decides, not its name."


class Busy(Exception):
    """Every inference slot and queue place is taken."""


@dataclass
class _Job:
    images: list[bytes]
    top_k: int
    future: asyncio.Future


class InferencePool:
    """`workers` threads run predictions; at most `queue_size` more requests wait; the rest get `Busy`.

    Admission (`admit`) happens before a request's body is read. A dispatcher hands each worker one job
    at a time, so the thread pool never holds a backlog: a request that times out while queued never
    runs, and one that times out while running keeps its worker until it ends (bounded by `workers`).
    With `batch_window_s > 0` a job that finds the queue empty waits that long for company, then every
    waiting request (up to `max_batch_images`) goes through the network as one batch.
    """

    def __init__(self, predictor, workers: int = 2, queue_size: int = 32, batch_window_s: float = 0.0,
                 max_batch_images: int = 32):
        if workers < 1 or queue_size < 0:
            raise UserError(f"workers must be >= 1 and queue_size >= 0, got {workers} and {queue_size}")
        self.predictor, self.workers, self.batch_window_s = predictor, workers, batch_window_s
        self.max_batch_images = max_batch_images
        self.capacity = workers + queue_size
        self.admitted = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def admit(self) -> None:
        if self.admitted >= self.capacity:
            raise Busy
        self.admitted += 1

    def release(self) -> None:
        self.admitted -= 1

    @property
    def queued(self) -> int:
        """Requests waiting for a worker now."""
        return len(self._waiting) if self._loop is not None else 0

    def start(self) -> None:
        """Bind to the running event loop (again, if the app moved to another loop, as test clients do)."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        self.stop()
        self._loop, self._waiting, self._arrived = loop, deque(), asyncio.Event()
        self._slots = asyncio.Semaphore(self.workers)
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="effitune-infer")
        self._task = loop.create_task(self._dispatch())

    def stop(self) -> None:
        if self._loop is None:
            return
        self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._loop = None

    async def predict(self, images: list[bytes], top_k: int) -> list[dict]:
        self.start()
        job = _Job(images, top_k, self._loop.create_future())
        self._waiting.append(job)
        self._arrived.set()
        return await job.future  # cancelling the caller cancels the job; the dispatcher then skips it

    async def _dispatch(self) -> None:
        while True:
            await self._slots.acquire()
            jobs = await self._next_jobs()
            work = self._loop.run_in_executor(self._executor, _run_jobs, self.predictor, jobs)
            work.add_done_callback(lambda done, jobs=jobs: self._deliver(done, jobs))

    async def _next_jobs(self) -> list[_Job]:
        """The oldest live job, plus (when batching) the waiting jobs that fit beside it."""
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            jobs = [self._waiting.popleft()]
            if self.batch_window_s and not jobs[0].future.cancelled():
                if not self._waiting:
                    await asyncio.sleep(self.batch_window_s)  # alone: wait a moment for company
                room = self.max_batch_images - len(jobs[0].images)
                while self._waiting and len(self._waiting[0].images) <= room:
                    jobs.append(self._waiting.popleft())
                    room -= len(jobs[-1].images)
            jobs = [job for job in jobs if not job.future.cancelled()]  # timed out while waiting
            if jobs:
                return jobs

    def _deliver(self, done: asyncio.Future, jobs: list[_Job]) -> None:
        self._slots.release()
        error = None if done.cancelled() else done.exception()
        for index, job in enumerate(jobs):
            if job.future.done():
                continue
            if done.cancelled():
                job.future.cancel()
            elif error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(done.result()[index])


def _run_jobs(predictor, jobs: list[_Job]) -> list[list[dict]]:
    """One forward pass over every job's images; each job gets its own slice, cut to its own top-k."""
    images = [image for job in jobs for image in job.images]
    results = predictor.predict(images, top_k=max(job.top_k for job in jobs))
    split, start = [], 0
    for job in jobs:
        chunk = results[start:start + len(job.images)]
        start += len(job.images)
        split.append([{**r, "top_k": r["top_k"][:job.top_k]} if "top_k" in r else r for r in chunk])
    return split


def create_app(bundle: str | Path | Predictor, *, api_key: str | None = None, max_upload_bytes: int = 10 * MB,
               max_images: int = 16, timeout_s: float = 30.0, workers: int = 2, batch_window_ms: float = 0,
               queue_size: int = 32, max_batch_images: int = 32,
               max_pixels: int = DataConfig.max_pixels) -> FastAPI:
    """The HTTP app for one bundle folder (or a ready Predictor, e.g. another backend).

    `max_upload_bytes` bounds a whole request body; `queue_size` requests may wait for one of `workers`
    inference threads; `timeout_s` covers the wait and the inference.
    """
    predictor = bundle if hasattr(bundle, "predict") else Predictor(bundle)
    meta = predictor.meta
    name = meta.get("name") or meta["backbone"]
    pool = InferencePool(predictor, workers, queue_size, batch_window_ms / 1000, max_batch_images)
    expected_key = api_key.encode() if api_key else None
    page = _read_page()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        pool.start()
        yield
        pool.stop()

    app = FastAPI(title="effitune", version="1", lifespan=lifespan, description=f"Image classifier `{name}`.")
    app.state.pool = pool
    app.add_middleware(_Guard, pool=pool, max_bytes=max_upload_bytes, expected_key=expected_key)
    _add_error_handlers(app)

    def require_key(given: str | None = Depends(APIKeyHeader(name=API_KEY_HEADER, auto_error=False))) -> None:
        if not _key_matches(expected_key, given):
            raise HTTPException(401, WRONG_KEY)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page.html, headers={"Content-Security-Policy": page.csp, "X-Frame-Options": "DENY"})

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name, "classes": len(meta["classes"]), "auth_required": bool(api_key),
                "max_images": max_images, "max_upload_bytes": max_upload_bytes,
                "in_flight": pool.admitted, "capacity": pool.capacity}

    @app.get("/model", dependencies=[Depends(require_key)])
    async def model() -> dict:
        described = {"name": name, **public_meta(meta)}
        if predictor.unknown is not None:  # the thresholds this server decides with (INT8 has its own)
            described["unknown"] = _without_paths(predictor.unknown.section)
        return described

    @app.post("/predict", dependencies=[Depends(require_key)], responses={
        401: {"description": "API key missing or wrong"}, 413: {"description": "Body, image count or pixels too large"},
        415: {"description": "A file is not a readable image"}, 422: {"description": "Malformed request"},
        503: {"description": "Busy: retry"}, 504: {"description": "Inference timed out"}})
    async def predict(files: List[UploadFile] = File(..., description="One or more images (field `files`)."),
                      top_k: int = Query(5, ge=1, le=1000, description="Classes listed per image.")) -> dict:
        started = time.perf_counter()
        if len(files) > max_images:
            raise HTTPException(413, f"{len(files)} images in one request; the limit is {max_images}. "
                                     "Send them in several requests.")
        names = [(upload.filename or f"file {i + 1}")[:255] for i, upload in enumerate(files)]
        images = [await upload.read() for upload in files]
        for filename, data in zip(names, images):
            _check_image(filename, data, max_pixels)
        try:
            results = await asyncio.wait_for(pool.predict(images, top_k), timeout_s)
        except TimeoutError:
            raise HTTPException(504, f"inference took longer than {timeout_s:g} s; send fewer images or "
                                     "retry later") from None
        unreadable = [f"{filename!r} ({r['error']})" for filename, r in zip(names, results) if "error" in r]
        if unreadable:
            raise HTTPException(415, f"not a readable image: {', '.join(unreadable)}. {READABLE}")
        return {"results": [{"filename": filename, **{k: v for k, v in r.items() if k != "path"}}
                            for filename, r in zip(names, results)],
                "latency_ms": round((time.perf_counter() - started) * 1000, 2), "model": name}

    @app.post("/explain", dependencies=[Depends(require_key)], responses={
        401: {"description": "API key missing or wrong"}, 413: {"description": "Body, image count or pixels too large"},
        415: {"description": "A file is not a readable image"}, 422: {"description": "Malformed request or unknown target"},
        503: {"description": "Busy: retry"}, 504: {"description": "Explaining timed out"}})
    async def explain(files: List[UploadFile] = File(..., description="One or more images (field `files`)."),
                      target: Optional[str] = Query(None, description="Explain this class (default: the predicted one).")
                      ) -> dict:
        """Where the model looks: per image its label, probability, the heatmap's `peak` [x, y] (fractions of
        the image, top left) and `overlay_png` (base64 PNG of the heatmap over the image)."""
        started = time.perf_counter()
        if len(files) > max_images:
            raise HTTPException(413, f"{len(files)} images in one request; the limit is {max_images}. "
                                     "Send them in several requests.")
        if target is not None and target not in predictor.classes:
            raise HTTPException(422, f"target {target!r} is not one of the model's classes")
        names = [(upload.filename or f"file {i + 1}")[:255] for i, upload in enumerate(files)]
        images = [await upload.read() for upload in files]
        for filename, data in zip(names, images):
            _check_image(filename, data, max_pixels)
        try:
            explained = await asyncio.wait_for(asyncio.to_thread(predictor.explain, images, target), timeout_s)
        except TimeoutError:
            raise HTTPException(504, f"explaining took longer than {timeout_s:g} s; send fewer images or "
                                     "retry later") from None
        unreadable = [f"{filename!r} ({e.error})" for filename, e in zip(names, explained) if e.error is not None]
        if unreadable:
            raise HTTPException(415, f"not a readable image: {', '.join(unreadable)}. {READABLE}")
        return {"results": [{"filename": filename, **{k: v for k, v in e.to_dict().items() if k != "path"},
                             "overlay_png": _png_base64(e.overlay())} for filename, e in zip(names, explained)],
                "latency_ms": round((time.perf_counter() - started) * 1000, 2), "model": name}

    return app


GUARDED = ("/predict", "/explain")  # POST paths whose body, key and queue place `_Guard` checks first


def _png_base64(image: Image.Image) -> str:
    stream = io.BytesIO()
    image.save(stream, format="PNG")
    return base64.b64encode(stream.getvalue()).decode("ascii")


def public_meta(meta: dict) -> dict:
    """The bundle metadata a client may see: the listed keys plus unknown-image settings, no absolute paths."""
    keys = [k for k in meta if k in PUBLIC_META_KEYS or "unknown" in k or "threshold" in k]
    return {k: _without_paths(meta[k]) for k in keys}


def _without_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items() if not _is_path(v)}
    if isinstance(value, list):
        return [_without_paths(v) for v in value if not _is_path(v)]
    return value


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and bool(re.match(r"^(/|~|[A-Za-z]:[\\/]|\\\\)", value))


def _check_image(filename: str, data: bytes, max_pixels: int) -> None:
    """Identify the format from the bytes and read the size from the header (no full decode here)."""
    if not data:
        raise HTTPException(415, f"{filename!r} is empty. {READABLE}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = image.width * image.height
    except Image.DecompressionBombError:
        pixels = max_pixels + 1
    except Exception:  # noqa: BLE001 - Pillow raises many types for foreign bytes
        raise HTTPException(415, f"{filename!r} is not an image effitune can read. {READABLE}") from None
    if pixels > max_pixels:
        raise HTTPException(413, f"{filename!r} has more than {max_pixels} pixels; scale it down first.")


def _key_matches(expected: bytes | None, given: str | None) -> bool:
    if expected is None:
        return True
    return given is not None and hmac.compare_digest(expected, given.encode("utf-8"))


class _Guard:
    """Checks on POST /predict before its body is read: key, declared size and a free queue place;
    then counts the body as it streams in, so a chunked upload can't pass the limit either."""

    def __init__(self, app, pool: InferencePool, max_bytes: int, expected_key: bytes | None):
        self.app, self.pool, self.max_bytes, self.expected_key = app, pool, max_bytes, expected_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in GUARDED or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        too_large = f"request body over {self.max_bytes} bytes; send fewer or smaller images"
        if not _key_matches(self.expected_key, headers.get(API_KEY_HEADER.lower())):
            return await _reply(scope, receive, send, 401, WRONG_KEY)
        if _declared_length(headers) > self.max_bytes:
            return await _reply(scope, receive, send, 413, too_large)
        try:
            self.pool.admit()
        except Busy:
            return await _reply(scope, receive, send, 503, "server busy; retry in a moment", {"Retry-After": "1"})
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, too_large)
            return message

        try:
            await self.app(scope, counted, send)
        finally:
            self.pool.release()


def _declared_length(headers: dict) -> int:
    try:
        return int(headers.get("content-length") or 0)
    except ValueError:
        return 0  # a malformed length is the server's to reject; the streaming count still applies


async def _reply(scope, receive, send, status: int, detail: str, headers: dict | None = None) -> None:
    await JSONResponse({"detail": detail}, status, headers=headers)(scope, receive, send)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def malformed(_: Request, error: RequestValidationError):
        problems = [{"where": ".".join(str(part) for part in e.get("loc", ())), "problem": e.get("msg", "")}
                    for e in error.errors()]  # no echo of the submitted values
        missing_files = any(p["where"] == "body.files" for p in problems)
        detail = ("no images: send one or more image files in the multipart form field 'files'" if missing_files
                  else "malformed request: " + "; ".join(f"{p['where']}: {p['problem']}" for p in problems))
        return JSONResponse({"detail": detail, "errors": problems}, 422)

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=error)
        return JSONResponse({"detail": "internal server error; the server log has the details"}, 500)


@dataclass
class _Page:
    html: str
    csp: str


def _read_page() -> _Page:
    """The page and a Content-Security-Policy that allows its own inline code (by hash) and nothing external."""
    html = (resources.files("effitune.serve") / "static" / "index.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in bodies)

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; img-src blob: data:; "
           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return _Page(html, csp)
