"""POST /v1/features: per-point (or per-voxel) backbone features of an uploaded scene."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service.dependencies import get_pipeline
from service.encoding import Payload, encode, negotiate
from service.pipeline import Pipeline, Processed
from service.routers.common import UPLOAD_BODY, answers
from service.schemas import FeatureParams, FeaturesJSON
from service.uploads import read_upload

router = APIRouter(prefix="/v1", tags=["inference"])


def features_payload(done: Processed, params: FeatureParams) -> Payload:
    voxel_features = done.output.features.astype(params.dtype, copy=False)  # (M, C)
    meta = {"model": done.card.info.name, "condition": done.condition, "num_points": done.num_points,
            "num_voxels": done.voxels.num_voxels, "grid_size": done.voxels.grid_size, "output": params.output}
    if done.filled:
        meta["filled"] = done.filled
    if params.output == "per_voxel":
        arrays = {"features": voxel_features, "point_to_voxel": done.voxels.point_to_voxel,  # (M, C), (N,)
                  "grid_coord": done.voxels.grid_coord}  # (M, 3)
    else:
        arrays = {"features": np.take(voxel_features, done.voxels.point_to_voxel, axis=0)}  # (N, C)
    return Payload(arrays=arrays, meta=meta)


@router.post("/features", response_model=None, responses=answers(FeaturesJSON), openapi_extra=UPLOAD_BODY,
             summary="Backbone features of a point cloud")
async def features(request: Request, params: Annotated[FeatureParams, Query()],
                   pipeline: Pipeline = Depends(get_pipeline)) -> Response:
    """Features for every input point (``output=per_point``, in input order) or for every voxel with the
    point-to-voxel index (``output=per_voxel``). Answer format from ``Accept``: JSON, NPY, NPZ or Arrow."""
    fmt = negotiate(request.headers.get("accept"))  # refuse an impossible Accept before reading the upload
    card = pipeline.card(params.model)
    condition = pipeline.resolve_condition(card, params.condition)
    async with pipeline.deadline(pipeline.timeout_for(params.timeout_s), request=request) as admission:
        upload = await read_upload(request, params.format, params.filename)
        admission.watch(request)
        done = await pipeline.run(upload, card, condition, params.grid_size, want_logits=False, admission=admission)
    pipeline.metrics.points.labels("/v1/features").inc(done.num_points)
    return await run_in_threadpool(encode, features_payload(done, params), fmt, pipeline.settings.max_json_values)
