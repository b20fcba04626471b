"""POST /v1/render: colour and depth images of an uploaded scene seen from given cameras, rendered by the
render head of a pre-training model (``model.novel_view``) on the model thread (a ModelJob).

Multipart input: the scene as the 'file' part (any point-cloud format) and the cameras as a 'cameras' JSON
part (``model.render.cameras``: one camera, a list, ``{"cameras": [...]}``, or a nerfstudio transforms.json).
One camera answers a PNG; several cameras (or ``Accept: application/zip``) answer a zip with, per camera i,
``<i>_color.png`` (8-bit RGB), ``<i>_depth.png`` (16-bit millimetres, 0 = no hit) and ``<i>_depth.npy``
(float32 metres), plus ``meta.json``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import io
import json
import zipfile
from functools import partial
from typing import Annotated, Sequence

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.responses import Response

from model.pointcloud.cloud import PointCloud, PointCloudError
from model.prepare import InputOptions
from model.render.cameras import Camera, CameraError, cameras_from_document, load_camera_json
from model.render.images import DEPTH_UNITS_PER_M, ViewImages, png_bytes
from service import images as images_branch
from service.dependencies import get_image_models, get_pipeline
from service.errors import ApiError
from service.image_jobs import ImageModels
from service.encoding import best_media
from service.pipeline import Pipeline, prepared_meta
from service.routers.common import ERRORS, NOT_IMPLEMENTED, job_card
from service.schemas import RenderParams
from service.uploads import parsed_form, read_upload
from service.workers.base import LONG, ModelJob, WorkerInputError

router = APIRouter(prefix="/v1", tags=["inference"])
PNG, ZIP = "image/png", "application/zip"
MAX_CAMERAS_BYTES = 4 << 20
MAX_CAMERAS = 1024  # each camera is its own render pass; the pixel limit alone would allow millions of 1x1 views

RENDER_BODY = {
    "requestBody": {
        "required": True,
        "description": "multipart/form-data: 'file' (the scene, any supported point-cloud format) and 'cameras' "
                       "(JSON: a camera {width, height, K or fx/fy/cx/cy, world_to_camera or camera_to_world; "
                       "OpenCV axes, metres, the scene's frame}, a list of them, {\"cameras\": [...]}, or a "
                       "nerfstudio transforms.json).",
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file", "cameras"],
            "properties": {"file": {"type": "string", "format": "binary"}, "cameras": {"type": "string"}}}}},
    }
}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
RESPONSES = {200: {"description": "one camera: a PNG (colour, or 16-bit depth in mm with ?output=depth); several "
                                  "cameras or Accept: application/zip: a zip of <i>_color.png, <i>_depth.png, "
                                  "<i>_depth.npy and meta.json", "content": {PNG: _BINARY, ZIP: _BINARY}},
             **ERRORS, **NOT_IMPLEMENTED}


def render_job(predictor: Predictor, cloud: PointCloud, cameras: Sequence[Camera], condition: str | None,
               chunk: int = 4096, rotation: np.ndarray | None = None) -> list[ViewImages]:
    """The scene's render volume, then every camera through it (runs on the model thread). ``cloud`` is
    already z-up; ``rotation`` (input -> z-up, from ``?up=``) keeps the cameras in the input's frame."""
    try:
        from model.novel_view import in_input_frame, render_views_of, scene_volume

        volume = in_input_frame(scene_volume(predictor.model, predictor.config, cloud, condition), rotation)
        views = render_views_of(predictor.model, volume, cameras, chunk)
    except (PointCloudError, CameraError) as exc:
        raise WorkerInputError(str(exc)) from exc
    return [ViewImages.of(v) for v in views]


def parse_cameras(data: bytes, part: str = "cameras") -> list[Camera]:
    """Cameras from a cameras JSON part (422 naming the problem; 413 over MAX_CAMERAS, counted before the
    cameras are built). Runs in the preprocessing pool: a big transforms.json takes seconds to read. Also the
    image render's 'novel' part (``part``), so both obey one camera limit."""
    try:
        doc = load_camera_json(data, f"the '{part}' part")
    except CameraError as exc:
        raise ApiError(422, str(exc)) from exc
    listed = doc.get("cameras", doc.get("frames")) if isinstance(doc, dict) else doc
    if isinstance(listed, list):
        check_camera_count(len(listed), part)
    try:
        return cameras_from_document(doc)
    except CameraError as exc:
        raise ApiError(422, f"invalid '{part}' cameras: {exc}") from exc


