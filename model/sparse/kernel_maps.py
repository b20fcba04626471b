"""Kernel maps of the SpUNet: every sparse conv as a neighbour table over an appended zero row.

This is the single implementation shared by the PyTorch gather path, the ONNX / TensorRT / Triton
exports and the gateway's preprocessing. Every conv type becomes the same op,
``out[r] = sum_k pad(feat)[table[r, k]] @ W[k]``, where ``pad(feat)`` is ``feat`` with one zero row
appended, so index ``M`` (the number of input rows) means "no neighbour".

Levels: level 0 holds the input sites in input order; level l+1 holds the distinct
``(batch, floor(p / 2))`` of level l, sorted by their linear key (batch-major, then x, y, z), which is
deterministic and independent of the input row order.

Tap order, the same for every table: for a kernel of size K with centre c = K // 2, column
``f = i*K*K + j*K + k`` holds the neighbour at offset ``(i-c, j-c, k-c)`` (submanifold), and for the
k2s2 maps ``f = 4*tx + 2*ty + tz`` with ``t = p mod 2`` of the fine site. This is the flat order of a
spconv weight ``(C_out, kx, ky, kz, C_in)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_MAX_KEY = 2**62


class KernelMapError(ValueError):
    """The voxel coordinates cannot be turned into kernel maps (shape, dtype, range or duplicates)."""


@dataclass
class KernelMaps:
    """Neighbour tables of every UNet level (int64 torch tensors).

    num_sites: M_l per level, level 0 = input rows.
    coords:    per level (M_l, 4) int64 ``(batch, x, y, z)`` of the sites (row order of that level).
    stem:      (M_0, stem_kernel³) submanifold table of the stem at level 0, or None.
    subm:      per level (M_l, 27) submanifold k=3 tables; missing neighbour = M_l.
    down:      per transition l→l+1, (M_{l+1}, 8): fine row of each tap, or M_l when absent.
    up:        per transition l→l+1, (M_l, 8): parent coarse row at column tap(p), M_{l+1} elsewhere.
    """

    num_sites: list[int]
    coords: list[torch.Tensor]
    stem: torch.Tensor | None
    subm: list[torch.Tensor]
    down: list[torch.Tensor]
    up: list[torch.Tensor]

    @property
    def num_levels(self) -> int:
        return len(self.subm)

    def to(self, device: torch.device | str) -> "KernelMaps":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return KernelMaps(
            num_sites=list(self.num_sites),
            coords=[move(t) for t in self.coords],
            stem=move(self.stem),
            subm=[move(t) for t in self.subm],
            down=[move(t) for t in self.down],
            up=[move(t) for t in self.up],
        )

    def tables(self) -> list[torch.Tensor]:
        """The tables in the order the exported graphs take them (see `table_names`)."""
        out = [] if self.stem is None else [self.stem]
        return out + list(self.subm) + list(self.down) + list(self.up)

    def table_names(self) -> list[str]:
        return table_names(self.num_levels, with_stem=self.stem is not None)

    def onnx_inputs(self) -> dict[str, np.ndarray]:
        """Name → int64 numpy array for every table, ready to feed an ONNX / Triton model."""
        return {n: t.detach().cpu().numpy() for n, t in zip(self.table_names(), self.tables())}


def table_names(num_levels: int, with_stem: bool = True) -> list[str]:
    """Input names of the tables, in `KernelMaps.tables` order."""
    names = ["stem_nbr"] if with_stem else []
    names += [f"subm{l}_nbr" for l in range(num_levels)]
    names += [f"down{l}_map" for l in range(num_levels - 1)]
    names += [f"up{l}_map" for l in range(num_levels - 1)]
    return names


def build_kernel_maps(
    grid_coord: np.ndarray | torch.Tensor,
    batch: np.ndarray | torch.Tensor | None = None,
    num_levels: int = 5,
    stem_kernel: int | None = 5,
    subm_kernel: int = 3,
) -> KernelMaps:
    """Kernel maps of a batch of voxelised scenes.

    grid_coord: (M, 3) non-negative integer voxel coordinates (x, y, z), unique per scene.
    batch:      (M,) scene index of each row (None = one scene). Scenes are never neighbours.
    num_levels: UNet levels (SpUNet: 4 stages → 5 levels).
    stem_kernel: kernel size of the level-0 stem submanifold conv (SpUNet: 5), or None for none.
    """
    coord, bidx = _validate(grid_coord, batch)
    if num_levels < 1:
        raise KernelMapError(f"num_levels must be >= 1, got {num_levels}")
    for name, k in (("subm_kernel", subm_kernel), ("stem_kernel", stem_kernel)):
        if k is not None and (k < 1 or k % 2 == 0):
            raise KernelMapError(f"{name} must be a positive odd integer, got {k}")

    coords = [np.concatenate([bidx[:, None], coord], axis=1)]  # (M_0, 4) b, x, y, z
    down: list[np.ndarray] = []
    up: list[np.ndarray] = []
    for _ in range(num_levels - 1):
        coarse, down_map, up_map = _downsample(coords[-1])
        coords.append(coarse)
        down.append(down_map)
        up.append(up_map)

    stem = None
    subm = []
    for level, c in enumerate(coords):
        if level == 0 and stem_kernel is not None and stem_kernel >= subm_kernel:
            stem = _subm_table(c, stem_kernel)
            subm.append(_crop_kernel(stem, stem_kernel, subm_kernel))
        else:
            subm.append(_subm_table(c, subm_kernel))
    if stem is None and stem_kernel is not None:
        stem = _subm_table(coords[0], stem_kernel)

    t = torch.from_numpy
    return KernelMaps(
        num_sites=[len(c) for c in coords],
        coords=[t(c) for c in coords],
        stem=None if stem is None else t(stem),
        subm=[t(s) for s in subm],
        down=[t(d) for d in down],
        up=[t(u) for u in up],
    )


def _validate(grid_coord, batch) -> tuple[np.ndarray, np.ndarray]:
    coord = grid_coord.detach().cpu().numpy() if isinstance(grid_coord, torch.Tensor) else np.asarray(grid_coord)
    if coord.ndim != 2 or coord.shape[1] != 3:
        raise KernelMapError(f"grid_coord must have shape (M, 3), got {coord.shape}")
    if not np.issubdtype(coord.dtype, np.integer):
        raise KernelMapError(f"grid_coord must be an integer array, got dtype {coord.dtype}")
    m = len(coord)
    if m == 0:
        raise KernelMapError("grid_coord has no rows")
    if batch is None:
        bidx = np.zeros(m, dtype=np.int64)
    else:
        bidx = batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
        if bidx.shape != (m,):
            raise KernelMapError(f"batch must have shape ({m},), got {bidx.shape}")
        if not np.issubdtype(bidx.dtype, np.integer):
            raise KernelMapError(f"batch must be an integer array, got dtype {bidx.dtype}")
        if bidx.min() < 0:
            raise KernelMapError("batch indices must be non-negative")
    if coord.min() < 0:
        raise KernelMapError(f"grid_coord must be non-negative (min {int(coord.min())})")
    return coord.astype(np.int64, copy=False), bidx.astype(np.int64, copy=False)


def _packing(c: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear keys of (b, x, y, z) rows with `pad` free cells on each side of every spatial axis, so
    that key(p + d) = key(p) + delta(d) for |d| <= pad without wrapping into another row or scene.
    Returns (keys (M,), strides (4,))."""
    extent = c.max(axis=0) + 1
    size = np.array([extent[0], *(extent[1:] + 2 * pad)], dtype=np.int64)
    if float(np.prod(size.astype(np.float64))) >= _MAX_KEY:
        raise KernelMapError(f"coordinate extent {extent[1:].tolist()} x {extent[0]} scenes is too large")
    strides = np.array([size[1] * size[2] * size[3], size[2] * size[3], size[3], 1], dtype=np.int64)
    shifted = c + np.array([0, pad, pad, pad], dtype=np.int64)
    return shifted @ strides, strides


