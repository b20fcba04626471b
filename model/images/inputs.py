"""Posed images as users give them: a folder of images plus a cameras document, checked before any pixel is
lifted. Every problem is an ``ImageInputError`` with a message naming the view.

Cameras: the JSON of ``model.render.cameras`` (a list, or ``{"cameras": [...]}``; an optional ``"image"`` per
camera names its file, else cameras pair with the images sorted by name) or a nerfstudio ``transforms.json``
(each frame's ``file_path``). An optional top-level ``"bounds": [[xmin, ymin, zmin], [xmax, ymax, zmax]]`` (metres)
sets the scene box to lift into; without it the box is estimated from the camera frusta (``estimate_bounds``).
A box, given or estimated, must lie within ±``MAX_TRANSLATION`` metres (the cameras' own limit) with its longest
side at least ``MIN_BOUNDS_SIDE``: outside, the lifted volume's float32 unit-cube maths breaks down.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from model.images.errors import ImageInputError
from model.images.lifting import project, visible
from model.render.cameras import (MAX_TRANSLATION, Camera, CameraError, camera_image_names, cameras_from_document,
                                  read_camera_document)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# The decoders PIL may use on a user's image (CLI files and uploads alike): what the suffixes promise, and no
# exotic decoder (TIFF, PSD, ...) reachable by renaming a file.
IMAGE_FORMATS = ("PNG", "JPEG")
MIN_VIEWS = 2
MIN_BOUNDS_SIDE = 1e-3  # metres, the longest side of the lifted box


@dataclass
class PosedImages:
    images: np.ndarray          # (V, H, W, 3) uint8
    cameras: list[Camera]       # V cameras, each width x height = the image's size
    names: list[str]

    def tensors(self, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images (1, V, 3, H, W) in [0, 1], K (1, V, 3, 3), w2c (1, V, 4, 4): one scene for the model."""
        img = torch.from_numpy(self.images).to(device).permute(0, 3, 1, 2).float()[None] / 255.0
        K = torch.tensor(np.stack([c.K for c in self.cameras]), dtype=torch.float32, device=device)[None]
        w2c = torch.tensor(np.stack([c.w2c for c in self.cameras]), dtype=torch.float32, device=device)[None]
        return img, K, w2c


def check_views(images: Sequence[np.ndarray], cameras: Sequence[Camera], names: Sequence[str]) -> PosedImages:
    """At least two views, one camera per image, every image (H, W, 3) uint8 of its camera's size."""
    if len(images) != len(cameras):
        raise ImageInputError(f"{len(images)} images but {len(cameras)} cameras: give one camera (with its pose) "
                              "per image")
    if len(images) < MIN_VIEWS:
        raise ImageInputError(f"{len(images)} view given: lifting images without depth needs at least {MIN_VIEWS} "
                              "posed views of the scene")
    shapes = set()
    for img, cam, name in zip(images, cameras, names):
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ImageInputError(f"view {name}: expected an 8-bit RGB image, got {img.dtype} {img.shape}")
        if (img.shape[1], img.shape[0]) != (cam.width, cam.height):
            raise ImageInputError(f"view {name}: the image is {img.shape[1]}x{img.shape[0]} but its camera says "
                                  f"{cam.width}x{cam.height}; the intrinsics must describe the image as given")
        shapes.add(img.shape)
    if len(shapes) != 1:
        raise ImageInputError(f"all views must share one image size, got {sorted(s[:2] for s in shapes)}")
    return PosedImages(np.stack(images), list(cameras), list(names))


def parse_cameras(doc: Any) -> tuple[list[Camera], list[str | None]]:
    """Cameras and their image names (None where not given) from a parsed cameras document."""
    try:
        cameras = cameras_from_document(doc)
    except CameraError as exc:
        raise ImageInputError(f"cameras: {exc}") from None
    return cameras, camera_image_names(doc)


def parse_bounds(value: Any) -> np.ndarray:
    try:
        b = np.asarray(value, dtype=np.float64).reshape(2, 3)
    except (TypeError, ValueError, OverflowError, RecursionError):
        raise ImageInputError("bounds must be [[xmin, ymin, zmin], [xmax, ymax, zmax]] in metres") from None
    if not np.all(np.isfinite(b)) or np.any(b[1] <= b[0]):
        raise ImageInputError(f"bounds must be finite with max > min on every axis, got {b.tolist()}")
    return check_bounds(b, "bounds")


def check_bounds(b: np.ndarray, what: str) -> np.ndarray:
    """``b`` if within ±MAX_TRANSLATION metres with its longest side at least MIN_BOUNDS_SIDE, else an
    ImageInputError naming ``what`` (the lifted unit cube is a float32 similarity of this box)."""
    if np.abs(b).max() > MAX_TRANSLATION or (b[1] - b[0]).max() < MIN_BOUNDS_SIDE:
        raise ImageInputError(f"{what} must lie within ±{MAX_TRANSLATION:g} m with a longest side of at least "
                              f"{MIN_BOUNDS_SIDE:g} m, got {np.asarray(b).tolist()}")
    return b


