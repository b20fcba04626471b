"""GET /v1/models: what the server can run."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from service.dependencies import get_image_models, get_pipeline
from service.image_jobs import ImageModels
from service.pipeline import Pipeline
from service.routers.common import ERRORS
from service.schemas import ImageModelEntry, ModelEntry, ModelList

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelList, responses={k: ERRORS[k] for k in (401, 403, 429, 503)})
async def list_models(pipeline: Pipeline = Depends(get_pipeline),
                      image_models: ImageModels = Depends(get_image_models)) -> ModelList:
    """Served models: name, kind, conditions, class names per condition, input features, version and
    capabilities (which of /v1/features, /v1/segment, /v1/detect, /v1/render each model answers); and the
    models for posted images (``image_models``: name, kind, class names, which routes run them)."""
    cards = pipeline.worker.models()
    default = pipeline.card(None).info.name if cards else None
    entries = [
        ModelEntry(name=name, kind=c.info.kind, conditions=list(c.info.conditions),
                   default_condition=c.default_condition,
                   classes={k: list(v) for k, v in c.info.class_names.items()}, feature_dim=c.info.feature_dim,
                   grid_size=c.info.grid_size, input_features=list(c.info.input_features), version=c.info.version,
                   can_segment=c.has_classifier, capabilities=list(c.capabilities), default=name == default)
        for name, c in cards.items()
    ]
    served = await run_in_threadpool(image_models.served) if pipeline.worker.runs_model_jobs else []
    images = [ImageModelEntry(name=m.name, kind=m.kind, class_names=list(m.class_names), feature_dim=m.feature_dim,
                              grid_shape=list(m.grid_shape), capabilities=list(m.capabilities)) for m in served]
    return ModelList(models=entries, default_model=default, worker=pipeline.worker.kind, image_models=images)
