"""Liveness (/healthz: the process answers) and readiness (/readyz: models loaded, a worker reachable, no
lane stuck or full, not shutting down)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from service.dependencies import get_worker
from service.schemas import Health, Readiness
from service.workers.base import Worker

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "not ready"}})
async def readyz(request: Request, worker: Worker = Depends(get_worker)) -> JSONResponse:
    """503 while models load, while a lane's model thread is stuck past its deadline or a lane is full, and
    once a shutdown has begun (a load balancer then sends new requests elsewhere)."""
    ready, detail = await worker.ready()
    if getattr(request.app.state, "draining", False):
        ready, detail = False, "the server is shutting down (draining in-flight requests)"
    body = Readiness(ready=ready, detail=detail, models=list(worker.models()), worker=worker.kind,
                     queue_depth=worker.queue_depth())
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
