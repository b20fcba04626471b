"""Multi-view RGB-D fusion into one point cloud (numpy only; Pillow just decodes the images).

Each view is a depth image (16-bit PNG, ``depth_scale`` units per metre, 0 = no reading), an optional
colour image of the same size, and a pinhole camera in OpenCV axes (x right, y down, z forward; pixel
(u, v) = (column, row), centres at integer coordinates). Valid depths are back-projected, moved to the
world frame, merged, averaged per ``voxel_size`` voxel (coordinates and colours), and given normals
from the shared normals estimator, turned to face the camera that saw them.

Camera description (the ``cameras`` JSON part of an upload), per view id::

    {"K": [[fx,0,cx],[0,fy,cy],[0,0,1]]}  or  {"fx":..,"fy":..,"cx":..,"cy":..}
    plus {"world_to_camera": 4x4} or {"camera_to_world": 4x4} (identity when neither is given)

(the render cameras' JSON of ``model.render.cameras`` without width/height, parsed by the same functions, with
the same JSON reader and numeric limits: fx, fy, cx, cy and the pose translation in range, every number finite)

given as ``{"views": {id: camera}}``, ``{"views": [camera, ...]}`` (ids 0, 1, ...) or ``{id: camera}``;
an optional top-level ``depth_scale`` overrides the server's.

Memory is bounded before any pixel is decoded: :func:`check_image_budget` reads every image's size from
its header and refuses uploads whose fusion would exceed the memory budget; the decoders refuse images
whose header gives a side over 32768 px, and decompression bombs; :func:`fuse_views` refuses more than ``max_points`` fused points before it
estimates normals. Over-limit inputs raise :class:`RGBDTooLarge` (a PointCloudTooLarge: HTTP 413).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import numpy as np

from model.pointcloud.cloud import PointCloud, PointCloudTooLarge
from model.render.cameras import CameraError, finite_number, load_camera_json, parse_intrinsics, parse_pose


class RGBDError(ValueError):
    """Bad RGB-D input; the message names the view and the problem."""


class RGBDTooLarge(RGBDError, PointCloudTooLarge):
    """RGB-D input over the pixel, point or memory limits; refused before the work that would exceed them."""


# Peak working memory of fusion per depth pixel: the decoded depth, its float64 copy, back-projected and
# world coordinates, voxel keys and np.unique's sort, then normals when no pixels merge (measured 194 B
# without and 263 B with normals on a 1000x1000 view), and colour.
FUSION_BYTES_PER_PIXEL = 320
_MAX_IMAGE_SIDE = 1 << 15


@dataclass
class Camera:
    """An uploaded view's pinhole camera; unlike a render camera it has no image size (its depth image has)."""

    K: np.ndarray  # (3, 3) float64 intrinsics
    camera_to_world: np.ndarray  # (4, 4) float64 pose


@dataclass
class RGBDView:
    depth: np.ndarray  # (H, W) raw depth units (uint16 PNG values), 0 = missing
    camera: Camera
    color: np.ndarray | None = None  # (H, W, 3) uint8
    name: str = "view"


def parse_camera(spec: object, name: str) -> Camera:
    """One view's camera from its JSON object: the render cameras' format (``model.render.cameras``) without
    width and height (the depth image gives them); no pose means the camera sits at the world origin."""
    if not isinstance(spec, dict):
        raise RGBDError(f"camera {name!r}: expected a JSON object")
    try:
        K, w2c = parse_intrinsics(spec), parse_pose(spec, required=False)
    except CameraError as exc:
        raise RGBDError(f"camera {name!r}: {exc}") from None
    return Camera(K=K, camera_to_world=np.linalg.inv(w2c))


def parse_cameras(text: str | bytes) -> tuple[dict[str, Camera], float | None]:
    """The ``cameras`` JSON part -> ({view id: Camera}, depth_scale override or None)."""
    try:
        doc = load_camera_json(text, "the cameras part")  # the camera parsers' one JSON reader
    except CameraError as exc:
        raise RGBDError(str(exc)) from exc
    if not isinstance(doc, dict):
        raise RGBDError("the cameras part must be a JSON object")
    depth_scale = doc.get("depth_scale")
    if depth_scale is not None:
        try:
            depth_scale = finite_number(depth_scale, "depth_scale")
        except CameraError:
            depth_scale = 0.0
        if not depth_scale > 0:
            raise RGBDError("depth_scale must be a positive finite number (depth units per metre)")
    views = doc.get("views", {k: v for k, v in doc.items() if k != "depth_scale"})
    if isinstance(views, list):
        views = {str(i): v for i, v in enumerate(views)}
    if not isinstance(views, dict) or not views:
        raise RGBDError("the cameras part names no views")
    return {str(k): parse_camera(v, str(k)) for k, v in views.items()}, depth_scale


