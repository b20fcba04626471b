"""The results viewer: the page at ``/`` (``service/static/viewer``), the package's static files under
``/static``, and two helper routes the page needs besides the public API:

* ``POST /v1/viewer/points`` — the uploaded cloud decoded by the service's own readers (every format it
  accepts), thinned for display: (D, 6) float32 ``x y z r g b`` (coordinates minus ``offset``, colours 0..1);
* ``POST /v1/viewer/pca`` — the model's features of the same display rows as PCA colours, (D, 3) uint8,
  computed here so that a million-point cloud never sends N x C floats to a browser.

Display rows are ``floor(i * N / D)`` for i < D, D = min(N, max_points): the page computes the same rows to
pick per-point answers (labels) of the public routes. Both helpers live under /v1, so API keys, rate limits and
upload limits apply to them as to the model routes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from pydantic import Field
from starlette.responses import FileResponse, Response

from model.pointcloud.cloud import PointCloud, PointCloudError
from model.results import input_point_to_voxel
from service.dependencies import get_pipeline
from service.encoding import OutputFormat, Payload, encode
from service.errors import ApiError
from service.pipeline import Pipeline
from service.routers.common import ERRORS, UPLOAD_BODY
from service.schemas import CommonParams
from service.uploads import read_upload

STATIC = (Path(__file__).resolve().parents[1] / "static").resolve()
PAGE = STATIC / "viewer" / "index.html"
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".png": "image/png",
               ".npz": "application/octet-stream", ".md": "text/markdown", ".txt": "text/plain"}
PCA_FIT_ROWS = 20_000  # voxels the principal axes are fitted on (a strided subset beyond that)

router = APIRouter()
_NPY = {200: {"description": "an NPY array (X-Ponder-* headers carry the facts)",
              "content": {OutputFormat.NPY.value: {"schema": {"type": "string", "format": "binary"}}}}, **ERRORS}


class DisplayParams(CommonParams):
    max_points: int = Field(200_000, ge=1, le=2_000_000, description="at most this many display rows")


def display_rows(num_points: int, max_points: int) -> np.ndarray:
    """The rows shown: ``floor(i * N / D)``, evenly spread over the input order (the page uses the same rule)."""
    count = min(num_points, max_points)
    return (np.arange(count, dtype=np.int64) * num_points) // count


def display_points(cloud: PointCloud, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(D, 6) float32 ``x y z r g b`` and the float64 offset subtracted from the world coordinates (the centre
    of the bounding box of the valid rows), which keeps georeferenced clouds precise in the browser's float32.
    Rows without finite coordinates (the holes of an organised depth-camera cloud) come out as NaN: the page
    leaves them out but keeps its display-row arithmetic over the input order."""
    world = cloud.coord.astype(np.float64) + np.asarray(cloud.origin, dtype=np.float64)
    finite = np.isfinite(world).all(axis=1)
    valid = world[finite] if not finite.all() else world
    offset = 0.5 * (valid.min(axis=0) + valid.max(axis=0)) if len(valid) else np.zeros(3)
    out = np.empty((len(rows), 6), dtype=np.float32)
    out[:, :3] = world[rows] - offset
    out[~finite[rows], :3] = np.nan
    out[:, 3:] = cloud.color[rows] / 255.0 if cloud.color is not None else 0.6
    return out, offset


