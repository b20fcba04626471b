"""POST /v1/segment: a semantic label (and optionally logits) for every input point."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service.dependencies import get_pipeline
from service.encoding import Payload, encode, negotiate
from service.errors import ApiError
from service.pipeline import Pipeline, Processed
from service.routers.common import UPLOAD_BODY, answers
from service.schemas import SegmentJSON, SegmentParams
from service.uploads import read_upload

router = APIRouter(prefix="/v1", tags=["inference"])


def segment_payload(done: Processed, params: SegmentParams) -> Payload:
    voxel_logits = done.output.logits  # (M, K)
    assert voxel_logits is not None
    point_to_voxel = done.voxels.point_to_voxel
    labels = voxel_logits.argmax(axis=1).astype(np.int32)[point_to_voxel]  # (N,)
    meta = {"model": done.card.info.name, "condition": done.condition, "num_points": done.num_points,
            "num_voxels": done.voxels.num_voxels, "grid_size": done.voxels.grid_size,
            "class_names": list(done.card.class_names(done.condition, voxel_logits.shape[1]))}
    if done.filled:
        meta["filled"] = done.filled
    arrays = {"labels": labels}
    if params.logits:
        arrays["logits"] = np.take(voxel_logits, point_to_voxel, axis=0).astype(params.dtype, copy=False)  # (N, K)
    return Payload(arrays=arrays, meta=meta)


@router.post("/segment", response_model=None, responses=answers(SegmentJSON), openapi_extra=UPLOAD_BODY,
             summary="Semantic segmentation of a point cloud")
async def segment(request: Request, params: Annotated[SegmentParams, Query()],
                  pipeline: Pipeline = Depends(get_pipeline)) -> Response:
    """A label index for every input point (input order) with the class names; ``logits=true`` adds the
    (N, K) logits. Answer format from ``Accept``: JSON, NPY (labels only), NPZ or Arrow."""
    fmt = negotiate(request.headers.get("accept"))
    card = pipeline.card(params.model)
    if not card.has_classifier:
        raise ApiError(422, f"model {card.info.name!r} ({card.info.kind}) has no segmentation head; "
                            "use /v1/features or pick another model")
    condition = pipeline.resolve_condition(card, params.condition)
    upload = await read_upload(request, params.format, params.filename)
    done = await pipeline.run(upload, card, condition, params.grid_size, want_logits=True,
                              timeout_s=pipeline.timeout_for(params.timeout_s))
    pipeline.metrics.points.labels("/v1/segment").inc(done.num_points)
    return await run_in_threadpool(encode, segment_payload(done, params), fmt, pipeline.settings.max_json_values)
