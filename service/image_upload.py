"""Reading and checking a posted-images upload (the multipart form of ``service.images``): the ``image_<id>``
parts, the ``cameras`` part and a render request's ``novel`` part, paired, counted and sized against the image
limits of ``ServiceSettings`` (``PONDER_IMAGES_*``) before any pixel is decoded, then decoded into checked
``PosedImages``. Reading runs on the event loop (the form is parsed once); checking and decoding in the
preprocessing pool. Torch-free at import."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.datastructures import UploadFile
from starlette.requests import Request

from service.errors import ApiError
from service.uploads import parsed_form

if TYPE_CHECKING:
    from service.settings import ServiceSettings

FORM_FILES, FORM_FIELDS, FORM_PART_BYTES = 128, 128, 4 << 20  # those of service.uploads (the form is parsed once)
_PART = re.compile(r"^image_([A-Za-z0-9._-]{1,100})$")


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


# ------------------------------------------------------------------------------------------ reading


async def posted_images(request: Request) -> bool:
    """Whether the request is multipart with ``image_<id>`` parts (parses the form once; the point-cloud
    readers then use the same parsed form)."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return False
    form = await parsed_form(request, FORM_FILES, FORM_FIELDS, FORM_PART_BYTES)
    return any(k.startswith("image_") for k in form.keys())


async def read_image_upload(request: Request, limits: ServiceSettings, with_novel: bool = False
                            ) -> ImageUpload:
    """The upload's parts (400/413 naming what is wrong), views in their ids' order (see ``_order``)."""
    form = await parsed_form(request, FORM_FILES, FORM_FIELDS, FORM_PART_BYTES)
    try:
        parts = dict(form.multi_items())
        bad = [k for k in parts if k.startswith("image_") and not _PART.match(k)]
        if bad:
            raise ApiError(400, f"bad image part name {bad[0]!r}: use image_<id> with an id of letters, digits, "
                                "'.', '_' or '-'")
        keys = [k for k in parts if _PART.match(k)]
        if len(keys) > limits.images_max_views:
            raise ApiError(413, f"{len(keys)} image views exceed the limit of {limits.images_max_views} per request "
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
        cameras = await _small_part(parts["cameras"], "cameras", limits.images_max_cameras_bytes)
        novel = await _small_part(parts["novel"], "novel", limits.images_max_cameras_bytes) if with_novel else None
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
    from model.render.cameras import CameraError, load_camera_json

    try:
        return load_camera_json(data, f"the '{name}' part")
    except CameraError as exc:
        raise ApiError(422, str(exc)) from exc


def _count_listed(doc: Any) -> int | None:
    listed = doc.get("cameras", doc.get("frames")) if isinstance(doc, dict) else doc
    return len(listed) if isinstance(listed, list) else None


def _pair(upload: ImageUpload, names: list[str | None]) -> list[ImageView]:
    """The view of each camera (by name, else by order: see ``service.images``), 422 naming what does not pair."""
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

    from model.images.inputs import IMAGE_FORMATS

    data = view.data
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    try:
        with Image.open(io.BytesIO(view.data), formats=IMAGE_FORMATS) as im:  # reads the header only
            return im.size
    except Image.DecompressionBombError as exc:
        raise ApiError(413, f"image_{view.key}: {exc}") from exc
    except UnidentifiedImageError as exc:  # its text names an in-memory buffer object, not the upload
        raise ApiError(422, f"image_{view.key}: not a readable PNG/JPEG image (unknown image format)") from exc
    except (OSError, ValueError) as exc:
        raise ApiError(422, f"image_{view.key}: not a readable PNG/JPEG image ({exc})") from exc


def _decode(view: ImageView) -> np.ndarray:
    from PIL import Image

    from model.images.inputs import IMAGE_FORMATS, rgb_pixels

    try:
        with Image.open(io.BytesIO(view.data), formats=IMAGE_FORMATS) as im:
            im.load()  # decode first: damage is "corrupt" below, an unusable pixel format is said as such
            try:
                return rgb_pixels(im)
            except ValueError as exc:
                raise ApiError(422, f"image_{view.key}: {exc}") from exc
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a corrupt upload
        raise ApiError(422, f"image_{view.key}: the image data is corrupt ({type(exc).__name__}: {exc})") from exc


def prepare_views(upload: ImageUpload, limits: ServiceSettings, grid_shape: tuple[int, int, int]):
    """(PosedImages, bounds or None, novel cameras or None) under the limits; every check before decoding."""
    from model.images.errors import ImageInputError
    from model.images.inputs import check_views, estimate_bounds, parse_bounds, parse_cameras

    voxels = int(np.prod(grid_shape))
    if voxels > limits.images_max_volume_voxels:
        raise ApiError(413, f"the image model lifts into {voxels} voxels ({'x'.join(map(str, grid_shape))}), over "
                            f"the limit of {limits.images_max_volume_voxels} (PONDER_IMAGES_MAX_VOLUME_VOXELS)")
    doc = _document(upload.cameras, "cameras")
    listed = _count_listed(doc)
    if listed is not None and listed > limits.images_max_views:
        raise ApiError(413, f"{listed} cameras exceed the limit of {limits.images_max_views} views per request "
                            "(PONDER_IMAGES_MAX_VIEWS)")
    try:
        cameras, names = parse_cameras(doc)
        bounds = parse_bounds(doc["bounds"]) if isinstance(doc, dict) and "bounds" in doc else None
        if bounds is None:
            estimate_bounds(cameras)  # what the model will lift into: refused here, before any decoding
    except ImageInputError as exc:
        raise ApiError(422, str(exc)) from exc
    views = _pair(upload, names)
    total = 0
    for view, cam in zip(views, cameras):
        w, h = _header_size(view)
        if w * h > limits.images_max_view_pixels:
            raise ApiError(413, f"image_{view.key}: {w}x{h} = {w * h} pixels exceed the limit of "
                                f"{limits.images_max_view_pixels} per view (PONDER_IMAGES_MAX_VIEW_PIXELS); send "
                                "smaller images (and scale the intrinsics with them)")
        if (w, h) != (cam.width, cam.height):
            raise ApiError(422, f"view image_{view.key}: the image is {w}x{h} but its camera says "
                                f"{cam.width}x{cam.height}; the intrinsics must describe the image as given")
        total += w * h
    if total > limits.images_max_total_pixels:
        raise ApiError(413, f"{len(views)} views of {total} pixels in all exceed the limit of "
                            f"{limits.images_max_total_pixels} (PONDER_IMAGES_MAX_TOTAL_PIXELS)")
    novel = None
    if upload.novel is not None:  # the point-cloud render's parser: the same JSON reader and camera limit (413)
        from service.routers.render import parse_cameras as parse_render_cameras

        novel = parse_render_cameras(upload.novel, "novel")
    try:
        posed = check_views([_decode(v) for v in views], cameras, [f"image_{v.key}" for v in views])
    except ImageInputError as exc:
        raise ApiError(422, str(exc)) from exc
    return posed, bounds, novel
