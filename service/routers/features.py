"""POST /v1/features: per-point (or per-voxel) backbone features of an uploaded scene."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service import images
from service.dependencies import get_image_models, get_pipeline
from service.encoding import Payload, encode, negotiate, require_fit
from service.image_jobs import ImageModels
from model.results import input_point_to_voxel, point_values
from service.pipeline import Pipeline, Processed, prepared_meta
from service.routers.common import UPLOAD_BODY, answers
from service.schemas import FeatureParams, FeaturesJSON
from service.uploads import read_upload

router = APIRouter(prefix="/v1", tags=["inference"])


def features_payload(done: Processed, params: FeatureParams) -> Payload:
    voxel_features = done.output.features.astype(params.dtype, copy=False)  # (M, C)
    valid = done.prepared.valid
    meta = {"model": done.card.info.name, "condition": done.condition, "num_points": done.prepared.num_input,
            "num_voxels": done.voxels.num_voxels, "grid_size": done.voxels.grid_size, "output": params.output,
            **prepared_meta(done.prepared)}
    if params.output == "per_voxel":  # (M, C), (N,) with -1 for dropped points, (M, 3)
        arrays = {"features": voxel_features, "point_to_voxel": input_point_to_voxel(done.voxels.point_to_voxel, valid),
                  "grid_coord": done.voxels.grid_coord}
    else:
        arrays = {"features": point_values(voxel_features, done.voxels.point_to_voxel, valid)}  # (N, C), NaN rows
    extras = {"coord": done.rgbd_coord} if done.rgbd_coord is not None else {}
    return Payload(arrays=arrays, meta=meta, extra_arrays=extras)


@router.post("/features", response_model=None, responses=answers(FeaturesJSON), openapi_extra=UPLOAD_BODY,
             summary="Backbone features of a point cloud")
async def features(request: Request, params: Annotated[FeatureParams, Query()],
                   pipeline: Pipeline = Depends(get_pipeline),
                   image_models: ImageModels = Depends(get_image_models)) -> Response:
    """Features for every input point (``output=per_point``, in input order; NaN rows for dropped NaN/inf
    points) or for every voxel with the point-to-voxel index (``output=per_voxel``; -1 for dropped points).
    RGB-D uploads also get the fused points as ``coord`` (N, 3) in NPZ and Arrow answers. Posed images without
    depth (multipart ``image_<id>`` parts + ``cameras``) get per-voxel features with voxel centres
    (``service.images``). Answer format from ``Accept``: JSON, NPY, NPZ or Arrow."""
    fmt = negotiate(request.headers.get("accept"))  # refuse an impossible Accept before reading the upload
    async with pipeline.deadline(pipeline.timeout_for(params.timeout_s), request=request) as admission:
        if await images.posted_images(request):  # multipart image_<id> + cameras: the image branch
            return await images.features(request, params, pipeline, admission, image_models, fmt)
        per_voxel = params.output == "per_voxel"
        require_fit(fmt, ["features", "point_to_voxel", "grid_coord"] if per_voxel else ["features"],
                    mixed_rows=per_voxel)  # the arrays of features_payload
        card = pipeline.card(params.model)
        condition = pipeline.resolve_condition(card, params.condition)
        upload = await read_upload(request, params.format, params.filename)
        admission.watch(request)
        done = await pipeline.run(upload, card, condition, params.grid_size, want_logits=False, admission=admission,
                                  options=params.input_options())
    pipeline.metrics.points.labels("/v1/features").inc(done.num_points)
    return await run_in_threadpool(encode, features_payload(done, params), fmt, pipeline.settings.max_json_values)