def estimate_bounds(cameras: Sequence[Camera], far: float = 4.0) -> np.ndarray:
    """The box around every camera centre and its image corners and centre pushed ``far`` metres out."""
    pts = []
    for cam in cameras:
        c2w = cam.c2w
        w, h = cam.width - 1, cam.height - 1
        pix = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1], [w / 2, h / 2, 1]], dtype=np.float64)
        rays = pix @ np.linalg.inv(cam.K).T
        pts.append(c2w[:3, 3][None])
        pts.append((rays * far) @ c2w[:3, :3].T + c2w[:3, 3])
    p = np.concatenate(pts)
    return check_bounds(np.stack([p.min(0), p.max(0)]),
                        "the box estimated from the camera frusta (give 'bounds' to set it)")


def rgb_pixels(im: Any) -> np.ndarray:
    """(H, W, 3) uint8 of an opened PIL image: the one decode of input views (CLI and service). 16-bit images
    (greyscale PNGs open as mode ``I;16``/``I``) are scaled to 8 bits, not clipped (PIL's ``convert("RGB")`` turns
    every value above 255 white); float images have no colour scale and are refused."""
    if im.mode.startswith("I"):
        values = np.asarray(im)
        top = int(values.max()) if values.size else 0
        if (values.size and int(values.min()) < 0) or top > 65535:
            raise ValueError(f"{im.mode} pixel values {int(values.min())}..{top} are not 8- or 16-bit colour")
        if im.mode.startswith("I;16") or top > 255:
            values = (values.astype(np.uint32) * 255 + 32767) // 65535  # 0..65535 -> 0..255, rounded
        grey = values.astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if im.mode == "F":
        raise ValueError("a floating-point image (mode F) has no colour scale; save the views as 8- or 16-bit PNG/JPEG")
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


# Most pixels of all input views `read_image_folder` decodes by default: the image models hold ~90 bytes per
# input pixel at peak (5 views of 2400x1800 took 1.9 GB), so 16 MP is ~1.5 GB. `ponder images --max-input-pixels`.
MAX_INPUT_PIXELS = 16 << 20


def read_image_folder(folder: Path, cameras_path: Path, max_input_pixels: int | None = MAX_INPUT_PIXELS
                      ) -> tuple[PosedImages, np.ndarray | None]:
    """(views, bounds or None) from an image folder and a cameras file (see the module docstring). The views'
    sizes are read from their headers and refused over ``max_input_pixels`` in all before any is decoded."""
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such image folder")
    try:
        doc = read_camera_document(cameras_path)
    except CameraError as exc:
        raise ImageInputError(str(exc)) from None
    cameras, names = parse_cameras(doc)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if all(n is not None for n in names):
        paths = [folder / n if (folder / n).is_file() else folder / Path(n).name for n in names]
        absent = [str(p) for p in paths if not p.is_file()]
        if absent:
            raise ImageInputError(f"cameras name images that are not in {folder}: {absent[:3]}")
        named = {p.resolve() for p in paths}
        unnamed = [p.name for p in files if p.resolve() not in named]
        if unnamed:  # a view the user may have meant to include: said, not silently dropped
            warnings.warn(f"{len(unnamed)} image(s) in {folder} are named by no camera and are not used: "
                          f"{', '.join(unnamed[:5])}{' ...' if len(unnamed) > 5 else ''}", stacklevel=2)
    else:
        if len(files) != len(cameras):
            raise ImageInputError(f"{folder} holds {len(files)} images but {cameras_path} has {len(cameras)} "
                                  "cameras; give one camera per image (or name each camera's 'image')")
        paths = files
    unreadable = (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError)
    sizes = []
    for p in paths:
        try:
            with Image.open(p, formats=IMAGE_FORMATS) as im:  # the header only
                sizes.append(im.size)
        except unreadable as exc:
            raise ImageInputError(f"{p}: not a readable image ({exc})") from None
    total = sum(w * h for w, h in sizes)
    if max_input_pixels is not None and total > max_input_pixels:
        largest = max(range(len(paths)), key=lambda i: sizes[i][0] * sizes[i][1])
        raise ImageInputError(f"the {len(paths)} views have {total:,} pixels in all (largest {paths[largest].name}: "
                              f"{sizes[largest][0]}x{sizes[largest][1]}), more than --max-input-pixels "
                              f"{max_input_pixels:,} (~90 bytes of memory each): downscale the images and their "
                              "intrinsics, or raise the limit")
    images = []
    for p in paths:
        try:
            with Image.open(p, formats=IMAGE_FORMATS) as im:
                images.append(rgb_pixels(im))
        except unreadable as exc:
            raise ImageInputError(f"{p}: not a readable image ({exc})") from None
    bounds = parse_bounds(doc["bounds"]) if isinstance(doc, Mapping) and "bounds" in doc else None
    return check_views(images, cameras, [p.name for p in paths]), bounds


def check_coverage(points: torch.Tensor, views: PosedImages) -> np.ndarray:
    """Voxels each view sees, (V,); a view that sees none of them is an error naming it."""
    _, K, w2c = views.tensors(points.device)
    h, w = views.images.shape[1:3]
    uv, z = project(points, K[0], w2c[0])
    seen = visible(uv, z, w, h).sum(1).cpu().numpy()
    blind = [views.names[i] for i in np.nonzero(seen == 0)[0]]
    if blind:
        raise ImageInputError(f"views {blind} see nothing of the scene volume (every voxel is behind the camera or "
                              "outside the image): check their poses (world_to_camera vs camera_to_world) and the "
                              "bounds")
    return seen