def image_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) from the image header; no pixel is decoded."""
    return _open_image(data, name, decode=False).size


def check_image_budget(depth: dict[str, bytes], color: dict[str, bytes], max_bytes: int,
                       max_pixels: int | None = None) -> int:
    """Refuse (before decoding) views of more than ``max_pixels`` depth pixels in all, or whose fusion would
    need more than ``max_bytes``, or whose colour image differs in size from its depth image. Every pixel
    may become a point (whatever the intrinsics, a depth image can put each pixel in its own voxel), so the
    pixel count is the only bound on the fused cloud known before decoding. Returns that count."""
    pixels = 0
    for key, data in depth.items():
        width, height = image_size(data, f"depth_{key}")
        cw, ch = image_size(color[key], f"color_{key}") if key in color else (width, height)
        if (cw, ch) != (width, height):
            raise RGBDError(f"color_{key}: colour image is {cw}x{ch} but depth is {width}x{height}; "
                            "they must be the same size")
        pixels += width * height
    if max_pixels is not None and pixels > max_pixels:
        raise RGBDTooLarge(f"{len(depth)} depth views of {pixels} pixels in all exceed the limit of {max_pixels} "
                           f"(PONDER_RGBD_MAX_PIXELS); send fewer or smaller views")
    if pixels * FUSION_BYTES_PER_PIXEL > max_bytes:
        raise RGBDTooLarge(f"{len(depth)} depth views of {pixels} pixels in all would need about "
                           f"{pixels * FUSION_BYTES_PER_PIXEL >> 20} MiB to fuse, more than the memory budget of "
                           f"{max_bytes >> 20} MiB (PONDER_MAX_DECODED_BYTES); send fewer or smaller views")
    return pixels


def decode_depth(data: bytes, name: str) -> np.ndarray:
    """A 16-bit (or 32-bit integer) single-channel PNG -> (H, W) array of depth units."""
    image = _open_image(data, name)
    if image.mode not in ("I;16", "I;16B", "I;16L", "I", "I;16N"):
        raise RGBDError(f"{name}: depth must be a 16-bit single-channel PNG, got image mode {image.mode}")
    depth = np.asarray(image)
    if depth.ndim != 2:
        raise RGBDError(f"{name}: depth must have one channel")
    return depth.astype(np.int64 if depth.dtype.kind == "i" else depth.dtype)


def decode_color(data: bytes, name: str) -> np.ndarray:
    """A PNG or JPEG colour image -> (H, W, 3) uint8 RGB."""
    image = _open_image(data, name)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _open_image(data: bytes, name: str, decode: bool = True):
    """The image, its header checked (size within bounds) before ``decode`` loads the pixels."""
    from PIL import Image, UnidentifiedImageError

    from model.images.inputs import IMAGE_FORMATS

    if not data:
        raise RGBDError(f"{name}: the image is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
        width, height = image.size
        if not (0 < width <= _MAX_IMAGE_SIDE and 0 < height <= _MAX_IMAGE_SIDE):
            raise RGBDTooLarge(f"{name}: the image is {width}x{height}; each side must be 1 to {_MAX_IMAGE_SIDE}")
        if decode:
            image.load()
    except RGBDError:
        raise
    except (Image.DecompressionBombError, MemoryError) as exc:
        raise RGBDTooLarge(f"{name}: the image is too large ({exc or 'out of memory'})") from exc
    except UnidentifiedImageError as exc:
        raise RGBDError(f"{name}: not a readable PNG/JPEG image (unknown image format)") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise RGBDError(f"{name}: not a readable PNG/JPEG image ({exc})") from exc
    return image


def back_project(view: RGBDView, depth_scale: float, max_depth: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Valid pixels of one view -> (world points (P, 3) float64, colours (P, 3) uint8 or None)."""
    depth = view.depth
    if depth.ndim != 2:
        raise RGBDError(f"{view.name}: depth must be a 2-D image, got shape {depth.shape}")
    if view.color is not None and view.color.shape[:2] != depth.shape:
        raise RGBDError(f"{view.name}: colour image is {view.color.shape[1]}x{view.color.shape[0]} but depth is "
                        f"{depth.shape[1]}x{depth.shape[0]}; they must be the same size")
    z = depth.astype(np.float64) / depth_scale
    valid = np.isfinite(z) & (z > 0) & (z <= max_depth)
    v, u = np.nonzero(valid)  # rows, columns
    z = z[v, u]
    K = view.camera.K
    x = (u - K[0, 2]) * z / K[0, 0]
    y = (v - K[1, 2]) * z / K[1, 1]
    cam = np.stack([x, y, z], axis=1)  # (P, 3) camera frame
    pose = view.camera.camera_to_world
    world = cam @ pose[:3, :3].T + pose[:3, 3]
    color = view.color[v, u] if view.color is not None else None
    return world, color


