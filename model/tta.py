"""The official precise segmentation mode (SemSegTester, spec §8): 13 test-time augmentations, each split
into GridSample test-mode fragments that cover every point, softmax probabilities summed per point.

Augmentations act on the centre-shifted scene about the origin: z-rotations by 0, π/2, π, 3π/2; the same
with scale 0.95; the same with scale 1.05; and one flip of both x and y.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.cancel import CancelToken, current
from model.pointcloud.cloud import PointCloud
from model.pointcloud.voxelize import VoxelizedCloud
from model.prepare import fragments
from model.sparse.kernel_maps import batch_fits


@dataclass(frozen=True)
class Augmentation:
    angle: float = 0.0      # rotation about +z, in units of π
    scale: float = 1.0
    flip: bool = False      # negate x and y (and the normals' x and y)

    def apply(self, coord: np.ndarray, normal: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        c, s = np.cos(self.angle * np.pi), np.sin(self.angle * np.pi)
        rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float32)
        coord = coord @ rot.T
        normal = normal @ rot.T if normal is not None else None
        coord = coord * np.float32(self.scale)
        if self.flip:
            sign = np.array([-1, -1, 1], dtype=np.float32)
            coord = coord * sign
            normal = normal * sign if normal is not None else None
        return coord.astype(np.float32), normal.astype(np.float32) if normal is not None else None


ROTATIONS = (0.0, 0.5, 1.0, 1.5)
OFFICIAL_AUGMENTATIONS = (tuple(Augmentation(a) for a in ROTATIONS)
                          + tuple(Augmentation(a, 0.95) for a in ROTATIONS)
                          + tuple(Augmentation(a, 1.05) for a in ROTATIONS)
                          + (Augmentation(flip=True),))


CANCELLABLE_BATCH_VOXELS = 50_000  # voxels per forward pass under a cancel token (~2 s on one CPU core)


def fragment_inputs(cloud: PointCloud, grid_size: float, feature_keys: tuple[str, ...],
                    augmentations: tuple[Augmentation, ...] = OFFICIAL_AUGMENTATIONS):
    """Yield (point index (M,), VoxelizedCloud) for every augmentation × fragment (model.prepare.fragments)."""
    yield from fragments(cloud, grid_size, feature_keys, tuple(aug.apply for aug in augmentations))


def _extent(voxels: VoxelizedCloud) -> tuple[int, int, int]:
    return tuple(int(e) + 1 for e in voxels.grid_coord.max(axis=0)) if len(voxels.grid_coord) else (1, 1, 1)


def precise_probabilities(predictor, cloud: PointCloud, condition: str | None, grid_size: float | None = None,
                          augmentations: tuple[Augmentation, ...] = OFFICIAL_AUGMENTATIONS,
                          max_batch_voxels: int = 300_000, cancel: CancelToken | None = None) -> np.ndarray:
    """(N, K) summed softmax probabilities over all augmentations and fragments (argmax = prediction).
    ``cancel`` (default: the token active in this context, see model.cancel) is checked before every fragment
    and every forward pass, so a cancelled or late request stops within one batch."""
    grid_size = grid_size or predictor.config.grid_size
    token = cancel or current()
    check = token.check if token is not None else (lambda: None)
    if token is not None:  # smaller forward passes, so a cancelled request waits for at most one of them
        max_batch_voxels = min(max_batch_voxels, CANCELLABLE_BATCH_VOXELS)
    total = None
    batch: list[tuple[np.ndarray, VoxelizedCloud]] = []

    def flush() -> None:
        nonlocal total
        check()
        features = predictor.encode([v for _, v in batch], condition)
        for (kept, _), logits in zip(batch, predictor.classify(features, condition)):
            probs = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
            if total is None:
                total = np.zeros((len(cloud), probs.shape[1]), dtype=np.float64)
            total[kept] += probs  # kept is unique within a fragment
        batch.clear()

    check()
    for kept, voxels in fragment_inputs(cloud, grid_size, predictor.config.input_features, augmentations):
        check()
        if batch and (sum(v.num_voxels for _, v in batch) + voxels.num_voxels > max_batch_voxels
                      or not batch_fits([_extent(v) for _, v in batch] + [_extent(voxels)])):
            flush()
        batch.append((kept, voxels))
    if batch:
        flush()
    return total.astype(np.float32)
