"""GET /metrics in the Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from service.dependencies import get_metrics, get_worker
from service.metrics import ServiceMetrics
from service.workers.base import Worker

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(registry: ServiceMetrics = Depends(get_metrics), worker: Worker = Depends(get_worker)) -> Response:
    registry.queue_depth.set(worker.queue_depth())
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)
