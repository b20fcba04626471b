"""Posed images without depth on the model routes: ``/v1/features``, ``/v1/segment`` and ``/v1/render`` take
multipart ``image_<id>`` parts (PNG/JPEG) plus a ``cameras`` part (the camera JSON of ``model.render.cameras``
or a nerfstudio ``transforms.json``; an optional top-level ``bounds`` [[xmin, ymin, zmin], [xmax, ymax, zmax]]
sets the lifted box, else it is estimated from the frusta). Render requests add a ``novel`` part: the
cameras to render, same JSON.

Cameras pair with image parts by name (each camera's ``image`` / each frame's ``file_path`` equal to the
part id, its file name, or their stems), else by order (ids sorted numerically, then by name).

Limits (``ImageLimits``, ``PONDER_IMAGES_*``) are enforced before any pixel is decoded: the number of views,
every view's pixels and the total, read from the image headers, and the lifted volume's voxels (the model's
grid). Each request runs on the in-process worker's long lane (a ModelJob: one at a time per model thread,
the request's deadline and cancel token); parsing and decoding run in the preprocessing pool.

Answers (Accept as the other routes: JSON when small, NPZ; NPY is refused as several arrays come back):
features: ``features`` (M, C), ``centres`` (M, 3) metres, ``views_seeing`` (M,), ``grid_index`` (M, 3) of the
voxels some view sees; segment: ``labels`` (M,) (-1 = empty space), ``occupancy`` (M,), ``centres``,
``grid_index`` and ``pixel_labels`` (V, H, W) per input pixel (views in ``meta.views`` order); render: as
``/v1/render`` (a PNG for one camera, else a zip).

Imported by the routers: nothing here imports torch or the model at module import (slim gateway).
"""

from __future__ import annotations

import io
import re
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import Response

from service.encoding import OutputFormat, Payload, encode
from service.errors import ApiError
from service.workers.base import LONG, ModelJob, WorkerInputError

BUNDLED = Path(__file__).resolve().parent.parent / "model" / "default_model"
FORM_FILES, FORM_FIELDS, FORM_PART_BYTES = 128, 128, 4 << 20  # those of service.uploads (the form is parsed once)
_PART = re.compile(r"^image_([A-Za-z0-9._-]{1,100})$")


class ImageLimits(BaseSettings):
    """Image-branch settings, ``PONDER_IMAGES_`` + the field name (e.g. ``PONDER_IMAGES_MAX_VIEWS``)."""

    model_config = SettingsConfigDict(env_prefix="PONDER_IMAGES_", extra="ignore", protected_namespaces=())

    checkpoint: Path | None = None          # image model (features, render); default: the bundled model/default_model/images
    segment_checkpoint: Path | None = None  # image segmentation model; default: model/default_model/images-segment
    max_views: int = Field(default=32, ge=2)
    max_view_pixels: int = Field(default=1 << 20, ge=1)     # one view (1024 x 1024)
    max_total_pixels: int = Field(default=8 << 20, ge=1)    # all views of one request
    max_volume_voxels: int = Field(default=1 << 21, ge=1)   # the lifted grid X·Y·Z of the model
    max_cameras_bytes: int = Field(default=4 << 20, ge=1)


@dataclass
class ImageView:
    key: str        # the part id (image_<key>)
    filename: str | None
    data: bytes


@dataclass
class ImageUpload:
    views: list[ImageView]
    cameras: bytes
    novel: bytes | None


