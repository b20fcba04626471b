"""Liveness (/healthz: the process answers) and readiness (/readyz: models loaded, a worker reachable)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from service.dependencies import get_worker
from service.schemas import Health, Readiness
from service.workers.base import Worker

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "not ready"}})
async def readyz(worker: Worker = Depends(get_worker)) -> JSONResponse:
    ready, detail = await worker.ready()
    body = Readiness(ready=ready, detail=detail, models=list(worker.models()), worker=worker.kind,
                     queue_depth=worker.queue_depth())
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