def check_camera_count(count: int, part: str = "cameras") -> None:
    """413 for more than MAX_CAMERAS cameras in one request (each is its own render pass)."""
    if count > MAX_CAMERAS:
        raise ApiError(413, f"{count} cameras exceed the limit of {MAX_CAMERAS} per request (the '{part}' part); "
                            "split them")


def checked_cameras(data: bytes, width: int | None, height: int | None, max_pixels: int) -> list[Camera]:
    """The request's cameras, resized and within the camera and pixel limits (413); in the pool."""
    cameras = resized_cameras(parse_cameras(data), width, height)
    check_camera_count(len(cameras))
    pixels = sum(c.width * c.height for c in cameras)
    if pixels > max_pixels:
        raise ApiError(413, f"{len(cameras)} camera(s) with {pixels} pixels in all exceed the limit of {max_pixels} "
                            "(PONDER_MAX_RENDER_PIXELS); render fewer or smaller views (?width=, ?height=)")
    return cameras


def resized_cameras(cameras: Sequence[Camera], width: int | None, height: int | None,
                    part: str = "cameras") -> list[Camera]:
    """``resize_camera`` of each; 422 where the scaled intrinsics leave the camera limits (a tiny focal length
    shrunk further by ?width=)."""
    try:
        return [resize_camera(c, width, height) for c in cameras]
    except CameraError as exc:
        raise ApiError(422, f"invalid '{part}' cameras at ?width={width}&height={height}: {exc}") from exc


def resize_camera(camera: Camera, width: int | None, height: int | None) -> Camera:
    """The camera with another image size and the intrinsics scaled to it (pixel centres stay pixel centres:
    x' + 0.5 = (x + 0.5) * s); one missing side keeps the aspect ratio."""
    if width is None and height is None:
        return camera
    w = width or max(1, round(camera.width * height / camera.height))
    h = height or max(1, round(camera.height * width / camera.width))
    sx, sy = w / camera.width, h / camera.height
    K = camera.K.copy()
    K[0, 0], K[0, 2] = K[0, 0] * sx, (K[0, 2] + 0.5) * sx - 0.5
    K[1, 1], K[1, 2] = K[1, 1] * sy, (K[1, 2] + 0.5) * sy - 0.5
    return Camera(K=K, w2c=camera.w2c, width=w, height=h)


def answer_type(accept: str | None, num_views: int) -> str:
    """PNG for one camera (ties and wildcards), zip for several or when asked; 406 when Accept allows neither."""
    media, _ = best_media(accept, [ZIP, PNG] if num_views == 1 else [ZIP])
    if media:
        return media
    several = " (several cameras give several images: ask for application/zip)" if num_views > 1 else ""
    raise ApiError(406, f"cannot answer in {accept!r}: /v1/render answers {PNG} (one camera) or {ZIP}{several}")


def zip_bytes(images: list[ViewImages], meta: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i, view in enumerate(images):
            for name, data in view.files(i).items():  # PNGs are compressed already; the float depth is not
                archive.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED if name.endswith(".npy") else None)
        archive.writestr("meta.json", json.dumps(meta, indent=1))
    return buffer.getvalue()


async def render_answer(media: str, images: list[ViewImages], output: str, headers: dict[str, str],
                        meta: dict) -> Response:
    """The answer of a render: for ``media`` PNG the one view's colour (or ``output="depth"``: 16-bit depth) as a
    PNG, else the zip of every view with ``meta`` as meta.json; ``headers`` (the route's) are extended."""
    if media == PNG:
        (view,) = images
        image = view.depth_units() if output == "depth" else view.color
        headers["X-Ponder-Hit-Fraction"] = f"{view.hit_fraction:.6f}"
        headers["Content-Disposition"] = f'inline; filename="0_{output}.png"'
        return Response(await run_in_threadpool(png_bytes, image), media_type=PNG, headers=headers)
    headers["Content-Disposition"] = 'attachment; filename="views.zip"'
    return Response(await run_in_threadpool(zip_bytes, images, meta), media_type=ZIP, headers=headers)