class ImageModels:
    """The image models of one app, loaded on first use (on the model thread) and kept."""

    def __init__(self, limits: ImageLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._loaded: dict[Path, Any] = {}

    def path(self, kind: str) -> Path:
        """The model folder for ``kind`` ("render" or "segment"); 422 when none is configured or bundled."""
        given = self.limits.checkpoint if kind == "render" else self.limits.segment_checkpoint
        path = given or BUNDLED / ("images" if kind == "render" else "images-segment")
        if not (path / "config.json").is_file():
            env = "PONDER_IMAGES_CHECKPOINT" if kind == "render" else "PONDER_IMAGES_SEGMENT_CHECKPOINT"
            what = "image model" if kind == "render" else "image segmentation model"
            raise ApiError(422, f"no {what} is served (set {env} to a model folder"
                                + (f"; {path} holds none)" if given else ")"))
        return path

    @staticmethod
    def name(path: Path) -> str:
        return f"default-{path.name}" if path.parent == BUNDLED else path.name

    def get(self, path: Path, device: str) -> Any:
        with self._lock:
            if path not in self._loaded:
                from model.images.checkpoint import load_image_model
                from model.images.segment import is_image_segment_model, load_image_segment_model

                load = load_image_segment_model if is_image_segment_model(path) else load_image_model
                try:
                    self._loaded[path] = load(path, device)
                except (OSError, ValueError) as exc:  # a broken model folder: the server's fault, said plainly
                    raise ApiError(503, f"the image model {path} could not be loaded: {exc}",
                                   headers={"Retry-After": "30"}) from exc
            return self._loaded[path]


def image_models(request: Request) -> ImageModels:
    state = request.app.state
    models = getattr(state, "image_models", None)
    if models is None:
        models = state.image_models = ImageModels(ImageLimits())
    return models


# ------------------------------------------------------------------------------------------ reading


async def posted_images(request: Request) -> bool:
    """Whether the request is multipart with ``image_<id>`` parts (parses the form once; the point-cloud
    readers then use the same parsed form)."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return False
    try:
        form = await request.form(max_files=FORM_FILES, max_fields=FORM_FIELDS, max_part_size=FORM_PART_BYTES)
    except MultiPartException as exc:
        status = 413 if "too many files" in exc.message.lower() else 400
        raise ApiError(status, f"malformed multipart body: {exc.message}" if status == 400 else
                       f"{exc.message} (at most {FORM_FILES} parts; the image routes take at most "
                       f"PONDER_IMAGES_MAX_VIEWS views)") from exc
    return any(k.startswith("image_") for k in form.keys())


async def read_image_upload(request: Request, with_novel: bool = False) -> ImageUpload:
    form = await request.form(max_files=FORM_FILES, max_fields=FORM_FIELDS, max_part_size=FORM_PART_BYTES)
    limits = image_models(request).limits
    try:
        parts = dict(form.multi_items())
        bad = [k for k in parts if k.startswith("image_") and not _PART.match(k)]
        if bad:
            raise ApiError(400, f"bad image part name {bad[0]!r}: use image_<id> with an id of letters, digits, "
                                "'.', '_' or '-'")
        keys = [k for k in parts if _PART.match(k)]
        if len(keys) > limits.max_views:
            raise ApiError(413, f"{len(keys)} image views exceed the limit of {limits.max_views} per request "
                                "(PONDER_IMAGES_MAX_VIEWS)")
        if "cameras" not in parts:
            raise ApiError(400, "image upload without a 'cameras' part: send JSON with each view's size, intrinsics "
                                "and pose (world_to_camera or camera_to_world), or a nerfstudio transforms.json")
        if with_novel and "novel" not in parts:
            raise ApiError(400, "rendering from images needs a 'novel' part: JSON with the cameras to render")
        views = []
        for k in keys:
            part = parts[k]
            data = await part.read() if isinstance(part, UploadFile) else part.encode()
            if not data:
                raise ApiError(400, f"{k}: the image part is empty")
            views.append(ImageView(k[6:], part.filename if isinstance(part, UploadFile) else None, data))
        cameras = await _small_part(parts["cameras"], "cameras", limits.max_cameras_bytes)
        novel = await _small_part(parts["novel"], "novel", limits.max_cameras_bytes) if with_novel else None
        return ImageUpload(sorted(views, key=lambda v: _order(v.key)), cameras, novel)
    finally:
        await form.close()


async def _small_part(part: UploadFile | str, name: str, limit: int) -> bytes:
    data = await part.read(limit + 1) if isinstance(part, UploadFile) else part.encode()
    if len(data) > limit:
        raise ApiError(413, f"the '{name}' part is larger than {limit} bytes (PONDER_IMAGES_MAX_CAMERAS_BYTES)")
    return data


def _order(key: str) -> tuple:
    return (0, int(key), "") if key.isdigit() else (1, 0, key)


# ------------------------------------------------------------------------------------------ checking (pool)


def _document(data: bytes, name: str) -> Any:
    import json

    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ApiError(422, f"the '{name}' part is not valid JSON: {exc}") from exc


def _count_listed(doc: Any) -> int | None:
    listed = doc.get("cameras", doc.get("frames")) if isinstance(doc, dict) else doc
    return len(listed) if isinstance(listed, list) else None


def _pair(upload: ImageUpload, names: list[str | None]) -> list[ImageView]:
    """The view of each camera (see the module docstring), 422 naming what does not pair."""
    views = upload.views
    if all(n is not None for n in names) and names:
        by_name: dict[str, ImageView] = {}
        for v in views:
            for alias in {v.key, Path(v.key).stem, *((v.filename, Path(v.filename).name, Path(v.filename).stem)
                                                     if v.filename else ())}:
                by_name.setdefault(alias, v)
        paired = []
        for n in names:
            view = by_name.get(n) or by_name.get(Path(n).name) or by_name.get(Path(n).stem)  # type: ignore[arg-type]
            if view is None:
                raise ApiError(422, f"camera for image {n!r} has no image part (parts: "
                                    f"{', '.join('image_' + v.key for v in views)})")
            paired.append(view)
        unused = [f"image_{v.key}" for v in views if all(v is not p for p in paired)]
        if unused:
            raise ApiError(422, f"views {', '.join(unused)} have no camera (no pose) in the 'cameras' part")
        return paired
    if len(names) != len(views):
        raise ApiError(422, f"{len(views)} image parts but {len(names)} cameras: give one camera (with its pose) "
                            "per image part, in the parts' order, or name each camera's 'image'")
    return list(views)


def _header_size(view: ImageView) -> tuple[int, int]:
    """(width, height) from the header: a PNG's IHDR read here (so even a size Pillow would refuse as a
    decompression bomb is reported against our limit), other formats through Pillow's lazy open."""
    from PIL import Image, UnidentifiedImageError

    data = view.data
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    try:
        with Image.open(io.BytesIO(view.data)) as im:  # reads the header only
            return im.size
    except Image.DecompressionBombError as exc:
        raise ApiError(413, f"image_{view.key}: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ApiError(422, f"image_{view.key}: not a readable PNG/JPEG image ({exc})") from exc


def _decode(view: ImageView) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(view.data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a corrupt upload
        raise ApiError(422, f"image_{view.key}: the image data is corrupt ({type(exc).__name__}: {exc})") from exc


def prepare_views(upload: ImageUpload, limits: ImageLimits, grid_shape: tuple[int, int, int]):
    """(PosedImages, bounds or None, novel cameras or None) under the limits; every check before decoding."""
    from model.images.errors import ImageInputError
    from model.images.inputs import check_views, parse_bounds, parse_cameras
    from model.render.cameras import CameraError, cameras_from_document

    voxels = int(np.prod(grid_shape))
    if voxels > limits.max_volume_voxels:
        raise ApiError(413, f"the image model lifts into {voxels} voxels ({'x'.join(map(str, grid_shape))}), over "
                            f"the limit of {limits.max_volume_voxels} (PONDER_IMAGES_MAX_VOLUME_VOXELS)")
    doc = _document(upload.cameras, "cameras")
    listed = _count_listed(doc)
    if listed is not None and listed > limits.max_views:
        raise ApiError(413, f"{listed} cameras exceed the limit of {limits.max_views} views per request "
                            "(PONDER_IMAGES_MAX_VIEWS)")
    try:
        cameras, names = parse_cameras(doc)
        bounds = parse_bounds(doc["bounds"]) if isinstance(doc, dict) and "bounds" in doc else None
    except ImageInputError as exc:
        raise ApiError(422, str(exc)) from exc
    views = _pair(upload, names)
    total = 0
    for view, cam in zip(views, cameras):
        w, h = _header_size(view)
        if w * h > limits.max_view_pixels:
            raise ApiError(413, f"image_{view.key}: {w}x{h} = {w * h} pixels exceed the limit of "
                                f"{limits.max_view_pixels} per view (PONDER_IMAGES_MAX_VIEW_PIXELS); send smaller "
                                "images (and scale the intrinsics with them)")
        if (w, h) != (cam.width, cam.height):
            raise ApiError(422, f"view image_{view.key}: the image is {w}x{h} but its camera says "
                                f"{cam.width}x{cam.height}; the intrinsics must describe the image as given")
        total += w * h
    if total > limits.max_total_pixels:
        raise ApiError(413, f"{len(views)} views of {total} pixels in all exceed the limit of "
                            f"{limits.max_total_pixels} (PONDER_IMAGES_MAX_TOTAL_PIXELS)")
    novel = None
    if upload.novel is not None:
        novel_doc = _document(upload.novel, "novel")
        try:
            novel = cameras_from_document(novel_doc)
        except CameraError as exc:
            raise ApiError(422, f"invalid 'novel' cameras: {exc}") from exc
    try:
        posed = check_views([_decode(v) for v in views], cameras, [f"image_{v.key}" for v in views])
    except ImageInputError as exc:
        raise ApiError(422, str(exc)) from exc
    return posed, bounds, novel


def model_grid(path: Path) -> tuple[int, int, int]:
    """The lifted grid of a model folder, read from its config.json (no weights loaded)."""
    import json

    doc = json.loads((path / "config.json").read_text())
    render = (doc.get("trunk", doc)).get("render", {})
    return tuple(int(g) for g in render.get("grid_shape", (0, 0, 0)))  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ running


@dataclass
class Prepared:
    path: Path      # the model folder
    name: str       # its served name
    posed: Any      # model.images.PosedImages, checked and decoded
    bounds: Any     # (2, 3) metres or None (estimated from the frusta by the model code)
    novel: Any      # render cameras (resized, within the pixel limit) or None


async def prepare(request: Request, pipeline, admission, kind: str, model_param: str | None,
                  novel_size: tuple[int | None, int | None, int] | None = None) -> Prepared:
    """Read, check and decode the upload (the pool). ``novel_size`` (width, height, max pixels): a render
    request, whose 'novel' cameras are resized and counted here, before any model work."""
    if not pipeline.worker.runs_model_jobs:
        raise ApiError(501, f"images are not served by the {pipeline.worker.kind} worker: the image branch needs the "
                            "in-process worker (PONDER_WORKER=inprocess)")
    models = image_models(request)
    path = models.path(kind)
    name = models.name(path)
    if model_param is not None and model_param != name:
        raise ApiError(404, f"unknown image model {model_param!r}; images are served by {name!r}")
    upload = await read_image_upload(request, novel_size is not None)
    admission.watch(request)
    grid = await pipeline.in_pool(model_grid, path)
    posed, bounds, novel = await pipeline.in_pool(prepare_views, upload, models.limits, grid)
    if novel_size is not None:
        from service.routers.render import resize_camera

        width, height, limit = novel_size
        novel = [resize_camera(c, width, height) for c in novel]
        pixels = sum(c.width * c.height for c in novel)
        if pixels > limit:
            raise ApiError(413, f"the novel cameras add up to {pixels} pixels, over the limit of {limit} "
                                "(PONDER_MAX_RENDER_PIXELS)")
    return Prepared(path, name, posed, bounds, novel)


async def run_job(request: Request, pipeline, admission, prepared: Prepared,
                  work: Callable[[Any, Any, Any, Any], Any], what: str, admitted_long: bool = False) -> Any:
    """``work(model, views, bounds, novel)`` as a ModelJob on the long lane under the request's deadline and
    cancel token. A request admitted to the fast lane (features, segment) takes its own place in the long lane
    here (503 + Retry-After when it is full); ``admitted_long``: the request's admission is that place (render)."""
    models = image_models(request)
    device = pipeline.settings.device

    def job(_predictor: Any) -> Any:  # a served point model only hosts the job on its lane; the image model runs
        from model.images.errors import ImageInputError

        try:
            return work(models.get(prepared.path, device), prepared.posed, prepared.bounds, prepared.novel)
        except ImageInputError as exc:
            raise WorkerInputError(str(exc)) from exc

    ticket = admission.ticket if admitted_long else pipeline.worker.admit(LONG)
    try:
        host = next(iter(pipeline.worker.models()))
        return await pipeline.worker.call(ModelJob(host, job, what, cancel=admission.token, ticket=ticket))
    finally:
        if not admitted_long:
            ticket.release()


def _meta(name: str, posed, bounds_used: np.ndarray, grid_shape) -> dict:
    return {"model": name, "input": "images", "num_views": len(posed.names), "views": list(posed.names),
            "image_size": [int(posed.images.shape[2]), int(posed.images.shape[1])],
            "grid_shape": list(grid_shape), "bounds": np.asarray(bounds_used).round(6).tolist()}


def _features_work(model, posed, bounds, novel):
    from model.images.inference import image_features

    if not hasattr(model, "head"):  # an image segmentation folder: its trunk gives the features
        model = model.trunk
    return image_features(model, posed, bounds)


async def features(request: Request, params, pipeline, admission, fmt: OutputFormat) -> Response:
    """``/v1/features`` for an image upload (see the module docstring)."""
    prepared = await prepare(request, pipeline, admission, "render", params.model)
    result = await run_job(request, pipeline, admission, prepared, _features_work, "images-features")
    posed, name = prepared.posed, prepared.name
    meta = {**_meta(name, posed, result.bounds, result.grid_shape), "num_voxels": int(len(result.features)),
            "feature_dim": int(result.features.shape[1]), "output": "per_voxel"}
    arrays = {"features": result.features.astype(params.dtype, copy=False), "centres": result.centres,
              "views_seeing": result.views_seeing, "grid_index": result.grid_index}
    pipeline.metrics.points.labels("/v1/features").inc(len(result.features))
    return await run_in_threadpool(encode, Payload(arrays=arrays, meta=meta), fmt, pipeline.settings.max_json_values)


def _segment_work(model, posed, bounds, novel):
    from model.images.segment import segment_from_images

    return segment_from_images(model, posed, bounds)


async def segment(request: Request, params, pipeline, admission, fmt: OutputFormat) -> Response:
    """``/v1/segment`` for an image upload: labels per seen voxel and per input pixel."""
    if params.mode == "precise":
        raise ApiError(422, "mode=precise (test-time augmentation of a point cloud) does not apply to images; "
                            "use mode=fast")
    prepared = await prepare(request, pipeline, admission, "segment", params.model)
    result = await run_job(request, pipeline, admission, prepared, _segment_work, "images-segment")
    posed, name = prepared.posed, prepared.name
    meta = {**_meta(name, posed, result.bounds, result.grid_shape), "num_voxels": int(len(result.labels)),
            "class_names": list(result.class_names)}
    arrays = {"labels": result.labels, "occupancy": result.occupancy, "centres": result.centres,
              "grid_index": result.grid_index, "pixel_labels": result.pixel_labels}
    pipeline.metrics.points.labels("/v1/segment").inc(len(result.labels))
    return await run_in_threadpool(encode, Payload(arrays=arrays, meta=meta), fmt, pipeline.settings.max_json_values)


async def render(request: Request, params, pipeline, admission) -> Response:
    """``/v1/render`` for an image upload: the 'novel' cameras rendered from the lifted scene; answered as the
    point-cloud render (one camera: a PNG, else a zip; ``width``/``height`` rescale the novel cameras).
    ``admission`` must be the request's long-lane admission (the render route's)."""
    from model.render.images import DEPTH_UNITS_PER_M, png_bytes
    from service.routers.render import PNG, answer_type, zip_bytes

    prepared = await prepare(request, pipeline, admission, "render", params.model,
                             (params.width, params.height, pipeline.settings.max_render_pixels))
    cams = prepared.novel
    media = answer_type(request.headers.get("accept"), len(cams))
    images = await run_job(request, pipeline, admission, prepared,
                           partial(_render_work, chunk=pipeline.settings.render_chunk), "images-render",
                           admitted_long=True)
    headers = {"X-Ponder-Model": prepared.name, "X-Ponder-Num-Views": str(len(prepared.posed.names))}
    if media == PNG:
        (view,) = images
        image = view.depth_units() if params.output == "depth" else view.color
        headers["X-Ponder-Hit-Fraction"] = f"{view.hit_fraction:.6f}"
        headers["Content-Disposition"] = f'inline; filename="0_{params.output}.png"'
        return Response(await run_in_threadpool(png_bytes, image), media_type=PNG, headers=headers)
    meta = {"model": prepared.name, "input": "images", "views": list(prepared.posed.names),
            "depth_png_units_per_metre": DEPTH_UNITS_PER_M,
            "novel": [{"width": c.width, "height": c.height, "hit_fraction": v.hit_fraction, "camera": c.to_dict()}
                      for c, v in zip(cams, images)]}
    headers["Content-Disposition"] = 'attachment; filename="views.zip"'
    return Response(await run_in_threadpool(zip_bytes, images, meta), media_type="application/zip", headers=headers)


def _render_work(model, posed, bounds, novel, chunk: int = 4096):
    from model.images.inference import render_from_images
    from model.render.images import ViewImages

    if not hasattr(model, "head"):  # an image segmentation folder: render with its trunk
        model = model.trunk
    return [ViewImages.of(v) for v in render_from_images(model, posed, novel, bounds, chunk)]


__all__ = ["ImageLimits", "ImageModels", "posted_images", "prepare", "run_job", "features", "segment", "render"]
