"""The gateway application: ``create_app(settings)`` builds the FastAPI app; its lifespan starts the worker
(loads the models or connects to Triton) and stops it.

Run it with ``ponder serve`` or ``python -m uvicorn service.app:create_app --factory`` (settings then
come from ``PONDER_*`` variables and ``PONDER_CONFIG_FILE``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.errors import install_error_handlers
from service.logs import configure_logging
from service.metrics import ServiceMetrics
from service.middleware import AuthMiddleware, BodyLimitMiddleware, RequestContextMiddleware
from service.pipeline import Pipeline
from service.routers import detect, features, health, metrics, models, render, segment
from service.settings import ServiceSettings
from service.workers.base import Worker

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
    registry = ServiceMetrics()
    worker = worker or WORKERS[settings.worker](settings, registry)
    pipeline = Pipeline(settings, worker, registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await worker.start()
        LOG.info("ready: %s worker, models %s", worker.kind, ", ".join(worker.models()))
        if on_started is not None:
            on_started()
        try:
            yield
        finally:
            await worker.stop()
            pipeline.close()

    app = FastAPI(title="PonderV2 inference service", version="1", lifespan=lifespan,
                  description="Point-cloud features, segmentation, 3D detection and novel-view rendering from "
                              "PonderV2 models. Errors are application/problem+json; every answer carries "
                              "X-Request-ID.")
    app.state.settings = settings
    app.state.metrics = registry
    app.state.worker = worker
    app.state.pipeline = pipeline
    install_error_handlers(app)
    for router in (features.router, segment.router, detect.router, render.router, models.router, health.router,
                   metrics.router):
        app.include_router(router)
    # Added innermost first: request context -> auth -> body limit -> routes.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(AuthMiddleware, api_keys=settings.api_keys, rate_per_s=settings.rate_limit_per_s,
                       burst=settings.rate_limit_burst)
    app.add_middleware(RequestContextMiddleware, metrics=registry)
    return app
