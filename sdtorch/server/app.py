"""The HTTP app: A1111's /sdapi/v1 routes, sdtorch's /api/jobs, the page, and what guards them.

`create_app(jobs, ...)` builds a FastAPI app over a started `JobQueue`. Every error leaves in
A1111's envelope, {"error", "detail", "body", "errors"}: request validation 422, an unknown sampler
or model or a bad image 400, a body over the limit 413, a full queue 503 with Retry-After, a
wrong password 401 with WWW-Authenticate. A user's mistake never shows a traceback; a bug answers
500 with its message and is logged with its traceback.

Middleware, outermost first: CORS (only when origins are given), Basic auth (only with
credentials; an Authorization header is ignored otherwise, as SillyTavern always sends one),
the body limit.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import secrets
from importlib import resources
from typing import Any

from fastapi import Body, FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdtorch.errors import SdtorchError
from sdtorch.metadata import parse_parameters, request_fields
from sdtorch.samplers import SCHEDULE_TYPES
from sdtorch.samplers.registry import COMPAT_MODES, check_compat
from sdtorch.samplers.schedule_types import SCHEDULE_TYPES as A1111_SCHEDULE_TYPES

from . import a1111
from .a1111 import ApiError, Img2ImgRequest, PngInfoRequest, Txt2ImgRequest
from .imagedata import MAX_IMAGE_PIXELS, decode_base64, png_text
from .jobs import Job, JobQueue, QueueFull
from .native import JobRequest, request_json, to_request

log = logging.getLogger("sdtorch.server")

MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_GENERATION_PIXELS = 2048 * 2048  # width x height x batch of one job
STATIC = resources.files("sdtorch") / "server" / "static"
# The page loads nothing from elsewhere; the browser is told so too.
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; style-src 'self'; "
            "script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def envelope(status: int, detail: Any, *, error: str = "HTTPException", errors: Any = "",
             headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail, "body": "", "errors": errors}, status_code=status,
                        headers=headers)


def parse_auth(text: str | None) -> list[tuple[str, str]]:
    """'user:pass[,user2:pass2]' -> pairs; a password may contain ':' (split at the first)."""
    if not text:
        return []
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user:
            raise SdtorchError(f"--api-auth takes USER:PASS[,USER:PASS]; {item.strip()!r} has no ':'")
        pairs.append((user, password))
    return pairs


class _Auth:
    """HTTP Basic on every route, compared in constant time."""

    def __init__(self, app, credentials: list[tuple[str, str]]):
        self.app = app
        self.credentials = [(u.encode(), p.encode()) for u, p in credentials]

    def _allowed(self, header: bytes | None) -> bool:
        if not header or header[:6].lower() != b"basic ":
            return False
        try:
            user, sep, password = base64.b64decode(header[6:].strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        ok = False
        for u, p in self.credentials:  # every pair compared: the time does not tell which matched
            ok |= secrets.compare_digest(user, u) & secrets.compare_digest(password, p) & bool(sep)
        return ok

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization")
        if self._allowed(header):
            return await self.app(scope, receive, send)
        response = envelope(401, "Incorrect username or password",
                            headers={"WWW-Authenticate": 'Basic realm="sdtorch", charset="UTF-8"'})
        await response(scope, receive, send)


class _BodyLimit:
    """413 for a request body over `limit` bytes, by its Content-Length or as it streams in. The rest of
    the body is read and dropped (up to a bound) before answering, so that a client still sending
    gets the answer rather than a reset connection."""

    DRAIN = 256 * 1024 * 1024

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def _drain(self, receive, more: bool) -> None:
        drained = 0
        while more and drained < self.DRAIN:
            message = await receive()
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        detail = f"the request body is over the limit of {self.limit:,} bytes"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._drain(receive, True)
            return await envelope(413, detail)(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    await self._drain(receive, message.get("more_body", False))
                    raise HTTPException(413, detail)
            return message

        await self.app(scope, limited, send)


def _validation_detail(errors: list[dict]) -> tuple[str, list[dict]]:
    clean = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]
    first = clean[0] if clean else {"loc": [], "msg": "invalid request", "type": ""}
    if first["type"] == "json_invalid":
        return "the request body is not valid JSON", clean
    where = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
    more = f" (and {len(clean) - 1} more)" if len(clean) > 1 else ""
    return f"{where}: {first['msg']}{more}", clean


async def wait_done(task) -> None:
    """Wait, without holding a thread, for a worker task to finish."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def ready():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(None))

    task.add_done_callback(ready)
    await future


