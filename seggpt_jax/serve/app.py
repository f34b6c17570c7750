"""The HTTP service: FastAPI routes over an :class:`~seggpt_jax.serve.engine.Engine`.

``POST /v1/segment`` takes multipart uploads (``query`` files, ``prompt_image``/``prompt_mask`` files or a
``prompt_id``, optional ``num_labels``, ``colour_map``, ``timeout_s``) and answers one mask PNG (one query,
``Accept: image/png``) or JSON ``{"masks": [{"name", "width", "height", "png_base64"}, ...]}``.
``POST /v1/prompts`` registers a prompt set. ``GET /healthz``, ``/readyz``, ``/metrics``, ``/v1/info``,
``/v1/palette/{num_labels}``; the demo page at ``/``.

Every error is JSON ``{"detail": "<one line naming the problem>"}``: 400 undecodable image, 404 unknown
``prompt_id``, 406 unacceptable ``Accept``, 413 body over ``--max-body-mb`` (or an image over the pixel
limit), 415 not ``multipart/form-data``, 422 count mismatch or bad field, 429 queue full (with
``Retry-After``), 503 warming up or draining, 504 deadline passed. A request whose client disconnects is
dropped before it reaches the device.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.resources
import logging
import math
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..version import __version__
from ..imaging.masks import build_palette
from .batcher import DeadlineExceeded, Draining, NotReady, QueueFull
from .engine import MAX_LABELS, Engine, PromptSet, RequestProblem, prompt_set_id
from .metrics import Metrics

logger = logging.getLogger(__name__)

#: Routes by path, for the latency metric's ``route`` label (anything else is ``other``).
ROUTES = ("/", "/demo.js", "/healthz", "/readyz", "/metrics", "/v1/info", "/v1/segment", "/v1/prompts",
          "/openapi.json", "/docs")
WORK_ROUTES = ("/v1/segment", "/v1/prompts")  # POST routes that need the model
STATUS_OF_KIND = {"bad_image": 400, "unknown_prompt": 404, "too_large": 413, "invalid_field": 422}
CLIENT_GONE = 499  # the status logged (nginx's convention) for a request whose client disconnected


# ------------------------------------------------------------------------------------ response models
class Problem(BaseModel):
    detail: str = Field(description="One line naming the problem (the field, the file, the size, the colour)")


class Mask(BaseModel):
    name: str = Field(description="The query's file name, as uploaded")
    width: int
    height: int
    png_base64: str = Field(description="The mask PNG, base64: 0/255 greyscale (binary mode) or a palette PNG "
                                        "whose indices are the class ids (semantic mode)")


class SegmentResponse(BaseModel):
    masks: list[Mask] = Field(description="One mask per query, in the order of the query files")


class RegisteredPrompts(BaseModel):
    prompt_id: str = Field(description="Pass it to /v1/segment as prompt_id (kept in a bounded LRU cache)")
    prompts: int
    num_labels: int | None = Field(description="Semantic mode's class count; null: binary mode")
    names: list[str]


def _problem(status: int, detail: str) -> dict[str, Any]:
    return {"model": Problem, "description": detail}


ERRORS = {
    400: _problem(400, "An upload is not a readable image"),
    404: _problem(404, "prompt_id is not registered (or was evicted)"),
    406: _problem(406, "Accept asks for image/png but the request has several queries"),
    413: _problem(413, "The body is over --max-body-mb, or an image is over the pixel limit"),
    415: _problem(415, "The body is not multipart/form-data"),
    422: _problem(422, "A missing or bad field, or prompt images and masks in different numbers"),
    429: _problem(429, "The queue is full; retry after the Retry-After header's seconds"),
    503: _problem(503, "Warming up (compiling) or draining (shutting down)"),
    504: _problem(504, "The deadline (--request-timeout-s, or the request's timeout_s) passed"),
}


class Rejected(Exception):
    """An HTTP error with its one-line message, metric reason and headers."""

    def __init__(self, status: int, reason: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.reason, self.detail, self.headers = status, reason, " ".join(detail.split()), headers or {}


def _json_error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class State:
    """What the routes and the middleware share."""

    def __init__(self, engine: Engine, metrics: Metrics):
        self.engine, self.metrics = engine, metrics
        self.draining = False
        self.working = 0  # requests on the work routes, being handled

    @property
    def idle(self) -> bool:
        batcher = self.engine.batcher
        return self.working == 0 and (batcher is None or not batcher.busy)

    def not_serving(self) -> Rejected | None:
        """Why work is refused now (503), or None."""
        engine = self.engine
        if self.draining:
            return Rejected(503, "draining", "the server is shutting down and takes no new requests")
        if engine.status == "failed":
            return Rejected(503, "warming_up", f"the model failed to load: {engine.error}")
        if not engine.ready:
            progress = f" ({engine.warm_up_done} of {engine.warm_up_total} programs compiled)" \
                if engine.status == "compiling" else ""
            return Rejected(503, "warming_up", f"warming up: {engine.status}{progress}", {"Retry-After": "5"})
        return None


# ------------------------------------------------------------------------------------ middleware
class Gate:
    """Pure ASGI middleware: refuses work early (503 warming up or draining, 415, 413 by Content-Length),
    caps the body as it streams (413), counts in-flight requests and records latency and rejections."""

    def __init__(self, app: Any, state: State, max_body: int):
        self.app, self.state, self.max_body = app, state, max_body

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        path, method = scope["path"], scope["method"]
        route = path if path in ROUTES or path.startswith("/v1/palette/") else "other"
        route = "/v1/palette/{num_labels}" if route.startswith("/v1/palette/") else route
        scope.setdefault("state", {})["arrived"] = start
        metrics, state = self.state.metrics, self.state
        work = method == "POST" and path in WORK_ROUTES
        status = {"code": 500, "started": False}
        over = {"flag": False}
        received = 0

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    over["flag"] = True
                    raise Rejected(413, "body_too_large", self._too_large())
            return message

        async def send_checked(message: dict) -> None:
            if message["type"] == "http.response.start":
                if over["flag"]:  # the framework turned our exception into its own error: answer 413
                    status["replaced"] = True
                    await self._send(send, Rejected(413, "body_too_large", self._too_large()), scope)
                    status["code"], status["started"] = 413, True
                    return
                status["code"], status["started"] = message["status"], True
            elif status.get("replaced"):
                return
            await send(message)

        metrics.in_flight.inc()
        if work:
            state.working += 1
        try:
            refusal = self._refuse(scope) if work else None
            if refusal is not None:
                await self._send(send, refusal, scope)
                status["code"] = refusal.status
            else:
                await self.app(scope, counting_receive, send_checked)
        except Rejected as e:
            if not status["started"]:
                await self._send(send, e, scope)
                status["code"] = e.status
        finally:
            metrics.in_flight.dec()
            if work:
                state.working -= 1
            code = scope["state"].get("status_override", status["code"])
            reason = scope["state"].get("reason") or ("body_too_large" if status["code"] == 413 and over["flag"]
                                                      else None)
            if reason:
                metrics.rejections.labels(reason).inc()
            metrics.latency.labels(route, method, str(code)).observe(time.monotonic() - start)

    def _too_large(self) -> str:
        return f"the request body is over the server's limit of {self.max_body / 2**20:g} MB (--max-body-mb)"

    def _refuse(self, scope: dict) -> Rejected | None:
        refusal = self.state.not_serving()
        if refusal is not None:
            return refusal
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "multipart/form-data":
            return Rejected(415, "media_type", f"the body must be multipart/form-data (file uploads), got "
                                               f"{media or 'no Content-Type'}")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return Rejected(413, "body_too_large", self._too_large())
        return None

    @staticmethod
    async def _send(send: Callable, error: Rejected, scope: dict) -> None:
        scope["state"]["reason"] = error.reason
        response = _json_error(error.status, error.detail, {**error.headers, "Connection": "close"})
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}


# ------------------------------------------------------------------------------------ the app
def create_app(engine: Engine, *, on_failure: Callable[[str], None] | None = None) -> FastAPI:
    """The service over ``engine``; its lifespan starts the engine (load + compile) in the background,
    so ``/healthz`` answers at once and ``/readyz`` when every batch size is compiled."""
    metrics = Metrics()
    state = State(engine, metrics)
    engine.observers.others.append(metrics)
    engine.compiles.on_compile = lambda phase: metrics.compiles.labels(phase).inc()
    settings = engine.settings

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.get_running_loop().create_task(engine.start(), name="seggpt-engine-start")

        def started(done: asyncio.Task) -> None:
            if done.cancelled():
                return
            if done.exception() is not None:
                logger.error("the model failed to load: %s", engine.error)
                if on_failure is not None:
                    on_failure(engine.error or "the model failed to load")
            else:
                metrics.ready.set(1)
                logger.info("ready: %d programs compiled ahead (%s)", engine.warm_up_total,
                            ", ".join(f"{k} prompt{'s' if k > 1 else ''}: batch sizes {v}"
                                      for k, v in engine.buckets().items()))

        task.add_done_callback(started)
        try:
            yield
        finally:
            state.draining = True
            metrics.ready.set(0)
            if engine.batcher is not None:
                engine.batcher.begin_drain()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(engine.batcher.wait_idle(), settings.request_timeout_s)
            if not task.done():
                task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await engine.close()

    app = FastAPI(title="seggpt-jax", version=__version__, lifespan=lifespan,
                  description="SegGPT in-context segmentation: upload query images with prompt images and masks "
                              "(or a registered prompt set) and get masks back. Requests are batched dynamically; "
                              "every batch size is compiled before the service reports ready.")
    app.state.seggpt = state
    app.add_middleware(Gate, state=state, max_body=int(settings.max_body_mb * 2**20))

    # -------------------------------------------------------------------------- errors
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        request.state.reason = "invalid_field"
        return _json_error(422, _validation_line(error))

    @app.exception_handler(Rejected)
    async def rejected(request: Request, error: Rejected) -> JSONResponse:
        request.state.reason = error.reason
        return _json_error(error.status, error.detail, error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _json_error(error.status_code, " ".join(str(error.detail).split()), getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception) -> JSONResponse:
        logger.exception("internal error on %s", request.url.path)
        return _json_error(500, f"internal error: {' '.join(str(error).split()) or type(error).__name__}")

    # -------------------------------------------------------------------------- probes, info, demo
    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", summary="Readiness: every batch size is compiled", responses={503: ERRORS[503]})
    async def readyz() -> Response:
        refusal = state.not_serving()
        if refusal is not None:
            return _json_error(503, refusal.detail, refusal.headers)
        return JSONResponse({"ready": True})

    @app.get("/metrics", summary="Prometheus metrics (text format)",
             response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics_text() -> Response:
        body, media_type = metrics.render()
        return Response(body, media_type=media_type)

    @app.get("/v1/info", summary="Model, dtype, devices, compiled batch sizes, limits and queue state")
    async def info() -> dict[str, Any]:
        out = engine.info()
        out["draining"] = state.draining
        out["in_flight"] = state.working
        out["version"] = __version__
        return out

    @app.get("/v1/palette/{num_labels}", summary="The colours of class ids 0..num_labels (0: background)")
    async def palette(num_labels: int) -> dict[str, Any]:
        if not 1 <= num_labels <= MAX_LABELS:
            raise Rejected(422, "invalid_field", f"num_labels must be 1..{MAX_LABELS}, got {num_labels}")
        return {"num_labels": num_labels, "colours": [list(c) for c in build_palette(num_labels)]}

    @app.get("/", include_in_schema=False)
    async def demo() -> HTMLResponse:
        return HTMLResponse(_static("index.html"))

    @app.get("/demo.js", include_in_schema=False)
    async def demo_js() -> Response:
        return Response(_static("demo.js"), media_type="text/javascript")

    # -------------------------------------------------------------------------- work
    async def in_pool(fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(engine.pool, fn, *args)

    async def read_prompts(prompt_image: list[UploadFile] | None, prompt_mask: list[UploadFile] | None,
                           ) -> list[tuple[bytes, str, bytes, str]]:
        images, masks = prompt_image or [], prompt_mask or []
        if len(images) != len(masks):
            raise Rejected(422, "invalid_field", f"got {len(images)} prompt_image and {len(masks)} prompt_mask "
                                                 f"files; give each prompt image with its mask")
        if not images:
            raise Rejected(422, "invalid_field", "give prompt_image and prompt_mask files (one or more of each), or "
                                                 "a prompt_id from /v1/prompts")
        if len(images) > settings.max_prompts:
            raise Rejected(422, "invalid_field", f"{len(images)} prompts; this server takes at most "
                                                 f"{settings.max_prompts} per query (--max-prompts)")
        return [(await i.read(), i.filename or "", await m.read(), m.filename or "") for i, m in zip(images, masks)]

    async def guarded(request: Request, work: Any, deadline: float) -> Any:
        """Run ``work`` until it ends, the deadline passes (504) or the client disconnects (dropped)."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({task, gone}, timeout=max(0.0, deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if gone in done:
            request.state.reason = "client_gone"
            request.state.status_override = CLIENT_GONE
            return Response(status_code=CLIENT_GONE)  # nobody reads it
        raise Rejected(504, "deadline", _deadline_line(request, deadline))

    def deadline_of(request: Request, timeout_s: float | None) -> float:
        limit = settings.request_timeout_s if timeout_s is None else min(timeout_s, settings.request_timeout_s)
        return request.state.arrived + limit

    @app.post("/v1/prompts", summary="Register a prompt set, preprocessed once", response_model=RegisteredPrompts,
              responses={k: ERRORS[k] for k in (400, 413, 415, 422, 503)})
    async def register(
        request: Request,
        prompt_image: Annotated[list[UploadFile], File(description="Prompt images, one per prompt")],
        prompt_mask: Annotated[list[UploadFile], File(description="Their masks, in the same order")],
        num_labels: Annotated[int | None, Form(ge=1, le=MAX_LABELS, description="Semantic mode: masks hold class "
                                               "ids 0..num_labels or palette colours; omit for binary masks")] = None,
        colour_map: Annotated[str | None, Form(description="Semantic mode: 'voc' or a JSON object "
                                               "{\"R,G,B\": class_id} for RGB masks in another palette")] = None,
    ) -> RegisteredPrompts:
        """Preprocess the prompts once and keep them in a bounded least-recently-used cache. Only the
        preprocessed prompt can be reused: SegGPT puts prompt and query on one canvas, so the model
        still runs over the prompt for every query. The id is a hash of the files and the mode, so
        registering the same set again returns the same id."""
        files = await read_prompts(prompt_image, prompt_mask)
        prompts = await guarded(request, in_pool(engine.prepare_prompts, files, num_labels, colour_map),
                                deadline_of(request, None))
        if isinstance(prompts, Response):
            return prompts
        prompt_id = prompt_set_id(num_labels, colour_map, [(f[0], f[2]) for f in files])
        names = [f[1] for f in files]
        engine.prompts.put(PromptSet(prompt_id, prompts, num_labels, names))
        return RegisteredPrompts(prompt_id=prompt_id, prompts=len(prompts), num_labels=num_labels, names=names)

    @app.post("/v1/segment", summary="Segment query images from prompts",
              response_model=SegmentResponse,
              responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                               "description": "JSON, or with Accept: image/png and one query, the mask PNG"},
                         **{k: ERRORS[k] for k in (400, 404, 406, 413, 415, 422, 429, 503, 504)}})
    async def segment(
        request: Request,
        query: Annotated[list[UploadFile], File(description="Query images, one or more")],
        prompt_image: Annotated[list[UploadFile] | None, File(description="Prompt images (or use prompt_id)")] = None,
        prompt_mask: Annotated[list[UploadFile] | None, File(description="Their masks, in the same order")] = None,
        prompt_id: Annotated[str | None, Form(description="A prompt set registered with /v1/prompts, instead of "
                                                          "prompt files")] = None,
        num_labels: Annotated[int | None, Form(ge=1, le=MAX_LABELS, description="Semantic mode: class count "
                                               "(masks hold ids 0..num_labels); omit for binary masks")] = None,
        colour_map: Annotated[str | None, Form(description="Semantic mode: 'voc' or a JSON object "
                                               "{\"R,G,B\": class_id} for RGB masks in another palette")] = None,
        timeout_s: Annotated[float | None, Form(gt=0, description="Give up after this many seconds (at most the "
                                                "server's --request-timeout-s)")] = None,
    ) -> Any:
        """One mask per query. With ``Accept: image/png`` and one query the answer is the mask PNG itself;
        otherwise JSON. Several prompts per query are feature-ensembled, as ``Segmenter`` does."""
        deadline = deadline_of(request, timeout_s)
        want_png = _wants_png(request.headers.get("accept", ""), len(query))
        if len(query) > settings.max_queue:
            raise Rejected(422, "invalid_field", f"{len(query)} query files; this server queues at most "
                                                 f"{settings.max_queue} (--max-queue)")
        if prompt_id is not None:
            if prompt_image or prompt_mask:
                raise Rejected(422, "invalid_field", "give either prompt_id or prompt_image/prompt_mask files, not both")
            if colour_map is not None:
                raise Rejected(422, "invalid_field", "colour_map applies to prompt masks; a registered prompt set "
                                                     "was read with its own")
            registered = engine.prompts.get(prompt_id)
            if num_labels is not None and num_labels != registered.num_labels:
                raise Rejected(422, "invalid_field", f"prompt_id {prompt_id} was registered for "
                                                     f"{_mode(registered.num_labels)}, not {_mode(num_labels)}")
            num_labels, files = registered.num_labels, None
        else:
            registered, files = None, await read_prompts(prompt_image, prompt_mask)
        batcher = engine.batcher
        try:
            reservation = batcher.reserve(len(query))
        except QueueFull as e:
            raise Rejected(429, "queue_full", str(e), {"Retry-After": str(math.ceil(e.retry_after))}) from None
        except Draining as e:
            raise Rejected(503, "draining", str(e)) from None
        except NotReady as e:
            raise Rejected(503, "warming_up", str(e), {"Retry-After": "5"}) from None

        async def work() -> list[tuple[str, bytes, Any]]:
            prompts = registered.prompts if registered is not None else \
                await in_pool(engine.prepare_prompts, files, num_labels, colour_map)
            data = [(await f.read(), f.filename or "") for f in query]
            jobs = await asyncio.gather(*(in_pool(engine.prepare_query, d, name, i, prompts, num_labels)
                                          for i, (d, name) in enumerate(data)))
            painted = await asyncio.gather(*(reservation.submit(job.key, job, deadline=deadline) for job in jobs))
            finished = await asyncio.gather(*(in_pool(engine.finish, job, p) for job, p in zip(jobs, painted)))
            return [(job.name, png, mask) for job, (png, mask) in zip(jobs, finished)]

        with reservation:
            outputs = await guarded(request, work(), deadline)
        if isinstance(outputs, Response):
            return outputs
        if want_png:
            name, png, mask = outputs[0]
            return Response(png, media_type="image/png")
        return SegmentResponse(masks=[Mask(name=name, width=mask.shape[1], height=mask.shape[0],
                                           png_base64=base64.b64encode(png).decode("ascii"))
                                      for name, png, mask in outputs])

    @app.exception_handler(RequestProblem)
    async def problem(request: Request, error: RequestProblem) -> JSONResponse:
        request.state.reason = error.kind
        return _json_error(STATUS_OF_KIND[error.kind], str(error))

    @app.exception_handler(DeadlineExceeded)
    async def late(request: Request, error: DeadlineExceeded) -> JSONResponse:
        request.state.reason = "deadline"
        return _json_error(504, _deadline_line(request, None))

    return app