def voxel_average(points: np.ndarray, colors: np.ndarray | None, voxel: float
                  ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Average points (and colours) per voxel. Returns (points (M,3), colours (M,3) or None, first row (M,))."""
    cells = np.floor(points / voxel).astype(np.int64)
    cells -= cells.min(axis=0)
    extent = cells.max(axis=0).astype(np.float64) + 1
    if extent.prod() < 2.0**62:  # one int64 key per cell, x-major: same order as a row-wise unique, ~5x faster
        keys = (cells[:, 0] * int(extent[1]) + cells[:, 1]) * int(extent[2]) + cells[:, 2]
        _, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
    else:
        _, first, inverse, counts = np.unique(cells, axis=0, return_index=True, return_inverse=True,
                                              return_counts=True)
    inverse = inverse.reshape(-1)

    def mean(values: np.ndarray) -> np.ndarray:  # per-voxel sums in input order (as np.add.at), then / count
        return np.stack([np.bincount(inverse, weights=values[:, j], minlength=len(first)) for j in range(3)],
                        axis=1) / counts[:, None]

    mean_points = mean(points)
    mean_colors = None
    if colors is not None:
        mean_colors = np.clip(np.rint(mean(colors.astype(np.float64))), 0, 255).astype(np.uint8)
    return mean_points, mean_colors, first


def fuse_views(views: list[RGBDView], depth_scale: float = 1000.0, voxel_size: float = 0.01,
               max_depth: float = 10.0, normals: bool = True, source: str = "rgbd",
               max_points: int | None = None,
               before_normals: Callable[[np.ndarray], None] | None = None) -> PointCloud:
    """Back-project, merge and voxel-average every view into one cloud (with camera-facing normals).
    More than ``max_points`` fused points is refused before the normals are estimated; ``before_normals``
    (e.g. the service's voxel limit) sees the fused points then too, and may raise."""
    if not views:
        raise RGBDError("no RGB-D views given")
    with_color = [v.color is not None for v in views]
    if any(with_color) and not all(with_color):
        missing = [v.name for v in views if v.color is None]
        raise RGBDError(f"views {', '.join(missing)} have no colour image while others do; give all or none")
    parts = [back_project(v, depth_scale, max_depth) for v in views]
    points = np.concatenate([p for p, _ in parts])
    if len(points) == 0:
        raise RGBDError(f"no valid depth in any view (depth 0 or beyond {max_depth} m everywhere)")
    colors = np.concatenate([c for _, c in parts]) if all(with_color) else None
    origin_of = np.concatenate([np.full(len(p), i) for i, (p, _) in enumerate(parts)])
    fused, fused_colors, first = voxel_average(points, colors, voxel_size)
    if max_points is not None and len(fused) > max_points:
        raise RGBDTooLarge(f"{source}: fusion gives {len(fused)} points (one per {voxel_size:g} m voxel), more than "
                           f"the limit of {max_points}; send fewer or smaller views")
    if before_normals is not None:
        before_normals(fused)
    normal = None
    if normals and len(fused) >= 3:
        from model.pointcloud.normals import estimate_normals

        normal = estimate_normals(fused.astype(np.float32)).astype(np.float64)
        centres = np.stack([v.camera.camera_to_world[:3, 3] for v in views])[origin_of[first]]  # (M, 3)
        flip = np.einsum("ij,ij->i", normal, centres - fused) < 0
        normal[flip] *= -1
    return PointCloud(coord=fused.astype(np.float32), color=fused_colors,
                      normal=None if normal is None else normal.astype(np.float32), source=source)
