"""A decoded cloud → what the model eats: the one place every caller (CLI, service, slim gateway, TTA, novel
views, training evaluation) turns a ``PointCloud`` into network input. Imports no torch (the gateway
voxelises without it; tests/test_prepare.py checks).

Steps, in order:

1. **invalid points** (``invalid``): rows with NaN/inf coordinates or normals (the holes of organised
   Kinect/stereo PCDs) are dropped with an :class:`InvalidPointsWarning` (``"drop"``, the default), or refused
   with the readers' message (``"error"``). The kept rows are remembered (``PreparedCloud.valid``), so
   per-point outputs are returned at the input's length and order (``model.results``).
2. **up axis** (``up``): the cloud (and its normals) is rotated into the model's frame, z up, by
   ``model.pointcloud.gravity.up_rotation`` (a named axis, or ``auto`` estimated from the scan).
   ``z`` leaves the coordinates untouched (bit-exact with the official pipeline).
3. **completion**: missing colours/normals are filled (``model.pointcloud.voxelize.complete_cloud``).
4. **voxelisation** (``model.pointcloud.voxelize.voxelize``, or ``fragments`` for the official test-time
   augmentation): CenterShift → GridSample → features.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import numpy as np

from model.pointcloud.cloud import PointCloud, PointCloudError
from model.pointcloud.gravity import UP_AXES, up_rotation
from model.pointcloud.voxelize import (VoxelizedCloud, assemble_features, center_shift, complete_cloud,
                                       grid_fragments, voxelize)

INVALID_MODES: tuple[str, ...] = ("drop", "error")
Invalid = Literal["drop", "error"]


class InvalidPointsWarning(UserWarning):
    """Points with NaN/inf coordinates or normals were left out of the model's input."""


@dataclass(frozen=True)
class InputOptions:
    """How to read a cloud's frame and bad rows. ``up``: the input's up axis (see model.pointcloud.gravity);
    ``invalid``: ``drop`` NaN/inf points (warning) or refuse the cloud (``error``, the old behaviour)."""

    up: str = "z"
    invalid: str = "drop"

    def __post_init__(self) -> None:
        if self.up not in UP_AXES:
            raise ValueError(f"unknown up axis {self.up!r}; choose one of {', '.join(UP_AXES)}")
        if self.invalid not in INVALID_MODES:
            raise ValueError(f"invalid must be one of {', '.join(INVALID_MODES)}, got {self.invalid!r}")


@dataclass
class PreparedCloud:
    """The model-frame cloud and how it maps back to the input.

    cloud:      the valid rows, rotated into z-up, colours/normals filled.
    valid:      (N_input,) bool, the rows kept; None when every row was kept.
    num_input:  rows of the input (per-point outputs have this length).
    rotation:   3x3 float64 R with ``coord_model = coord_input @ R.T``; None for the identity (up=z).
    grid_shape: (height, width) of an organised input (e.g. a 640x480 PCD), else None.
    filled:     input fields the model needed that the source lacked ("color", "normal").
    """

    cloud: PointCloud
    valid: np.ndarray | None
    num_input: int
    rotation: np.ndarray | None = None
    grid_shape: tuple[int, int] | None = None
    filled: tuple[str, ...] = ()

    @property
    def dropped(self) -> int:
        return 0 if self.valid is None else int(self.num_input - self.valid.sum())

    def to_input_frame(self, points: np.ndarray) -> np.ndarray:
        """Model-frame (.., 3) points (e.g. box corners) back into the input's frame (float64)."""
        points = np.asarray(points, dtype=np.float64)
        return points if self.rotation is None else points @ self.rotation


def invalid_rows(cloud: PointCloud) -> np.ndarray:
    """(N,) bool: rows whose coordinates (or normals) are NaN or infinite."""
    bad = ~np.isfinite(cloud.coord).all(axis=1)
    if cloud.normal is not None:
        bad |= ~np.isfinite(cloud.normal).all(axis=1)
    return bad