# ------------------------------------------------------------------------------------ helpers
async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is already read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _deadline_line(request: Request, deadline: float | None) -> str:
    waited = time.monotonic() - request.state.arrived
    return f"the deadline passed after {waited:.1f}s before the masks were ready (--request-timeout-s, or timeout_s)"


def _mode(num_labels: int | None) -> str:
    return "binary mode" if num_labels is None else f"semantic mode with num_labels={num_labels}"


def _wants_png(accept: str, queries: int) -> bool:
    """Whether to answer the PNG itself: ``Accept`` prefers image/png to JSON (by q-value, then order)."""
    ranked = []
    for position, part in enumerate(accept.split(",")):
        fields = [f.strip() for f in part.split(";")]
        media, quality = fields[0].lower(), 1.0
        for field in fields[1:]:
            if field.startswith("q="):
                try:
                    quality = float(field[2:])
                except ValueError:
                    quality = 0.0
        if media and quality > 0:
            ranked.append((-quality, position, media))
    ranked.sort()
    for _, _, media in ranked:
        if media in ("application/json", "application/*", "*/*"):
            return False
        if media in ("image/png", "image/*"):
            if queries == 1:
                return True
            if any(m in ("application/json", "application/*", "*/*") for _, _, m in ranked):
                return False
            raise Rejected(406, "not_acceptable", f"Accept: {accept} asks for one PNG but the request has {queries} "
                                                  f"queries; accept application/json to get all masks")
    return False


def _validation_line(error: RequestValidationError) -> str:
    """FastAPI's validation errors as one line: ``field 'num_labels': Input should be ...; ...``."""
    parts = []
    for item in error.errors():
        location = [str(p) for p in item.get("loc", ())]
        if location and location[0] in ("body", "query", "path", "header", "cookie"):  # where, not which field
            location = location[1:]
        message = item.get("msg", "invalid")
        if item.get("type") == "missing":
            message = "required"
        parts.append(f"field {'.'.join(location) or 'body'!r}: {message}")
    return "; ".join(parts) or "invalid request"


def _static(name: str) -> bytes:
    return importlib.resources.files("seggpt_jax.serve").joinpath("static", name).read_bytes()
