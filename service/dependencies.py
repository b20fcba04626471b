"""FastAPI dependencies: the app-wide objects the lifespan created, looked up from ``app.state``."""

from __future__ import annotations

from fastapi import Request

from service.image_jobs import ImageModels
from service.metrics import ServiceMetrics
from service.pipeline import Pipeline
from service.workers.base import Worker


def get_pipeline(request: Request) -> Pipeline:
    return request.app.state.pipeline


def get_worker(request: Request) -> Worker:
    return request.app.state.worker


def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


def get_image_models(request: Request) -> ImageModels:
    """The app's image models; ``.settings`` is its ServiceSettings, whose ``images_*`` fields are the limits."""
    return request.app.state.image_models
