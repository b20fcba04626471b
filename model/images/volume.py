"""Where the lifted voxels sit: the scene box is fitted into the unit cube with ``model.render.to_unit_cube``
(as the point-cloud model fits its points), and voxel (i, j, k) of a (X, Y, Z) grid sits exactly where the SDF
field reads it (``normalize_3d_coordinate`` + align_corners=True sampling): unit-cube coordinate
``(i / (N - 1) - 0.5) · (1 + padding + 1e-3)`` per axis. So the renderer sees each lifted feature at the point
whose pixels it came from.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.render.unit_cube import UnitCube, to_unit_cube


def cube_from_bounds(bounds: Tensor) -> UnitCube:
    """bounds (2, 3) [min, max] in world metres -> the unit-cube similarity of that box (floor at z = -0.5)."""
    lo, hi = bounds[0].float(), bounds[1].float()
    corners = torch.stack([torch.stack([x, y, z]) for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                           for z in (lo[2], hi[2])])
    return to_unit_cube(corners).cube


def voxel_centres_unit(grid_shape: tuple[int, int, int], padding: float, device=None) -> Tensor:
    """(Z·Y·X, 3) unit-cube (x, y, z) of every voxel, flattened in (Z, Y, X) order (x fastest)."""
    axes = [(torch.arange(n, dtype=torch.float32, device=device) / max(n - 1, 1) - 0.5) * (1 + padding + 1e-3)
            for n in grid_shape]
    z, y, x = torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    return torch.stack([x, y, z], -1).reshape(-1, 3)


def unit_to_world(cube: UnitCube, points: Tensor) -> Tensor:
    """(P, 3) unit-cube points -> world metres (the inverse similarity)."""
    inv = torch.linalg.inv(cube.matrix.double()).to(points.device)
    return (points.double() @ inv[:3, :3].T + inv[:3, 3]).float()
