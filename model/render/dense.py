"""Sparse backbone features -> dense (B, C, Z, Y, X) volume (spec §5.5, §5.6).

Mean pooling follows torch_scatter's ``scatter(..., reduce="mean", out=zeros)``: the per-cell sum
divided by max(count, 1), so empty cells stay 0.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def grid_resolution(bbox: Tensor, grid_size: float) -> tuple[Tensor, Tensor]:
    """The original's ``grid_sample`` method: bbox (B, 2, 3) metric -> voxel bbox (int32) and resolution (B,)
    = the longest voxel extent + 1."""
    bbox_grid = (bbox // grid_size).int()
    resolution = (bbox_grid[:, 1] - bbox_grid[:, 0]).max(dim=1)[0].int() + 1
    return bbox_grid, resolution


def _scatter_mean(feat: Tensor, index: Tensor, cells: int, dtype: torch.dtype) -> Tensor:
    """(cells, C): mean of the rows of ``feat`` that share an index; rows of empty cells are 0."""
    total = torch.zeros((cells, feat.shape[1]), dtype=dtype, device=feat.device)
    total.index_add_(0, index, feat.to(dtype))
    count = torch.bincount(index, minlength=cells).clamp_(min=1).to(dtype)
    return total / count[:, None]


def to_dense(coord: Tensor, feat: Tensor, offsets: Sequence[int] | Tensor, resolution: Tensor,
             grid_shape: tuple[int, int, int], grid_size: float) -> Tensor:
    """Pool per-point features into each scene's grid.

    coord: (N, 3) the "to grid resolution" metric coordinates of ``to_unit_cube``; feat: (N, C);
    offsets: cumulative point counts per scene (B,); resolution: (B,) from ``grid_resolution``;
    grid_shape: (X, Y, Z) cells. Returns (B, C, Z, Y, X), contiguous.

    R = resolution + 1 voxels of ``grid_size`` span each axis. When R >= min(grid_shape) (the normal case)
    cells are ``floor(voxel / (R / G))`` per axis (the same R on all three axes) and features are averaged.
    Otherwise the R³ voxel grid is averaged and resized with trilinear interpolation (align_corners=False).
    (The original's third, "pool then resize" branch can never run and is not reproduced.)
    """
    if coord.shape[0] != feat.shape[0]:
        raise ValueError(f"{coord.shape[0]} coordinates for {feat.shape[0]} feature rows")
    offsets = [int(o) for o in offsets]
    gx, gy, gz = grid_shape
    cells = gx * gy * gz
    c_dim = feat.shape[1]
    grids = torch.zeros((len(offsets), cells, c_dim), device=feat.device, dtype=feat.dtype)
    start = 0
    for i, end in enumerate(offsets):
        voxel = (coord[start:end] // grid_size).int()
        f = feat[start:end]
        r = int(resolution[i] + 1)
        if r >= min(grid_shape):
            cell = (voxel // (r / torch.tensor(grid_shape, dtype=torch.float32, device=voxel.device))).long()
            flat = cell[:, 0] * gy * gz + cell[:, 1] * gz + cell[:, 2]
            grids[i] = _scatter_mean(f, flat, cells, feat.dtype)
        else:
            flat = (voxel[:, 0] * r**2 + voxel[:, 1] * r + voxel[:, 2]).long()
            dense = _scatter_mean(f, flat, r**3, torch.float32).view(1, r, r, r, c_dim).permute(0, 4, 3, 2, 1)
            resized = F.interpolate(dense, size=(gz, gy, gx), mode="trilinear")  # (1, C, Z, Y, X)
            grids[i] = resized.permute(0, 4, 3, 2, 1).contiguous().view(cells, c_dim).to(feat.dtype)
        start = end
    return grids.view(len(offsets), gx, gy, gz, c_dim).permute(0, 4, 3, 2, 1).contiguous()