def pca_colors(voxel_features: np.ndarray, voxel_of_rows: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """RGB from the first three principal components of the voxel features: axes fitted on (a strided subset
    of) the voxels, each component stretched from its 2nd to its 98th percentile. Also the explained variance
    ratios. Signs are fixed (largest loading positive) so the colours do not flip between runs."""
    feats = voxel_features.astype(np.float64)
    fit = feats[display_rows(len(feats), PCA_FIT_ROWS)]
    mean = fit.mean(axis=0)
    centred = fit - mean
    values, vectors = np.linalg.eigh(centred.T @ centred / max(1, len(fit) - 1))
    order = np.argsort(values)[::-1][:3]
    axes = vectors[:, order]
    axes *= np.where(axes[np.abs(axes).argmax(axis=0), range(axes.shape[1])] < 0, -1.0, 1.0)
    fitted = centred @ axes
    low, high = np.percentile(fitted, 2, axis=0), np.percentile(fitted, 98, axis=0)
    has_voxel = voxel_of_rows >= 0  # -1: a dropped (NaN) input row, black
    scaled = ((feats[voxel_of_rows[has_voxel]] - mean) @ axes - low) / np.maximum(high - low, 1e-12)
    rgb = np.zeros((len(voxel_of_rows), 3), dtype=np.uint8)
    rgb[has_voxel, :axes.shape[1]] = np.rint(np.clip(scaled, 0.0, 1.0) * 255)
    total = float(values.sum())
    return rgb, [float(values[i] / total) if total > 0 else 0.0 for i in order]


@router.get("/", include_in_schema=False)
async def viewer_page() -> FileResponse:
    return FileResponse(PAGE, media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/static/{path:path}", include_in_schema=False)
async def static_file(path: str) -> FileResponse:
    """A file of ``service/static`` (never outside it)."""
    target = (STATIC / path).resolve()
    if not target.is_relative_to(STATIC) or not target.is_file():
        raise ApiError(404, f"no static file {path!r}")
    media = MEDIA_TYPES.get(target.suffix.lower(), "application/octet-stream")
    return FileResponse(target, media_type=media, headers={"Cache-Control": "public, max-age=3600"})


@router.post("/v1/viewer/points", response_model=None, tags=["viewer"], openapi_extra=UPLOAD_BODY, responses=_NPY,
             summary="A cloud thinned for display (viewer helper)")
async def points(request: Request, params: Annotated[DisplayParams, Query()],
                 pipeline: Pipeline = Depends(get_pipeline)) -> Response:
    """(D, 6) float32 ``x y z r g b`` of rows ``floor(i * N / D)``: coordinates minus ``X-Ponder-Offset`` (world
    frame, origin included), colours in 0..1 (0.6 grey when the file has none, ``X-Ponder-Has-Color``). Rows
    with NaN or infinite coordinates are NaN (``invalid=error``: 422 instead, as on the model routes)."""
    timeout_s = pipeline.timeout_for(params.timeout_s)
    try:
        async with asyncio.timeout(timeout_s):  # no lane place (no model work), but the same deadline
            upload = await read_upload(request, params.format, params.filename)
            cloud: PointCloud = await pipeline.in_pool(pipeline._decode, upload, None, True)  # the routes' decoding
            if params.invalid == "error":
                await pipeline.in_pool(checked_valid, cloud)
            rows = display_rows(len(cloud), params.max_points)
            array, offset = await pipeline.in_pool(display_points, cloud, rows)
    except TimeoutError as exc:
        raise ApiError(504, f"the request did not finish within {timeout_s:g} s "
                            "(PONDER_REQUEST_TIMEOUT_S or ?timeout_s=)") from exc
    meta = {"num_points": len(cloud), "num_display": len(rows), "offset": offset.tolist(),
            "origin": np.asarray(cloud.origin, dtype=np.float64).tolist(), "has_color": cloud.color is not None}
    return encode(Payload(arrays={"points": array}, meta=meta), OutputFormat.NPY, pipeline.settings.max_json_values)


def checked_valid(cloud: PointCloud) -> None:
    """422 with the readers' message when a row has NaN or infinite coordinates (``invalid=error``)."""
    try:
        cloud.validate()
    except PointCloudError as exc:
        raise ApiError(422, str(exc)) from exc


@router.post("/v1/viewer/pca", response_model=None, tags=["viewer"], openapi_extra=UPLOAD_BODY, responses=_NPY,
             summary="Feature PCA colours of the display rows (viewer helper)")
async def pca(request: Request, params: Annotated[DisplayParams, Query()],
              pipeline: Pipeline = Depends(get_pipeline)) -> Response:
    """(D, 3) uint8: the first three principal components of the model's features (as /v1/features, same
    ``up`` and ``invalid``) at the display rows, as RGB (black for dropped NaN rows);
    ``X-Ponder-Explained-Variance`` gives each component's share."""
    card = pipeline.card(params.model)
    condition = pipeline.resolve_condition(card, params.condition)
    async with pipeline.deadline(pipeline.timeout_for(params.timeout_s), request=request) as admission:
        upload = await read_upload(request, params.format, params.filename)
        admission.watch(request)
        done = await pipeline.run(upload, card, condition, params.grid_size, want_logits=False, admission=admission,
                                  options=params.input_options())
    num_input = done.prepared.num_input  # display rows count over the input order, as /v1/viewer/points
    rows = display_rows(num_input, params.max_points)
    voxel_of_rows = input_point_to_voxel(done.voxels.point_to_voxel, done.prepared.valid)[rows]
    rgb, explained = await pipeline.in_pool(pca_colors, done.output.features, voxel_of_rows)
    meta = {"model": card.info.name, "num_points": num_input, "num_display": len(rows),
            "explained_variance": [round(v, 6) for v in explained]}
    return encode(Payload(arrays={"colors": rgb}, meta=meta), OutputFormat.NPY, pipeline.settings.max_json_values)
