"""Posed images without depth on the model routes: ``/v1/features``, ``/v1/segment`` and ``/v1/render`` take
multipart ``image_<id>`` parts (PNG/JPEG) plus a ``cameras`` part (the camera JSON of ``model.render.cameras``
or a nerfstudio ``transforms.json``; an optional top-level ``bounds`` [[xmin, ymin, zmin], [xmax, ymax, zmax]]
sets the lifted box, else it is estimated from the frusta). Render requests add a ``novel`` part: the
cameras to render, same JSON.

Cameras pair with image parts by name (each camera's ``image`` / each frame's ``file_path`` equal to the
part id, its file name, or their stems), else by order (ids sorted numerically, then by name).

Limits (``ServiceSettings.images_max_*``, ``PONDER_IMAGES_*``) are enforced before any pixel is decoded: the
number of views, every view's pixels and the total, read from the image headers, and the lifted volume's voxels
(the model's grid). Each request runs on the in-process worker's long lane (a job named after its image model:
one at a time per model thread, the request's deadline and cancel token); parsing and decoding run in the
preprocessing pool.

Answers (Accept as the other routes: JSON when small, NPZ; NPY is refused as several arrays come back):
features: ``features`` (M, C), ``centres`` (M, 3) metres, ``views_seeing`` (M,), ``grid_index`` (M, 3) of the
voxels some view sees; segment: ``labels`` (M,) (-1 = empty space), ``occupancy`` (M,), ``centres``,
``grid_index`` and ``pixel_labels`` (V, H, W) per input pixel (views in ``meta.views`` order); render: as
``/v1/render`` (a PNG for one camera, else a zip).

Modules: ``service.image_upload`` reads and checks the upload, ``service.image_jobs`` holds the image models
(also listed by ``GET /v1/models``) and runs the job, this one is the routes' entry and shapes the answers.
Imported by the routers: nothing here imports torch or the model at module import (slim gateway).
"""

from __future__ import annotations

from functools import partial

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from service.encoding import OutputFormat, Payload, encode
from service.errors import ApiError
from service.image_jobs import ImageModels, prepare, run_job
from service.image_upload import posted_images


def _meta(name: str, posed, bounds_used: np.ndarray, grid_shape) -> dict:
    return {"model": name, "input": "images", "num_views": len(posed.names), "views": list(posed.names),
            "image_size": [int(posed.images.shape[2]), int(posed.images.shape[1])],
            "lifted_grid_shape": list(grid_shape), "bounds": np.asarray(bounds_used).round(6).tolist()}


def _features_work(model, posed, bounds, novel):
    from model.images.inference import image_features

    if not hasattr(model, "head"):  # an image segmentation folder: its trunk gives the features
        model = model.trunk
    return image_features(model, posed, bounds)


async def features(request: Request, params, pipeline, admission, models: ImageModels,
                   fmt: OutputFormat) -> Response:
    """``/v1/features`` for an image upload (see the module docstring)."""
    prepared = await prepare(request, pipeline, admission, models, "render", params.model)
    result = await run_job(pipeline, admission, models, prepared, _features_work, "images-features")
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


async def segment(request: Request, params, pipeline, admission, models: ImageModels,
                  fmt: OutputFormat) -> Response:
    """``/v1/segment`` for an image upload: labels per seen voxel and per input pixel."""
    if params.mode == "precise":
        raise ApiError(422, "mode=precise (test-time augmentation of a point cloud) does not apply to images; "
                            "use mode=fast")
    prepared = await prepare(request, pipeline, admission, models, "segment", params.model)
    result = await run_job(pipeline, admission, models, prepared, _segment_work, "images-segment")
    posed, name = prepared.posed, prepared.name
    meta = {**_meta(name, posed, result.bounds, result.grid_shape), "num_voxels": int(len(result.labels)),
            "class_names": list(result.class_names)}
    arrays = {"labels": result.labels, "occupancy": result.occupancy, "centres": result.centres,
              "grid_index": result.grid_index, "pixel_labels": result.pixel_labels}
    pipeline.metrics.points.labels("/v1/segment").inc(len(result.labels))
    return await run_in_threadpool(encode, Payload(arrays=arrays, meta=meta), fmt, pipeline.settings.max_json_values)


async def render(request: Request, params, pipeline, admission, models: ImageModels) -> Response:
    """``/v1/render`` for an image upload: the 'novel' cameras rendered from the lifted scene; answered as the
    point-cloud render (one camera: a PNG, else a zip; ``width``/``height`` rescale the novel cameras).
    ``admission`` must be the request's long-lane admission (the render route's)."""
    from model.render.images import DEPTH_UNITS_PER_M
    from service.routers.render import answer_type, render_answer

    prepared = await prepare(request, pipeline, admission, models, "render", params.model,
                             (params.width, params.height, pipeline.settings.max_render_pixels))
    cams = prepared.novel
    media = answer_type(request.headers.get("accept"), len(cams))
    images = await run_job(pipeline, admission, models, prepared,
                           partial(_render_work, chunk=pipeline.settings.render_chunk), "images-render",
                           admitted_long=True)
    headers = {"X-Ponder-Model": prepared.name, "X-Ponder-Num-Views": str(len(prepared.posed.names))}
    meta = {"model": prepared.name, "input": "images", "views": list(prepared.posed.names),
            "depth_png_units_per_metre": DEPTH_UNITS_PER_M,
            "novel": [{"width": c.width, "height": c.height, "hit_fraction": v.hit_fraction, "camera": c.to_dict()}
                      for c, v in zip(cams, images)]}
    return await render_answer(media, images, params.output, headers, meta)


def _render_work(model, posed, bounds, novel, chunk: int = 4096):
    from model.images.inference import render_from_images
    from model.render.images import ViewImages

    if not hasattr(model, "head"):  # an image segmentation folder: render with its trunk
        model = model.trunk
    return [ViewImages.of(v) for v in render_from_images(model, posed, novel, bounds, chunk)]


__all__ = ["ImageModels", "posted_images", "features", "segment", "render"]
