"""POST /v1/segment: a semantic label (and optionally logits) for every input point."""

from __future__ import annotations

from functools import partial
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from model.inference import Predictor, SegmentResult
from model.pointcloud.cloud import PointCloud, PointCloudError
from model.tta import OFFICIAL_AUGMENTATIONS
from service.dependencies import get_pipeline
from service.encoding import Payload, encode, negotiate
from service.errors import ApiError
from service.pipeline import Pipeline, Processed
from service.routers.common import NOT_IMPLEMENTED, UPLOAD_BODY, answers
from service.schemas import SegmentJSON, SegmentParams
from service.uploads import read_upload
from service.workers.base import FAST, LONG, ModelCard, ModelJob, WorkerInputError

router = APIRouter(prefix="/v1", tags=["inference"])


def precise_segment(predictor: Predictor, cloud: PointCloud, condition: str | None, grid_size: float | None
                    ) -> tuple[SegmentResult, int]:
    """The official precise mode on the model thread: per-point result and the plain voxel count."""
    try:
        result = predictor.segment(cloud, condition, grid_size, precise=True)
        return result, predictor.prepare(cloud, grid_size).num_voxels  # one plain voxelisation: cheap next to 13
    except PointCloudError as exc:
        raise WorkerInputError(str(exc)) from exc


def precise_payload(result: SegmentResult, num_voxels: int, cloud: PointCloud, card: ModelCard,
                    condition: str | None, grid_size: float, filled: list[str], params: SegmentParams) -> Payload:
    meta = {"model": card.info.name, "condition": condition, "num_points": len(cloud), "num_voxels": num_voxels,
            "grid_size": grid_size, "class_names": list(result.class_names), "mode": "precise",
            "augmentations": len(OFFICIAL_AUGMENTATIONS)}
    if filled:
        meta["filled"] = filled
    arrays = {"labels": result.labels}
    if params.logits:
        arrays["logits"] = result.logits.astype(params.dtype, copy=False)  # (N, K) log mean probabilities
    return Payload(arrays=arrays, meta=meta)


def segment_payload(done: Processed, params: SegmentParams) -> Payload:
    voxel_logits = done.output.logits  # (M, K)
    assert voxel_logits is not None
    point_to_voxel = done.voxels.point_to_voxel
    labels = voxel_logits.argmax(axis=1).astype(np.int32)[point_to_voxel]  # (N,)
    meta = {"model": done.card.info.name, "condition": done.condition, "num_points": done.num_points,
            "num_voxels": done.voxels.num_voxels, "grid_size": done.voxels.grid_size,
            "class_names": list(done.card.class_names(done.condition, voxel_logits.shape[1])), "mode": "fast"}
    if done.filled:
        meta["filled"] = done.filled
    arrays = {"labels": labels}
    if params.logits:
        arrays["logits"] = np.take(voxel_logits, point_to_voxel, axis=0).astype(params.dtype, copy=False)  # (N, K)
    return Payload(arrays=arrays, meta=meta)


@router.post("/segment", response_model=None, openapi_extra=UPLOAD_BODY,
             responses={**answers(SegmentJSON), 501: {**NOT_IMPLEMENTED[501],
                                                     "description": "mode=precise with the Triton worker"}},
             summary="Semantic segmentation of a point cloud")
async def segment(request: Request, params: Annotated[SegmentParams, Query()],
                  pipeline: Pipeline = Depends(get_pipeline)) -> Response:
    """A label index for every input point (input order) with the class names; ``logits=true`` adds the
    (N, K) logits. ``mode=precise`` runs the official tester (13 augmentations x fragments, voted) instead of
    one pass. Answer format from ``Accept``: JSON, NPY (labels only), NPZ or Arrow."""
    fmt = negotiate(request.headers.get("accept"))
    if params.mode == "precise" and not pipeline.worker.runs_model_jobs:
        raise ApiError(501, f"mode=precise is not available with the {pipeline.worker.kind} worker: the official "
                            "precise mode (test-time augmentation) needs the in-process worker "
                            "(PONDER_WORKER=inprocess); use mode=fast")
    card = pipeline.card(params.model)
    if not card.has_classifier:
        raise ApiError(422, f"model {card.info.name!r} ({card.info.kind}) has no segmentation head; "
                            "use /v1/features or pick another model")
    condition = pipeline.resolve_condition(card, params.condition)
    lane = LONG if params.mode == "precise" else FAST
    async with pipeline.deadline(pipeline.timeout_for(params.timeout_s), lane, request) as admission:
        upload = await read_upload(request, params.format, params.filename)
        admission.watch(request)
        if params.mode == "precise":
            cloud, filled = await pipeline.decode_cloud(upload, card, params.grid_size)
            run = partial(precise_segment, cloud=cloud, condition=condition, grid_size=params.grid_size)
            result, num_voxels = await pipeline.worker.call(ModelJob(card.info.name, run, "segment-precise",
                                                                     cancel=admission.token, ticket=admission.ticket))
        else:
            done = await pipeline.run(upload, card, condition, params.grid_size, want_logits=True,
                                      admission=admission)
    if params.mode == "precise":
        pipeline.metrics.points.labels("/v1/segment").inc(len(cloud))
        payload = precise_payload(result, num_voxels, cloud, card, condition, params.grid_size or card.info.grid_size,
                                  filled, params)
        return await run_in_threadpool(encode, payload, fmt, pipeline.settings.max_json_values)
    pipeline.metrics.points.labels("/v1/segment").inc(done.num_points)
    return await run_in_threadpool(encode, segment_payload(done, params), fmt, pipeline.settings.max_json_values)
