"""What the first step of a ponder Triton ensemble checks in a request before any table is built.

The kernel-map step (every kind but python-torch) and the python-torch encoder (which builds its own tables)
both take the gateway's tensors straight from a client. ``build_kernel_maps`` refuses bad coordinates
(`KernelMapError`); this refuses the rest: ``feat`` rows that do not match the voxels (a table built for other
rows would silently read the wrong ones) and a condition index out of range. Both are client errors
(INVALID_ARG), never a server fault.
"""

from __future__ import annotations

import numpy as np


def check_scene_request(grid_coord: np.ndarray, feat: np.ndarray, condition: np.ndarray | None,
                        in_channels: int, num_conditions: int) -> int | None:
    """ValueError naming the problem; else the condition index (None for unconditioned models)."""
    if feat.shape != (len(grid_coord), in_channels):
        raise ValueError(f"feat must have shape ({len(grid_coord)}, {in_channels}) for {len(grid_coord)} voxels, "
                         f"got {tuple(feat.shape)}")
    if not num_conditions:
        return None
    if condition is None or condition.size != 1:
        raise ValueError(f"condition must hold one index in [0, {num_conditions}), got "
                         f"{'none' if condition is None else condition.size}")
    index = int(condition.reshape(-1)[0])
    if not 0 <= index < num_conditions:
        raise ValueError(f"condition index {index} out of range [0, {num_conditions})")
    return index
