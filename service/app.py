"""The gateway application: ``create_app(settings)`` builds the FastAPI app; its lifespan starts the worker
(loads the models or connects to Triton) and stops it.

Run it with ``ponder serve`` or ``python -m uvicorn service.app:create_app --factory`` (settings then
come from ``PONDER_*`` variables and ``PONDER_CONFIG_FILE``).

Shutdown: on SIGTERM/SIGINT uvicorn stops accepting connections and waits for the open ones; the gateway
turns /readyz to 503 at once, lets in-flight requests finish for ``drain_s`` seconds, then cancels every
queued and running job (their requests get 503), so uvicorn's wait, and the process, end within about
``drain_s`` plus one render chunk, whatever was running."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.errors import install_error_handlers
from service.image_jobs import ImageModels
from service.logs import configure_logging
from service.metrics import ServiceMetrics
from service.middleware import AuthMiddleware, BodyLimitMiddleware, RequestContextMiddleware
from service.pipeline import Pipeline
from service.routers import detect, docs, features, health, metrics, models, render, segment, viewer
from service.settings import ServiceSettings
from service.workers.base import SHUTTING_DOWN, Worker

LOG = logging.getLogger("service.app")


def _inprocess(settings: ServiceSettings, registry: ServiceMetrics) -> Worker:
    from service.workers.inprocess import InProcessWorker

    return InProcessWorker(settings, registry)


def _triton(settings: ServiceSettings, registry: ServiceMetrics) -> Worker:
    from service.workers.triton_client import TritonWorker

    return TritonWorker(settings, registry)


WORKERS: dict[str, Callable[[ServiceSettings, ServiceMetrics], Worker]] = {"inprocess": _inprocess,
                                                                           "triton": _triton}


def create_app(settings: ServiceSettings | None = None, worker: Worker | None = None,
               on_started: Callable[[], None] | None = None) -> FastAPI:
    """The gateway; ``on_started`` runs once the models are loaded (``ponder serve`` prints the URL)."""
    settings = settings or ServiceSettings()
    configure_logging(settings.log_level)
    if settings.fallback_note:
        LOG.warning(settings.fallback_note)
    registry = ServiceMetrics()
    worker = worker or WORKERS[settings.worker](settings, registry)
    pipeline = Pipeline(settings, worker, registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await worker.start()
        if worker.models():
            LOG.info("ready: %s worker, models %s", worker.kind, ", ".join(worker.models()))
        else:
            LOG.warning("started: %s worker, no model yet (/readyz answers 503 until one is served)", worker.kind)
        restore = _drain_on_signals(app, worker, settings.drain_s)
        if on_started is not None:
            on_started()
        try:
            yield
        finally:
            restore()
            await worker.stop()
            pipeline.close()

    app = FastAPI(title="PonderV2 inference service", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Point-cloud features, segmentation, 3D detection and novel-view rendering from "
                              "PonderV2 models. Errors are application/problem+json; every answer carries "
                              "X-Request-ID.")
    app.state.settings = settings
    app.state.metrics = registry
    app.state.worker = worker
    app.state.pipeline = pipeline
    app.state.image_models = ImageModels(settings)  # loaded on first use, on the model thread
    app.state.draining = False
    install_error_handlers(app)
    for router in (features.router, segment.router, detect.router, render.router, models.router, health.router,
                   metrics.router, docs.router, viewer.router):  # docs/viewer: pages and assets served offline
        app.include_router(router)
    # Added innermost first: request context -> auth -> body limit -> routes.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes,
                       idle_timeout_s=settings.upload_idle_timeout_s,
                       min_bytes_per_s=settings.upload_min_bytes_per_s,
                       max_inflight_bytes=settings.max_inflight_upload_bytes)
    app.add_middleware(AuthMiddleware, api_keys=settings.api_keys, rate_per_s=settings.rate_limit_per_s,
                       burst=settings.rate_limit_burst)
    app.add_middleware(RequestContextMiddleware, metrics=registry)
    return app


def _drain_on_signals(app: FastAPI, worker: Worker, drain_s: float) -> Callable[[], None]:
    """Chain onto the server's SIGTERM/SIGINT handlers (uvicorn's start its graceful shutdown): mark the app
    draining and, ``drain_s`` later, cancel every job still queued or running. Returns the undo. Signal
    handlers can only be set in the main thread; elsewhere (tests' in-process apps), or where no server
    handler is installed, nothing is chained."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()

    async def drain(signum: int) -> None:
        LOG.info("signal %d: draining for up to %g s", signum, drain_s)
        await asyncio.sleep(drain_s)
        cancelled = worker.cancel_all(SHUTTING_DOWN)
        if cancelled:
            LOG.warning("drain time over: cancelled %d request(s) still queued or running", cancelled)

    previous: dict[int, object] = {}

    def handler(signum: int, frame: object) -> None:
        if not app.state.draining:
            app.state.draining = True
            loop.call_soon_threadsafe(lambda: app.state.__setattr__("drain_task", loop.create_task(drain(signum))))
        chained = previous[signum]
        chained(signum, frame)  # type: ignore[operator]

    for sig in (signal.SIGTERM, signal.SIGINT):
        if callable(signal.getsignal(sig)):  # only chain onto a server's handler: never swallow a default exit
            previous[sig] = signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, old)  # type: ignore[arg-type]
        task = getattr(app.state, "drain_task", None)
        if task is not None:
            task.cancel()

    return restore
