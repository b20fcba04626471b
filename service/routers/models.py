"""GET /v1/models: what the server can run."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.dependencies import get_pipeline
from service.pipeline import Pipeline
from service.routers.common import ERRORS
from service.schemas import ModelEntry, ModelList

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelList, responses={k: ERRORS[k] for k in (401, 403, 429, 503)})
async def list_models(pipeline: Pipeline = Depends(get_pipeline)) -> ModelList:
    """Served models: name, kind, conditions, class names per condition, input features, version and
    capabilities (which of /v1/features, /v1/segment, /v1/detect, /v1/render each model answers)."""
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
    return ModelList(models=entries, default_model=default, worker=pipeline.worker.kind)