def _sorted_keys(c: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted keys, permutation with keys[perm] sorted, strides); rejects duplicate sites."""
    keys, strides = _packing(c, pad)
    perm = np.argsort(keys, kind="stable")
    sk = keys[perm]
    dup = np.flatnonzero(sk[1:] == sk[:-1])
    if len(dup):
        row = c[perm[dup[0]]]
        raise KernelMapError(
            f"{len(dup)} duplicate voxel(s): (batch, x, y, z) = {row.tolist()} appears more than once; "
            "voxelise the cloud first (one row per voxel)"
        )
    return sk, perm, strides


def _subm_table(c: np.ndarray, kernel: int) -> np.ndarray:
    """(M, kernel³) submanifold neighbour table, missing = M.

    Each pair is looked up once: if q = p + d then p = q - d, so only half of the offsets are searched
    and the opposite tap (K³ - 1 - f) is filled from the same hits."""
    m = len(c)
    r = kernel // 2
    sk, perm, strides = _sorted_keys(c, r)
    vol = kernel**3
    table = np.full((m, vol), m, dtype=np.int64)
    table[:, vol // 2] = np.arange(m)
    for f in range(vol // 2):
        i, j, k = f // (kernel * kernel), (f // kernel) % kernel, f % kernel
        delta = (i - r) * strides[1] + (j - r) * strides[2] + (k - r) * strides[3]
        pos = np.searchsorted(sk, sk + delta)  # sorted needles: cache-friendly
        np.minimum(pos, m - 1, out=pos)
        hit = np.flatnonzero(sk[pos] == sk + delta)
        if len(hit) == 0:
            continue
        p = perm[hit]
        q = perm[pos[hit]]
        table[p, f] = q
        table[q, vol - 1 - f] = p
    return table


def _crop_kernel(table: np.ndarray, big: int, small: int) -> np.ndarray:
    """Columns of a centred `small`³ kernel taken out of a `big`³ table (same sites, same centre)."""
    o = (big - small) // 2
    cube = table.reshape(len(table), big, big, big)[:, o : o + small, o : o + small, o : o + small]
    return np.ascontiguousarray(cube).reshape(len(table), small**3)


def _downsample(fine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coarse sites of a k2s2 conv and its down / up tables.

    fine: (M_f, 4) (b, x, y, z). Returns coarse (M_c, 4) sorted by key, down (M_c, 8), up (M_f, 8)."""
    m_f = len(fine)
    half = fine.copy()
    half[:, 1:] //= 2
    keys, _ = _packing(half, 0)
    uniq, first, parent = np.unique(keys, return_index=True, return_inverse=True)
    coarse = half[first]
    m_c = len(uniq)
    odd = fine[:, 1:] & 1
    tap = 4 * odd[:, 0] + 2 * odd[:, 1] + odd[:, 2]
    down = np.full((m_c, 8), m_f, dtype=np.int64)
    down[parent, tap] = np.arange(m_f)
    up = np.full((m_f, 8), m_c, dtype=np.int64)
    up[np.arange(m_f), tap] = parent
    return coarse, down, up


__all__ = ["KernelMapError", "KernelMaps", "build_kernel_maps", "table_names"]
