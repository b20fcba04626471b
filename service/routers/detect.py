"""POST /v1/detect: oriented 3D boxes of an uploaded scene, from a model with a detection head.

The boxes come from ``model.detection.detect`` run on the model thread (a ModelJob); the answer is the
``ponder detect`` JSON document (format ponder-detections/1) in the input's world frame."""

from __future__ import annotations

from typing import TYPE_CHECKING

import json
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import JSONResponse

from model.pointcloud.cloud import PointCloud, PointCloudError
from model.results import detections_to_input_frame
from service.dependencies import get_pipeline
from service.encoding import best_media
from service.errors import ApiError
from service.pipeline import Pipeline, prepared_meta
from service.routers.common import ERRORS, NOT_IMPLEMENTED, UPLOAD_BODY, job_card
from service.schemas import DetectJSON, DetectParams
from service.uploads import read_upload
from service.workers.base import LONG, ModelJob, WorkerInputError

router = APIRouter(prefix="/v1", tags=["inference"])


def detect_in_world(predictor: Predictor, cloud: PointCloud, condition: str | None, grid_size: float | None,
                    score_threshold: float | None, iou_threshold: float | None) -> DetectionResult:
    """``detect`` at the request's grid size; boxes are in the input's world frame (``cloud.origin`` included)."""
    try:
        from model.detection.predict import detect

        return detect(predictor, cloud, condition, score_threshold, iou_threshold, grid_size)
    except PointCloudError as exc:
        raise WorkerInputError(str(exc)) from exc


@router.post("/detect", response_model=None, openapi_extra=UPLOAD_BODY, summary="3D object detection",
             responses={200: {"description": "the detections", "model": DetectJSON}, **ERRORS, **NOT_IMPLEMENTED})
async def detect_boxes(request: Request, params: Annotated[DetectParams, Query()],
                       pipeline: Pipeline = Depends(get_pipeline)) -> JSONResponse:
    """Oriented boxes ``[cx, cy, cz, dx, dy, dz, yaw]`` (centre, full sizes, yaw about +z; metres, in the
    input's world frame) with scores, labels and corners, for models with a detection head. Same inputs as
    /v1/features: a point-cloud body, a multipart 'file' part, or RGB-D views."""
    if not best_media(request.headers.get("accept"), ["application/json"])[0]:
        raise ApiError(406, "/v1/detect answers application/json only")
    card = job_card(pipeline, params.model, "detect")
    condition = pipeline.resolve_condition(card, params.condition)
    async with pipeline.deadline(pipeline.timeout_for(params.timeout_s), LONG, request) as admission:
        upload = await read_upload(request, params.format, params.filename)
        admission.watch(request)
        prepared = await pipeline.decode_prepared(upload, card, params.grid_size, params.input_options())
        run = partial(detect_in_world, cloud=prepared.cloud, condition=condition, grid_size=params.grid_size,
                      score_threshold=params.score_threshold, iou_threshold=params.iou_threshold)
        result: DetectionResult = await pipeline.worker.call(ModelJob(card.info.name, run, "detect",
                                                                      cancel=admission.token, ticket=admission.ticket))
    pipeline.metrics.points.labels("/v1/detect").inc(len(prepared.cloud))
    document = detections_to_input_frame(result.to_json(prepared.cloud.source), prepared.rotation)
    meta = prepared_meta(prepared)
    meta.pop("up_rotation", None)  # in the document
    body = {"model": card.info.name, "condition": condition, "num_points": prepared.num_input,
            "grid_size": params.grid_size or card.info.grid_size, **document, **meta}
    headers = {}
    if prepared.rotation is not None:
        headers["X-Ponder-Up-Rotation"] = json.dumps(document["up_rotation"])
    if prepared.dropped:
        headers["X-Ponder-Dropped-Points"] = str(prepared.dropped)
    return JSONResponse(body, headers=headers)


if TYPE_CHECKING:
    from model.detection.predict import DetectionResult, detect
    from model.inference import Predictor