def drop_invalid(cloud: PointCloud, invalid: str = "drop") -> tuple[PointCloud, np.ndarray | None]:
    """(the cloud's valid rows, the kept mask or None when all are valid). ``invalid="error"`` refuses a cloud
    with any bad row, with the readers' message (``PointCloud.validate``)."""
    if invalid == "error":
        return cloud.validate(), None
    bad = invalid_rows(cloud)
    if not bad.any():
        return cloud, None
    if bad.all():
        raise PointCloudError(f"{cloud.source}: all {len(cloud)} points have NaN or infinite coordinates")
    keep = ~bad
    warnings.warn(f"{cloud.source}: dropped {int(bad.sum())} of {len(cloud)} points with NaN or infinite "
                  "coordinates or normals (their outputs are NaN / label -1)", InvalidPointsWarning, stacklevel=3)
    kept = PointCloud(coord=cloud.coord[keep], color=None if cloud.color is None else cloud.color[keep],
                      normal=None if cloud.normal is None else cloud.normal[keep],
                      extras={k: v[keep] for k, v in cloud.extras.items()}, source=cloud.source,
                      origin=cloud.origin)
    return kept, keep


def rotate(cloud: PointCloud, rotation: np.ndarray) -> PointCloud:
    """The cloud in the rotated frame (coordinates, normals and the georeference origin)."""
    coord = (cloud.coord.astype(np.float64) @ rotation.T).astype(np.float32)
    normal = None if cloud.normal is None else (cloud.normal.astype(np.float64) @ rotation.T).astype(np.float32)
    return PointCloud(coord=coord, color=cloud.color, normal=normal, extras=dict(cloud.extras), source=cloud.source,
                      origin=rotation @ np.asarray(cloud.origin, dtype=np.float64))


def prepare_cloud(cloud: PointCloud, grid_size: float, feature_keys: tuple[str, ...],
                  options: InputOptions | None = None) -> PreparedCloud:
    """Steps 1-3 of the module text: valid rows, z-up frame, filled fields."""
    options = options or InputOptions()
    num_input, grid_shape = len(cloud), cloud.grid_shape
    if num_input == 0:
        raise PointCloudError(f"{cloud.source}: the point cloud has no points")
    kept, valid = drop_invalid(cloud, options.invalid)
    rotation = None
    if options.up != "z":
        rotation = up_rotation(options.up, kept.coord, kept.normal)
        kept = rotate(kept, rotation)
    filled = tuple(name for name in ("color", "normal") if name in feature_keys and getattr(kept, name) is None)
    completed = complete_cloud(kept, grid_size, feature_keys)
    completed.origin = kept.origin  # fill_missing keeps it; explicit for clouds built elsewhere
    return PreparedCloud(cloud=completed, valid=valid, num_input=num_input, rotation=rotation,
                         grid_shape=grid_shape, filled=filled)


def voxelize_prepared(prepared: PreparedCloud, grid_size: float, feature_keys: tuple[str, ...],
                      rng: np.random.Generator | None = None) -> VoxelizedCloud:
    """Step 4: the network input of a prepared cloud (its ``point_to_voxel`` covers the valid rows)."""
    return voxelize(prepared.cloud, grid_size, feature_keys, rng)


def prepare(cloud: PointCloud, grid_size: float, feature_keys: tuple[str, ...],
            options: InputOptions | None = None) -> tuple[PreparedCloud, VoxelizedCloud]:
    """All four steps: (the prepared cloud, its network input)."""
    prepared = prepare_cloud(cloud, grid_size, feature_keys, options)
    return prepared, voxelize_prepared(prepared, grid_size, feature_keys)


PointTransform = Callable[[np.ndarray, "np.ndarray | None"], "tuple[np.ndarray, np.ndarray | None]"]


def fragments(cloud: PointCloud, grid_size: float, feature_keys: tuple[str, ...],
              transforms: tuple[PointTransform, ...]) -> Iterator[tuple[np.ndarray, VoxelizedCloud]]:
    """The official test mode (spec §8) of a prepared cloud: for each transform of the centre-shifted scene
    (coord, normal) → (coord, normal), every GridSample test fragment as (point index (M,), network input)."""
    cloud = complete_cloud(cloud, grid_size, feature_keys)
    coord, _ = center_shift(cloud.coord, apply_z=True)
    for transform in transforms:
        aug_coord, aug_normal = transform(coord, cloud.normal)
        for kept, grid in grid_fragments(aug_coord, grid_size):
            kept_coord, _ = center_shift(aug_coord[kept], apply_z=False)
            color = cloud.color[kept] if cloud.color is not None else None
            normal = aug_normal[kept] if aug_normal is not None else None
            feat = assemble_features(color, normal, kept_coord, feature_keys)
            yield kept, VoxelizedCloud(grid, feat, np.arange(len(kept)), kept_coord, kept, grid_size)  # 1 point/voxel