def create_app(jobs: JobQueue, *, auth: list[tuple[str, str]] | None = None, cors_origins: list[str] | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_image_pixels: int = MAX_IMAGE_PIXELS,
               max_generation_pixels: int = MAX_GENERATION_PIXELS, flags: dict | None = None,
               compat: str = "diffusers") -> FastAPI:
    app = FastAPI(title="sdtorch", version=a1111.VERSION, docs_url="/docs", redoc_url=None)
    app.state.jobs = jobs
    settings = app.state.settings = a1111.ServerSettings(compat=check_compat(compat))  # /sdapi/v1/options
    registry = jobs.registry

    # --- errors ----------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return envelope(e.status, e.detail, error=e.error, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return envelope(e.status_code, e.detail, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        detail, errors = _validation_detail(e.errors())
        return envelope(422, detail, error="RequestValidationError", errors=errors)

    @app.exception_handler(SdtorchError)
    async def _user_error(request, e: SdtorchError):
        return envelope(400, str(e), error=type(e).__name__)

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        log.exception("error in %s %s", request.method, request.url.path)
        return envelope(500, "internal error; the server log has the details", error=type(e).__name__, errors=str(e))

    # --- generation --------------------------------------------------------------------------

    def check_size(request) -> None:
        width, height = request.width or 0, request.height or 0
        if request.hires and width and height:  # the hires fix's large size (the request is validated)
            from sdtorch.hires import hires_target

            (width, height), _ = hires_target(request)
        pixels = width * height * request.batch
        if pixels > max_generation_pixels:
            raise ApiError(422, f"{request.batch} x {width}x{height} pixels is over this server's "
                                f"limit of {max_generation_pixels:,} pixels per batch", error="ValidationError")
        try:
            request.validate(jobs.model)
        except SdtorchError as e:
            raise ApiError(422, str(e), error="ValidationError") from None

    def find_model(alias: str | None):
        if alias is None:
            return None
        try:
            return registry.find(alias)
        except SdtorchError as e:
            raise ApiError(400, str(e)) from None

    def submit(job: Job, *, track: bool = False) -> int:
        try:
            return jobs.submit(job, track=track)
        except QueueFull as e:
            raise ApiError(503, str(e), headers={"Retry-After": str(e.retry_after)}) from None

    def raise_failure(job: Job) -> None:
        if job.state in ("failed", "cancelled"):
            if isinstance(job.error, SdtorchError):
                raise ApiError(400, str(job.error))
            raise ApiError(500, "internal error; the server log has the details", error=type(job.error).__name__)

    async def a1111_generate(body, kind: str) -> dict:
        sub = await run_in_threadpool(a1111.to_submission, body, settings=settings,
                                      max_pixels=max_image_pixels)
        check_size(sub.request)
        entry = find_model(sub.model)
        job = Job(sub.request, iterations=sub.iterations, model=entry, kind=kind)
        submit(job)
        await wait_done(job)
        raise_failure(job)
        if sub.keep_model and entry is not None and job.model_entry == entry:
            jobs.default_entry = entry

        def respond():
            images = [base64.b64encode(o.png).decode("ascii") for o in job.outputs] if body.send_images else []
            return {"images": images, "parameters": a1111.echo(body), "info": a1111.info(job, body, sub.ignored)}

        return await run_in_threadpool(respond)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2ImgRequest):
        return await a1111_generate(body, "txt2img")

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: Img2ImgRequest):
        return await a1111_generate(body, "img2img")

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        return await run_in_threadpool(jobs.a1111_progress, skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        jobs.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip():
        jobs.skip()
        return None

    # --- options and models ------------------------------------------------------------------

    def options_dict() -> dict:
        entry = jobs.default_entry
        return {"sd_model_checkpoint": entry.title, "sd_checkpoint_hash": entry.sha256, "sd_vae": "Automatic",
                "CLIP_stop_at_last_layers": settings.clip_skip, "eta_ddim": 0.0, "eta_ancestral": 1.0,
                "randn_source": settings.rng.upper(), "eta_noise_seed_delta": settings.ensd,
                "sdtorch_compat": settings.compat,
                "samples_format": "png", "live_previews_enable": True, "show_progress_every_n_steps": 1,
                "show_progress_type": "TAESD" if jobs.taesd else "Approx cheap", "face_restoration_model": None,
                "sd_vae_decode_method": "Full",
                "img2img_color_correction": False, "sdtorch_version": a1111.VERSION}

    @app.get("/sdapi/v1/options")
    async def get_options():
        return options_dict()

    @app.post("/sdapi/v1/options")
    async def set_options(body: dict[str, Any] = Body(...)):  # noqa: B008 (FastAPI's way)
        clip = body.get("CLIP_stop_at_last_layers")
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip != int(clip)
                                 or clip < 1):
            raise ApiError(422, f"CLIP_stop_at_last_layers must be a whole number of at least 1, got {clip!r}",
                           error="ValidationError")
        checkpoint = body.get("sd_model_checkpoint")
        if checkpoint is not None and checkpoint != jobs.default_entry.title:
            entry = find_model(checkpoint) if isinstance(checkpoint, str) else find_model("")
            if entry != jobs.default_entry:
                task = jobs.switch_model(entry)
                await wait_done(task)
                if task.error is not None:
                    if isinstance(task.error, SdtorchError):
                        raise ApiError(400, str(task.error))
                    raise ApiError(500, "loading the model failed; the server log has the details")
        rng, ensd, compat = body.get("randn_source"), body.get("eta_noise_seed_delta"), body.get("sdtorch_compat")
        if rng is not None and (not isinstance(rng, str) or rng.lower() not in ("gpu", "cpu", "nv")):
            raise ApiError(422, f"randn_source must be GPU, CPU or NV, got {rng!r}", error="ValidationError")
        if ensd is not None and (isinstance(ensd, bool) or not isinstance(ensd, int) or ensd < 0):
            raise ApiError(422, f"eta_noise_seed_delta must be a whole number of 0 or more, got {ensd!r}",
                           error="ValidationError")
        if compat is not None and compat not in COMPAT_MODES:
            raise ApiError(422, f"sdtorch_compat must be one of {', '.join(COMPAT_MODES)}, got {compat!r}",
                           error="ValidationError")
        if clip is not None:
            settings.clip_skip = int(clip)
        if rng is not None:
            settings.randn_source = rng.upper()
        if ensd is not None:
            settings.ensd = ensd
        if compat is not None:
            settings.compat = compat
        return None

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [e.a1111() for e in registry.entries]

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints():
        await run_in_threadpool(registry.refresh)
        return None

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return a1111.samplers(settings.compat)

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return a1111.schedulers(settings.compat)

    @app.get("/sdapi/v1/upscalers")
    async def upscalers():
        return a1111.upscalers()

    @app.get("/sdapi/v1/latent-upscale-modes")
    async def latent_upscale_modes():
        return a1111.LATENT_UPSCALE_MODES

    for path in ("sd-vae", "prompt-styles", "face-restorers", "hypernetworks", "realesrgan-models",
                 "script-info", "extensions", "sd-modules"):
        app.add_api_route(f"/sdapi/v1/{path}", _empty_list, methods=["GET"])
    for path in ("refresh-vae", "refresh-embeddings", "refresh-loras"):
        app.add_api_route(f"/sdapi/v1/{path}", _null, methods=["POST"])

    @app.get("/sdapi/v1/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/loras")
    async def loras():
        return a1111.loras(jobs.adapters())

    @app.get("/sdapi/v1/embeddings")
    async def embeddings():
        return a1111.embeddings(jobs.adapters())

    @app.get("/sdapi/v1/memory")
    async def memory():
        return await run_in_threadpool(a1111.memory)

    @app.get("/sdapi/v1/cmd-flags")
    async def cmd_flags():
        return {"api": True, "nowebui": False, **(flags or {})}

    @app.post("/sdapi/v1/png-info")
    async def png_info(body: PngInfoRequest):
        if not body.image:
            raise ApiError(404, "Image not found")

        def read():
            return a1111.png_info(png_text(decode_base64(body.image, "image")))

        return await run_in_threadpool(read)

    # --- sdtorch's own API -------------------------------------------------------------------

    @app.get("/api/config")
    async def config():
        model = jobs.model
        return {
            "version": a1111.VERSION, "model": jobs.default_entry.title,
            "models": [e.title for e in registry.entries],
            "compat": settings.compat,
            "samplers": [{"name": n, "display_name": e.display_name, "schedules": ["automatic", *a1111.mode_schedules(
                e, settings.compat)]} for n, e in a1111.mode_samplers(settings.compat).items()],
            "schedules": {"automatic": "Automatic", **({n: t.label for n, t in A1111_SCHEDULE_TYPES.items()
                                                        if n != "automatic"} if settings.compat == "a1111"
                                                       else SCHEDULE_TYPES)},
            "defaults": {"steps": 20, "sampler": "euler_a", "schedule": "uniform",
                         "width": model.config.image_size if model else 512,
                         "height": model.config.image_size if model else 512,
                         "cfg_scale": model.config.default_cfg_scale if model else 7.5},
            "limits": {"queue_size": jobs.queue_size, "max_generation_pixels": max_generation_pixels,
                       "max_image_pixels": max_image_pixels, "max_body_bytes": max_body_bytes},
        }

    def own_job(job_id: str) -> Job:
        job = jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r} (finished jobs are kept for a while, then forgotten)")
        return job

    @app.post("/api/jobs", status_code=202)
    async def create_job(body: JobRequest):
        try:
            request = await run_in_threadpool(to_request, body, clip_skip=settings.clip_skip, compat=settings.compat,
                                              rng=settings.rng, max_pixels=max_image_pixels)
        except SdtorchError as e:
            raise ApiError(400, str(e)) from None
        try:
            request.validate()
        except SdtorchError as e:
            raise ApiError(422, str(e), error="ValidationError") from None
        check_size(request)
        job = Job(request, iterations=body.iterations or 1, model=find_model(body.model),
                  kind="img2img" if request.img2img else "txt2img", full_preview_every=body.full_preview_every or 0)
        position = submit(job, track=True)
        return {"id": job.id, "position": position, "seed": job.request.seed,
                "status": f"/api/jobs/{job.id}", "events": f"/api/jobs/{job.id}/events"}

    @app.get("/api/jobs/{job_id}")
    async def job_status(job_id: str):
        job = own_job(job_id)
        out = job.status(jobs.position(job))
        out["infotexts"] = [o.infotext for o in job.outputs]
        out["parameters"] = [request_json(o.request) for o in job.outputs]
        out["image_urls"] = [f"/api/jobs/{job.id}/images/{i}.png" for i in range(len(job.outputs))]
        return out

    @app.get("/api/jobs/{job_id}/images/{index}.png")
    async def job_image(job_id: str, index: int):
        job = own_job(job_id)
        if not 0 <= index < len(job.outputs):
            raise ApiError(404, f"job {job_id} has {len(job.outputs)} images")
        png = await run_in_threadpool(lambda: job.outputs[index].png)
        return Response(png, media_type="image/png")

    @app.delete("/api/jobs/{job_id}")
    async def delete_job(job_id: str):
        job = own_job(job_id)
        jobs.cancel(job)
        return job.status(jobs.position(job))

    @app.get("/api/jobs/{job_id}/events")
    async def job_events(job_id: str):
        job = own_job(job_id)
        queue = job.subscribe(asyncio.get_running_loop())

        async def stream():
            try:
                while True:
                    try:
                        event = await asyncio.wait_for(queue.get(), 2.0)
                    except TimeoutError:
                        if job.state != "queued":
                            yield ": waiting\n\n"
                            continue
                        event = job.status(jobs.position(job)) | {"type": "state"}
                    if event.get("state") == "queued":
                        event["position"] = jobs.position(job)
                    yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
                    if event["type"] == "done":
                        return
            finally:
                job.unsubscribe(queue)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/api/parameters")
    async def parameters(body: PngInfoRequest):
        """A PNG's A1111 parameters as our request fields: what the page fills its form from."""
        if not body.image:
            raise ApiError(422, "image is required", error="ValidationError")
        text = (await run_in_threadpool(lambda: png_text(decode_base64(body.image, "image")))).get("parameters")
        if not text:
            raise ApiError(400, "this image has no 'parameters' text (it was not made by sdtorch, A1111 or Forge)")
        fields = request_fields(parse_parameters(text))
        fields["options"] = dict(fields.get("options", {}))
        return {"infotext": text, "fields": fields}

    # --- the page, and the Gradio routes some clients probe ----------------------------------

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index():
        return Response((STATIC / "index.html").read_bytes(), media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                                 "Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        kinds = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".png": "image/png",
                 ".svg": "image/svg+xml"}
        suffix = name[name.rfind("."):] if "." in name else ""
        path = STATIC / name
        if "/" in name or "\\" in name or name.startswith(".") or suffix not in kinds or not path.is_file():
            raise ApiError(404, "Not Found")
        return Response(path.read_bytes(), media_type=kinds[suffix],
                        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})

    @app.get("/config", include_in_schema=False)
    async def gradio_config():
        return {"version": a1111.VERSION, "components": []}

    @app.get("/queue/status", include_in_schema=False)
    async def queue_status():
        return {"msg": "estimation", "queue_size": jobs.waiting()}

    @app.post("/login", include_in_schema=False)
    async def login():
        return {"success": True}

    # Middleware: the last added runs first.
    app.add_middleware(_BodyLimit, limit=max_body_bytes)
    if auth:
        app.add_middleware(_Auth, credentials=auth)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_credentials=True,
                           allow_methods=["*"], allow_headers=["*"])
    return app


async def _empty_list():
    return []


async def _null():
    return None
