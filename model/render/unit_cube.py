"""``to_unit_cube`` (spec §5.4): fit a scene into the unit cube and move its cameras with it.

The float32 operations follow the original one for one (same torch ops, same order), so the results are
bit-identical to it: the dense volume and every ray depend on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

Z_LEVEL = -0.5  # the floor of every scene sits at z = -0.5
_EPS = 1e-5


@dataclass(frozen=True)
class UnitCube:
    """The similarity S = T(0, 0, z_level - z0) · scale · T(-loc) from scene metres to the unit cube.

    matrix: (4, 4) float32 S. scale: () float32, 1/extent. extent: () float32, the scene's longest side
    (the original's ``pc_scale``). Unit-cube distances are metric distances times ``scale``.
    """

    matrix: Tensor
    scale: Tensor
    extent: Tensor

    def transform_extrinsics(self, w2c: Tensor) -> Tensor:
        """World-to-camera (V, 4, 4) in scene metres -> in unit-cube world units: ``E · S⁻¹``.

        Camera coordinates stay metric; only the world side changes (element [3, 3] is forced to 1).
        """
        pose = torch.zeros((w2c.shape[0], 4, 4), device=w2c.device)
        pose[:, :, :] = w2c
        pose[:, 3, 3] = 1
        inv = torch.linalg.inv(self.matrix.float())
        return torch.stack([torch.mm(pose[v], inv) for v in range(pose.shape[0])])

    def world_to_unit(self, pre_shift: np.ndarray | None = None) -> np.ndarray:
        """S as float64, optionally composed with ``p -> p - pre_shift`` (e.g. the data pipeline's CenterShifts)
        so that it applies to the scene's original frame."""
        s = self.matrix.detach().cpu().double().numpy()
        if pre_shift is not None:
            t = np.eye(4)
            t[:3, 3] = -np.asarray(pre_shift, dtype=np.float64)
            s = s @ t
        return s


@dataclass(frozen=True)
class UnitCubeScene:
    """The results of ``to_unit_cube`` for one scene.

    points: (N, 3) unit-cube coordinates clipped to ±(0.5 - 1e-5).
    coord:  (N, 3) ``(points + 0.5) · extent``, metric and starting near 0 ("to grid resolution"); only
            ``to_dense`` uses it.
    bbox:   (2, 3) ``[min(points) - 1e-5, max(points) + 1e-5]`` mapped the same way as ``coord``.
    """

    cube: UnitCube
    points: Tensor
    coord: Tensor
    bbox: Tensor


@torch.no_grad()
def to_unit_cube(coord: Tensor, z_level: float = Z_LEVEL) -> UnitCubeScene:
    """Fit one scene's points (N, 3), float32 metres after the data pipeline, into the unit cube."""
    if coord.dim() != 2 or coord.shape[1] != 3 or coord.shape[0] == 0:
        raise ValueError(f"coord must be a non-empty (N, 3) array, got shape {tuple(coord.shape)}")
    coords = coord.float()
    device = coords.device
    bbox = torch.stack([coords.min(dim=0).values - _EPS, coords.max(dim=0).values + _EPS])
    loc = (bbox[0] + bbox[1]) / 2
    scale = 1.0 / (bbox[1] - bbox[0]).max()
    z_min = ((coords - loc.reshape(-1, 3)) * scale)[:, 2].min()
    s_loc = torch.eye(4, device=device)
    s_loc[:-1, -1] = -loc
    s_scale = torch.eye(4, device=device) * scale
    s_scale[-1, -1] = 1
    s_loc2 = torch.eye(4, device=device)
    s_loc2[2, -1] = -z_min + z_level
    s = s_loc2 @ s_scale @ s_loc
    homo = torch.column_stack((coords, torch.ones(coords.shape[0], device=device)))
    points = torch.clip(torch.mm(s, homo.T).T[:, :3], min=-0.5 + _EPS, max=0.5 - _EPS).float()
    extent = (bbox[1] - bbox[0]).max()
    unit_bbox = torch.stack([points.min(dim=0).values - _EPS, points.max(dim=0).values + _EPS])
    return UnitCubeScene(cube=UnitCube(matrix=s, scale=scale, extent=extent), points=points,
                         coord=(points + 0.5) * extent, bbox=(unit_bbox + 0.5) * extent)
