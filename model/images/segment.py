"""Semantic segmentation from posed images: a 1x1x1 classifier on the image model's render volume, with one
extra "empty space" class, so the lifted volume says both what is where and where nothing is.

Shapes (K classes, grid (X, Y, Z) = ``trunk.render.grid_shape``):

    images (B, V, 3, H, W), K (B, V, 3, 3), w2c (B, V, 4, 4), bounds (B, 2, 3)
      -> ``ImageRenderModel`` trunk (backbone, lifting, UNet3D): (B, C_out, Z, Y, X)
      -> classifier: logits (B, K + 1, Z, Y, X); channel K = empty space

Per voxel: label = argmax over the K + 1 channels, -1 where it is empty space. Per input pixel (projecting
back): the pixel's ray is marched through the volume (steps of half the smallest voxel side) to the first
point whose nearest voxel is occupied (occupancy 1 - p(empty) > 0.5); the pixel takes that voxel's label, -1
when the ray meets no occupied voxel (``pixel_labels``: at most 65,536 rays per view, the other pixels take the
nearest marched pixel's label). Voxels no view sees count as empty.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config_io import FORBID, ConfigError, dump, load
from model.images.checkpoint import config_kind, load_model_folder
from model.images.config import ImageModelConfig
from model.images.inputs import PosedImages, check_coverage, estimate_bounds
from model.images.model import ImageRenderModel, LiftedScenes
from model.images.volume import cube_from_bounds, unit_to_world, voxel_centres_unit
from model.render.cameras import Camera
from model.render.unit_cube import UnitCube

KIND_SEGMENT = "image-segment"
IGNORE = -1
OCCUPIED = 0.5


@dataclass
class ImageSegmentConfig:
    """Read with ``from_dict`` / ``load`` (the typed loader, ``model.config_io``); ``trunk`` is an
    ``ImageModelConfig`` mapping (its defaults when absent)."""

    __pydantic_config__ = FORBID
    kind: str = KIND_SEGMENT
    name: str = "ponder-images-segment"
    class_names: tuple[str, ...] = ()
    trunk: ImageModelConfig = field(default_factory=ImageModelConfig)

    def __post_init__(self) -> None:
        if self.kind != KIND_SEGMENT:
            raise ConfigError(f"not an image segmentation config (kind {self.kind!r}, expected {KIND_SEGMENT!r})")
        if not self.class_names:
            raise ConfigError("class_names must be a non-empty list of strings")
        self.class_names = tuple(self.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        return dump(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ImageSegmentConfig":
        return load(cls, data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "ImageSegmentConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


class ImageSegmentModel(nn.Module):
    """The image trunk (its render head kept, so a pre-trained image model loads into it strictly) and a
    per-voxel classifier over K classes + empty space."""

    def __init__(self, cfg: ImageSegmentConfig):
        super().__init__()
        self.cfg = cfg
        self.trunk = ImageRenderModel(cfg.trunk)
        self.classifier = nn.Conv3d(cfg.trunk.render.projection.out_channels, cfg.num_classes + 1, 1)

    def forward(self, images: Tensor, K: Tensor, w2c: Tensor, bounds: Tensor) -> tuple[Tensor, LiftedScenes]:
        """-> (logits (B, K + 1, Z, Y, X), the lifted scenes)."""
        volume, lifted = ImageRenderModel.forward(self.trunk, images, K, w2c, bounds)
        return self.classifier(volume), lifted


# ------------------------------------------------------------------------------------------ grid geometry


def grid_coordinates(cube: UnitCube, points: Tensor, grid_shape: Sequence[int], padding: float) -> Tensor:
    """(P, 3) world metres -> continuous (x, y, z) voxel indices (voxel i's centre at i; see model.images.volume)."""
    m = cube.matrix.to(points.device).float()
    unit = points.float() @ m[:3, :3].T + m[:3, 3]
    s = 1 + padding + 1e-3
    n = torch.tensor([max(g - 1, 1) for g in grid_shape], dtype=torch.float32, device=points.device)
    return (unit / s + 0.5) * n


def sample_volume(volume: Tensor, index: Tensor, grid_shape: Sequence[int]) -> Tensor:
    """Trilinear values of ``volume`` (C, Z, Y, X) at continuous voxel indices (P, 3) -> (P, C); 0 outside."""
    n = torch.tensor([max(g - 1, 1) for g in grid_shape], dtype=torch.float32, device=index.device)
    g = (2 * index / n - 1).view(1, 1, 1, -1, 3)
    out = F.grid_sample(volume[None].float(), g, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, :, 0, 0].T


def voxel_targets(points: Tensor, labels: Tensor, cube: UnitCube, grid_shape: Sequence[int], padding: float,
                  count: Tensor, num_classes: int) -> Tensor:
    """Training targets (Z·Y·X,) long: the majority label of a voxel's points; ``num_classes`` (empty) for a
    voxel some view sees and no point falls in; IGNORE for voxels no view sees or with unlabelled points only."""
    gx, gy, gz = grid_shape
    idx = torch.round(grid_coordinates(cube, points, grid_shape, padding)).long()
    inside = ((idx >= 0) & (idx < torch.tensor([gx, gy, gz], device=idx.device))).all(1)
    flat = idx[:, 2] * gy * gx + idx[:, 1] * gx + idx[:, 0]
    n_vox = gx * gy * gz
    occupied = torch.zeros(n_vox, dtype=torch.bool, device=points.device)
    occupied[flat[inside]] = True
    keep = inside & (labels >= 0) & (labels < num_classes)
    votes = torch.bincount(flat[keep] * num_classes + labels[keep].long(), minlength=n_vox * num_classes)
    votes = votes.view(n_vox, num_classes)
    target = torch.full((n_vox,), IGNORE, dtype=torch.long, device=points.device)
    target[~occupied & (count.reshape(-1) > 0)] = num_classes
    labelled = votes.sum(1) > 0
    target[labelled] = votes[labelled].argmax(1)
    return target


# ------------------------------------------------------------------------------------------ inference


@dataclass
class ImageSegmentation:
    labels: np.ndarray         # (M,) int32 per seen voxel: class index, -1 = empty space
    occupancy: np.ndarray      # (M,) float32 1 - p(empty)
    centres: np.ndarray        # (M, 3) float32 world metres
    grid_index: np.ndarray     # (M, 3) int32 (x, y, z)
    pixel_labels: np.ndarray   # (V, H, W) int32 per input pixel, -1 = its ray meets no occupied voxel
    class_names: tuple[str, ...]
    grid_shape: tuple[int, int, int]
    bounds: np.ndarray         # (2, 3) metres


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def segment_volume(model: ImageSegmentModel, views: PosedImages, bounds: np.ndarray | None = None
                   ) -> tuple[Tensor, LiftedScenes, np.ndarray]:
    """(logits (K + 1, Z, Y, X), lifted scene, bounds) after the coverage check."""
    device = _device(model)
    bounds = estimate_bounds(views.cameras) if bounds is None else np.asarray(bounds, dtype=np.float64)
    b = torch.tensor(bounds, dtype=torch.float32, device=device)
    render = model.cfg.trunk.render
    check_coverage(unit_to_world(cube_from_bounds(b), voxel_centres_unit(render.grid_shape,
                                                                         render.field.norm_padding, device)), views)
    model.eval()
    images, K, w2c = views.tensors(device)
    logits, lifted = ImageSegmentModel.forward(model, images, K, w2c, b[None])
    return logits[0], lifted, bounds


def pixel_labels(occupancy: Tensor, labels: Tensor, cube: UnitCube, cameras: Sequence[Camera],
                 grid_shape: Sequence[int], padding: float, bounds: np.ndarray, max_rays: int = 1 << 16,
                 max_samples: int = 1 << 23) -> np.ndarray:
    """(V, H, W) int32 labels of every pixel of ``cameras``: each ray is stepped (half the smallest voxel side)
    to the first point whose nearest voxel is occupied (``occupancy`` > 0.5) and takes that voxel's label
    (``labels``, -1 = empty); -1 when it meets none. Rays are marched for at most ``max_rays`` pixels per view
    (every s-th row and column, s the smallest stride that fits); the other pixels take the label of the
    nearest marched one. ``occupancy`` (Z, Y, X) float, ``labels`` (Z, Y, X) long."""
    device = occupancy.device
    gx, gy, gz = grid_shape
    occupied = (occupancy > OCCUPIED).reshape(-1)
    flat_labels = labels.reshape(-1)
    size = torch.tensor([gx, gy, gz], device=device)
    extent = np.asarray(bounds[1]) - np.asarray(bounds[0])
    step = 0.5 * float(np.min(extent / np.maximum(np.asarray(grid_shape) - 1, 1)))
    corners = np.array([[x, y, z] for x in bounds[:, 0] for y in bounds[:, 1] for z in bounds[:, 2]])
    origin_index = lambda c2w: grid_coordinates(cube, c2w[None, :3, 3], grid_shape, padding)[0]  # noqa: E731
    out = []
    for cam in cameras:
        stride = max(1, int(np.ceil(np.sqrt(cam.width * cam.height / max_rays))))
        c2w = torch.tensor(cam.c2w, dtype=torch.float32, device=device)
        us = torch.arange(0, cam.width, stride, device=device, dtype=torch.float32)
        vs = torch.arange(0, cam.height, stride, device=device, dtype=torch.float32)
        u, v = torch.meshgrid(us, vs, indexing="xy")
        dirs_cam = torch.stack([(u - cam.K[0, 2]) / cam.K[0, 0], (v - cam.K[1, 2]) / cam.K[1, 1],
                                torch.ones_like(u)], -1).reshape(-1, 3)
        dirs = dirs_cam @ c2w[:3, :3].T  # world direction per unit of camera z
        # voxel index is affine in the world point, so along a ray it is origin + t * (per-unit-z increment)
        o_idx = origin_index(c2w)
        d_idx = grid_coordinates(cube, c2w[:3, 3] + dirs, grid_shape, padding) - o_idx
        depth_far = float(np.max((corners - cam.c2w[:3, 3]) @ cam.c2w[:3, 2]))
        t = torch.arange(step, max(depth_far, step) + step, step, device=device)
        result = torch.full((dirs.shape[0],), IGNORE, dtype=torch.long, device=device)
        chunk = max(1, max_samples // len(t))
        for start in range(0, dirs.shape[0], chunk):
            vox = torch.round(o_idx + t[None, :, None] * d_idx[start:start + chunk, None, :]).long()  # (R, S, 3)
            inside = ((vox >= 0) & (vox < size)).all(-1)
            flat = (vox[..., 2] * gy + vox[..., 1]) * gx + vox[..., 0]
            hit = inside & occupied[torch.where(inside, flat, torch.zeros_like(flat))]
            rows = torch.nonzero(hit.any(1))[:, 0]
            first = hit[rows].float().argmax(1)
            result[start + rows] = flat_labels[flat[rows, first]]
        coarse = result.view(len(vs), len(us))
        if stride > 1:  # nearest marched pixel
            rows_idx = torch.clamp(torch.round(torch.arange(cam.height, device=device) / stride).long(), max=len(vs) - 1)
            cols_idx = torch.clamp(torch.round(torch.arange(cam.width, device=device) / stride).long(), max=len(us) - 1)
            coarse = coarse[rows_idx][:, cols_idx]
        out.append(coarse.cpu().numpy().astype(np.int32))
    return np.stack(out)


@torch.no_grad()
def segment_from_images(model: ImageSegmentModel, views: PosedImages, bounds: np.ndarray | None = None
                        ) -> ImageSegmentation:
    """Labels of the seen voxels and of every input pixel (see the module docstring)."""
    logits, lifted, bounds = segment_volume(model, views, bounds)
    render = model.cfg.trunk.render
    gx, gy, gz = render.grid_shape
    k = model.cfg.num_classes
    count = lifted.count[0]
    prob = torch.softmax(logits.float(), 0)
    occupancy = torch.where(count > 0, 1 - prob[k], torch.zeros_like(prob[k]))  # (Z, Y, X)
    labels = torch.where(occupancy > OCCUPIED, prob[:k].argmax(0), torch.full_like(count, IGNORE, dtype=torch.long))
    pixels = pixel_labels(occupancy, labels, lifted.cubes[0], views.cameras, render.grid_shape,
                          render.field.norm_padding, bounds)
    keep = torch.nonzero(count.reshape(-1) > 0)[:, 0]
    zi, rem = keep // (gy * gx), keep % (gy * gx)
    return ImageSegmentation(labels=labels.reshape(-1)[keep].cpu().numpy().astype(np.int32),
                             occupancy=occupancy.reshape(-1)[keep].cpu().numpy().astype(np.float32),
                             centres=lifted.centres[0][keep].cpu().numpy().astype(np.float32),
                             grid_index=torch.stack([rem % gx, rem // gx, zi], 1).cpu().numpy().astype(np.int32),
                             pixel_labels=pixels, class_names=model.cfg.class_names, grid_shape=(gx, gy, gz),
                             bounds=bounds)


@torch.no_grad()
def point_labels(model: ImageSegmentModel, views: PosedImages, points: np.ndarray, bounds: np.ndarray | None = None
                 ) -> np.ndarray:
    """(N,) int64 class of each world point (metres) from the trilinear logits of the K classes (empty space
    left out): how the image model is scored against per-point ground truth."""
    logits, lifted, _ = segment_volume(model, views, bounds)
    render = model.cfg.trunk.render
    pts = torch.as_tensor(points, dtype=torch.float32, device=logits.device)
    idx = grid_coordinates(lifted.cubes[0], pts, render.grid_shape, render.field.norm_padding)
    return sample_volume(logits[:model.cfg.num_classes], idx, render.grid_shape).argmax(1).cpu().numpy()


# ------------------------------------------------------------------------------------------ on disk


def is_image_segment_model(path: str | Path) -> bool:
    return config_kind(path) == KIND_SEGMENT


def load_image_segment_model(path: str | Path, device: str | torch.device = "cpu") -> ImageSegmentModel:
    """Strict load of an image segmentation folder (``model.safetensors`` + ``config.json``), in eval mode."""
    return load_model_folder(path, KIND_SEGMENT, "image segmentation model",
                             lambda cfg: ImageSegmentModel(ImageSegmentConfig.load(cfg)), device)


def segment_config_from(trunk: ImageModelConfig, class_names: Sequence[str], name: str | None = None
                        ) -> ImageSegmentConfig:
    return ImageSegmentConfig(trunk=dataclasses.replace(trunk), class_names=tuple(class_names),
                              name=name or f"{trunk.name}-segment")
