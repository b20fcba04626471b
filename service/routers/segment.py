"""POST /v1/segment: a semantic label (and optionally logits) for every input point."""

from __future__ import annotations

from typing import TYPE_CHECKING

from functools import partial
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from model.pointcloud.cloud import PointCloud, PointCloudError
from model.prepare import PreparedCloud
from model.results import SegmentResult, segment_from_voxels, to_input_rows
from service import images
from service.dependencies import get_image_models, get_pipeline
from service.encoding import Payload, encode, negotiate, require_fit
from service.errors import ApiError
from service.image_jobs import ImageModels
from service.pipeline import Pipeline, Processed, prepared_meta
from service.routers.common import NOT_IMPLEMENTED, UPLOAD_BODY, answers
from service.schemas import SegmentJSON, SegmentParams
from service.uploads import RGBDUpload, read_upload
from service.workers.base import FAST, LONG, ModelCard, ModelJob, WorkerInputError

router = APIRouter(prefix="/v1", tags=["inference"])


def precise_segment(predictor: Predictor, cloud: PointCloud, condition: str | None, grid_size: float | None
                    ) -> tuple[SegmentResult, int]:
    """The official precise mode on the model thread, for a prepared (valid, z-up, completed) cloud: per-point
    result over its rows and the plain voxel count."""
    try:
        result = predictor.segment(cloud, condition, grid_size, precise=True)
        return result, predictor.prepare(cloud, grid_size).num_voxels  # one plain voxelisation: cheap next to 13
    except PointCloudError as exc:
        raise WorkerInputError(str(exc)) from exc


def precise_payload(result: SegmentResult, num_voxels: int, prepared: PreparedCloud, card: ModelCard,
                    condition: str | None, grid_size: float, params: SegmentParams,
                    rgbd_coord: np.ndarray | None = None) -> Payload:
    meta = {"model": card.info.name, "condition": condition, "num_points": prepared.num_input,
            "num_voxels": num_voxels, "grid_size": grid_size, "class_names": list(result.class_names),
            "mode": "precise", "augmentations": _augmentations(), **prepared_meta(prepared)}
    arrays = {"labels": to_input_rows(result.labels, prepared.valid, -1)}
    if params.logits:  # (N, K) log mean probabilities
        arrays["logits"] = to_input_rows(result.logits, prepared.valid).astype(params.dtype, copy=False)
    return Payload(arrays=arrays, meta=meta, extra_arrays={} if rgbd_coord is None else {"coord": rgbd_coord})


def segment_payload(done: Processed, params: SegmentParams) -> Payload:
    voxel_logits = done.output.logits  # (M, K)
    assert voxel_logits is not None
    names = done.card.class_names(done.condition, voxel_logits.shape[1])
    result = segment_from_voxels(voxel_logits, done.voxels.point_to_voxel, names, done.prepared.valid,
                                 logits=params.logits)
    meta = {"model": done.card.info.name, "condition": done.condition, "num_points": done.prepared.num_input,
            "num_voxels": done.voxels.num_voxels, "grid_size": done.voxels.grid_size,
            "class_names": list(result.class_names), "mode": "fast", **prepared_meta(done.prepared)}
    arrays = {"labels": result.labels}  # (N,), -1 for dropped points
    if result.logits is not None:
        arrays["logits"] = result.logits.astype(params.dtype, copy=False)  # (N, K)
    extras = {"coord": done.rgbd_coord} if done.rgbd_coord is not None else {}
    return Payload(arrays=arrays, meta=meta, extra_arrays=extras)


@router.post("/segment", response_model=None, openapi_extra=UPLOAD_BODY,
             responses={**answers(SegmentJSON), 501: {**NOT_IMPLEMENTED[501],
                                                     "description": "mode=precise with the Triton worker"}},
             summary="Semantic segmentation of a point cloud")
async def segment(request: Request, params: Annotated[SegmentParams, Query()],
                  pipeline: Pipeline = Depends(get_pipeline),
                  image_models: ImageModels = Depends(get_image_models)) -> Response:
    """A label index for every input point (input order) with the class names; ``logits=true`` adds the
    (N, K) logits. ``mode=precise`` runs the official tester (13 augmentations x fragments, voted) instead of
    one pass. Answer format from ``Accept``: JSON, NPY (labels only), NPZ or Arrow."""
    fmt = negotiate(request.headers.get("accept"))
    if params.mode == "precise" and not pipeline.worker.runs_model_jobs:
        raise ApiError(501, f"mode=precise is not available with the {pipeline.worker.kind} worker: the official "
                            "precise mode (test-time augmentation) needs the in-process worker "
                            "(PONDER_WORKER=inprocess); use mode=fast")
    lane = LONG if params.mode == "precise" else FAST
    async with pipeline.deadline(pipeline.timeout_for(params.timeout_s), lane, request) as admission:
        if await images.posted_images(request):  # multipart image_<id> + cameras: the image branch
            return await images.segment(request, params, pipeline, admission, image_models, fmt)
        require_fit(fmt, ["labels", "logits"] if params.logits else ["labels"])  # the arrays of the payloads below
        card = pipeline.card(params.model)
        if not card.has_classifier:
            raise ApiError(422, f"model {card.info.name!r} ({card.info.kind}) has no segmentation head; "
                                "use /v1/features or pick another model")
        condition = pipeline.resolve_condition(card, params.condition)
        upload = await read_upload(request, params.format, params.filename)
        admission.watch(request)
        if params.mode == "precise":
            prepared = await pipeline.decode_prepared(upload, card, params.grid_size, params.input_options())
            run = partial(precise_segment, cloud=prepared.cloud, condition=condition, grid_size=params.grid_size)
            result, num_voxels = await pipeline.worker.call(ModelJob(card.info.name, run, "segment-precise",
                                                                     cancel=admission.token, ticket=admission.ticket))
        else:
            done = await pipeline.run(upload, card, condition, params.grid_size, want_logits=True,
                                      admission=admission, options=params.input_options())
    if params.mode == "precise":
        pipeline.metrics.points.labels("/v1/segment").inc(len(prepared.cloud))
        rgbd_coord = (prepared.to_input_frame(prepared.cloud.coord).astype(np.float32)
                      if isinstance(upload, RGBDUpload) else None)
        payload = precise_payload(result, num_voxels, prepared, card, condition,
                                  params.grid_size or card.info.grid_size, params, rgbd_coord)
        return await run_in_threadpool(encode, payload, fmt, pipeline.settings.max_json_values)
    pipeline.metrics.points.labels("/v1/segment").inc(done.num_points)
    return await run_in_threadpool(encode, segment_payload(done, params), fmt, pipeline.settings.max_json_values)


if TYPE_CHECKING:
    from model.inference import Predictor
    from model.tta import OFFICIAL_AUGMENTATIONS


def _augmentations() -> int:
    from model.tta import OFFICIAL_AUGMENTATIONS

    return len(OFFICIAL_AUGMENTATIONS)