async def read_cameras_part(request: Request) -> bytes:
    """The 'cameras' part's bytes. The form is parsed here once; ``read_upload`` then reads the 'file' part
    from the same parsed form (Starlette keeps it on the request) and closes it."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise ApiError(415, "/v1/render takes multipart/form-data with a 'file' part (the scene) and a 'cameras' "
                            "part (JSON)")
    form = await parsed_form(request, max_part_size=MAX_CAMERAS_BYTES)
    if "file" not in form:
        raise ApiError(400, f"multipart body has no 'file' part with the scene (parts: {', '.join(form) or 'none'})")
    if "cameras" not in form:
        raise ApiError(400, "multipart body has no 'cameras' part (JSON with each camera's size, intrinsics and "
                            "pose)")
    part = form["cameras"]
    data = await part.read(MAX_CAMERAS_BYTES + 1) if isinstance(part, UploadFile) else part.encode()
    if len(data) > MAX_CAMERAS_BYTES:
        raise ApiError(413, f"the 'cameras' part is larger than {MAX_CAMERAS_BYTES >> 20} MiB")
    return data


@router.post("/render", response_model=None, responses=RESPONSES, openapi_extra=RENDER_BODY,
             summary="Novel views (colour and depth) of a point cloud")
async def render(request: Request, params: Annotated[RenderParams, Query()],
                 pipeline: Pipeline = Depends(get_pipeline),
                 image_models: ImageModels = Depends(get_image_models)) -> Response:
    """Renders the scene from each camera with a model that has a render head (pre-training checkpoints).
    Cameras live in the scene's frame (metres, OpenCV axes), also when ``up`` names another up axis than z (the
    cloud is rotated into z-up for the model, the cameras follow). ``width``/``height`` rescale every camera;
    the total pixel count is limited by PONDER_MAX_RENDER_PIXELS (413)."""
    async with pipeline.deadline(pipeline.timeout_for(params.timeout_s), LONG, request) as admission:
        if await images_branch.posted_images(request):  # image_<id> + cameras + novel: the image model
            return await images_branch.render(request, params, pipeline, admission, image_models)
        card = job_card(pipeline, params.model, "render")
        condition = pipeline.resolve_condition(card, params.condition)
        data = await read_cameras_part(request)
        cameras = await pipeline.in_pool(checked_cameras, data, params.width, params.height,
                                         pipeline.settings.max_render_pixels)
        media = answer_type(request.headers.get("accept"), len(cameras))
        upload = await read_upload(request, params.format, None)
        admission.watch(request)
        prepared = await pipeline.decode_prepared(upload, card, None,
                                                  InputOptions(up=params.up, invalid=params.invalid))
        cloud = prepared.cloud
        run = partial(render_job, cloud=cloud, cameras=cameras, condition=condition,
                      chunk=pipeline.settings.render_chunk, rotation=prepared.rotation)
        images: list[ViewImages] = await pipeline.worker.call(ModelJob(card.info.name, run, "render",
                                                                       cancel=admission.token,
                                                                       ticket=admission.ticket))
    pipeline.metrics.points.labels("/v1/render").inc(len(cloud))
    headers = {"X-Ponder-Model": card.info.name, "X-Ponder-Num-Points": str(len(cloud))}
    if condition:
        headers["X-Ponder-Condition"] = condition
    facts = prepared_meta(prepared)
    up_rotation = facts.get("up_rotation")
    if up_rotation is not None:
        headers["X-Ponder-Up-Rotation"] = json.dumps(up_rotation)
    if facts.get("dropped_points"):
        headers["X-Ponder-Dropped-Points"] = str(facts["dropped_points"])
    meta = {"model": card.info.name, "condition": condition, "num_points": len(cloud),
            "dropped_points": facts.get("dropped_points", 0),
            "filled": list(prepared.filled), "up_rotation": up_rotation,
            "depth_png_units_per_metre": DEPTH_UNITS_PER_M,
            "views": [{"width": c.width, "height": c.height, "hit_fraction": v.hit_fraction, "camera": c.to_dict()}
                      for c, v in zip(cameras, images)]}
    return await render_answer(media, images, params.output, headers, meta)


if TYPE_CHECKING:
    import numpy as np

    from model.inference import Predictor
