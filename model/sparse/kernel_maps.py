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

Everything runs in torch on the input's device (numpy input: CPU), with no host sync inside loops.
Tables are int32 (so at most ``MAX_ROWS`` rows per level); ``coords`` are int64. Neighbour lookups go
through a dense int32 grid over each level's padded bounding box (`_grid_tables`: one strided-window
gather per row) when it fits the memory budget, and through sorted keys + ``torch.searchsorted``
otherwise (`_sorted_table`); both give the same tables. The stem's 5³ lookups at level 0 dominate; on
the 2-core CPU the grid path is several times faster than the sorted one (bench/kernel_maps.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MAX_ROWS = 2**31 - 2  # int32 tables: row ids and the "missing" id M must fit
DEFAULT_GRID_BUDGET = 256 * 2**20  # bytes a dense grid may take regardless of the table sizes
_MAX_KEY = 2**62
_CHUNK_ENTRIES = {"cpu": 2**21, "cuda": 2**24}  # lookups per gather (fewer, larger ones hold up better on a loaded CPU)


class KernelMapError(ValueError):
    """The voxel coordinates cannot be turned into kernel maps (shape, dtype, range or duplicates)."""


@dataclass
class KernelMaps:
    """Neighbour tables of every UNet level (int32 torch tensors on the input's device).

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
        """Name → int32 numpy array for every table, ready to feed an ONNX / Triton model."""
        return {n: t.detach().cpu().numpy().astype(np.int32, copy=False)
                for n, t in zip(self.table_names(), self.tables())}


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
    *,
    grid_budget: int | None = None,
) -> KernelMaps:
    """Kernel maps of a batch of voxelised scenes, computed on ``grid_coord``'s device.

    grid_coord: (M, 3) non-negative integer voxel coordinates (x, y, z), unique per scene.
    batch:      (M,) scene index of each row (None = one scene). Scenes are never neighbours.
    num_levels: UNet levels (SpUNet: 4 stages → 5 levels).
    stem_kernel: kernel size of the level-0 stem submanifold conv (SpUNet: 5), or None for none.
    grid_budget: bytes a level's dense lookup grid may take (None: the larger of `DEFAULT_GRID_BUDGET`
        and the bytes of the tables it builds, so peak memory stays within ~2x the output); beyond it
        the sorted-key lookup is used. 0 forces the sorted lookup.
    """
    if num_levels < 1:
        raise KernelMapError(f"num_levels must be >= 1, got {num_levels}")
    for name, k in (("subm_kernel", subm_kernel), ("stem_kernel", stem_kernel)):
        if k is not None and (k < 1 or k % 2 == 0):
            raise KernelMapError(f"{name} must be a positive odd integer, got {k}")
    coords = [_validate(grid_coord, batch)]  # (M_0, 4) int64 b, x, y, z

    down: list[torch.Tensor] = []
    up: list[torch.Tensor] = []
    for _ in range(num_levels - 1):
        coarse, down_map, up_map = _downsample(coords[-1])
        coords.append(coarse)
        down.append(down_map)
        up.append(up_map)

    stem = None
    subm = []
    for level, c in enumerate(coords):
        if level == 0 and stem_kernel is not None:
            if stem_kernel >= subm_kernel:
                stem, first = _subm_tables(c, stem_kernel, subm_kernel, grid_budget, check_duplicates=True)
            else:  # unusual; two passes
                first, _ = _subm_tables(c, subm_kernel, None, grid_budget, check_duplicates=True)
                stem, _ = _subm_tables(c, stem_kernel, None, grid_budget)
            subm.append(first)
        else:
            subm.append(_subm_tables(c, subm_kernel, None, grid_budget, check_duplicates=level == 0)[0])

    return KernelMaps(num_sites=[len(c) for c in coords], coords=coords, stem=stem, subm=subm, down=down, up=up)


# ---- input checks -------------------------------------------------------------------------------

def batch_fits(extents: list[tuple[int, int, int]] | np.ndarray, max_kernel: int = 5) -> bool:
    """Whether scenes whose voxel extents are ``extents`` ((S, 3): max grid_coord + 1 per axis, each scene's
    grid starting at 0) can share one batch's kernel maps: their linear keys span S x the product of the
    widest extents, padded for kernels up to ``max_kernel``, which must stay below ``_MAX_KEY``. A scene that
    fits alone may not fit 13 times (the precise mode's augmentations): batch it in fewer."""
    if len(extents) == 0:
        return True
    widest = np.asarray(extents, dtype=np.float64).reshape(-1, 3).max(axis=0) + 2 * (max_kernel // 2)
    return float(len(extents)) * float(np.prod(widest)) < _MAX_KEY


def _as_integer_tensor(x, name: str, device: torch.device | None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise KernelMapError(f"{name} must be an integer array, got dtype {x.dtype}")
        return x.detach().to(device=device if device is not None else x.device, dtype=torch.int64)
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.integer):
        raise KernelMapError(f"{name} must be an integer array, got dtype {a.dtype}")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device or "cpu")


def _validate(grid_coord, batch) -> torch.Tensor:
    """(M, 4) int64 ``(batch, x, y, z)`` on grid_coord's device (numpy: CPU)."""
    shape = tuple(grid_coord.shape) if hasattr(grid_coord, "shape") else np.shape(grid_coord)
    if len(shape) != 2 or shape[1] != 3:
        raise KernelMapError(f"grid_coord must have shape (M, 3), got {shape}")
    coord = _as_integer_tensor(grid_coord, "grid_coord", None)
    m = len(coord)
    if m == 0:
        raise KernelMapError("grid_coord has no rows")
    if m > MAX_ROWS:
        raise KernelMapError(f"{m} rows exceed the int32 tables' limit of {MAX_ROWS}")
    if batch is None:
        bidx = torch.zeros(m, dtype=torch.int64, device=coord.device)
    else:
        bshape = tuple(batch.shape) if hasattr(batch, "shape") else np.shape(batch)
        if bshape != (m,):
            raise KernelMapError(f"batch must have shape ({m},), got {bshape}")
        bidx = _as_integer_tensor(batch, "batch", coord.device)
    c = torch.cat([bidx[:, None], coord], dim=1)
    lo = torch.amin(c, dim=0).tolist()  # one sync for both checks
    if lo[0] < 0:
        raise KernelMapError("batch indices must be non-negative")
    if min(lo[1:]) < 0:
        raise KernelMapError(f"grid_coord must be non-negative (min {min(lo[1:])})")
    return c


# ---- packing and lookups ------------------------------------------------------------------------

@dataclass(frozen=True)
class _Packing:
    """Linear keys of (b, x, y, z) rows over their bounding box, with `pad` free cells on each side of every
    spatial axis, so that key(p + d) = key(p) + delta(d) for |d| <= pad without wrapping into another row or
    scene. Keys are ordered like the rows' lexicographic (b, x, y, z) order."""

    lo: tuple[int, int, int, int]  # subtracted from each column (the spatial ones less `pad`)
    size: tuple[int, int, int, int]
    pad: int

    @classmethod
    def of(cls, c: torch.Tensor, pad: int) -> "_Packing":
        lo_hi = torch.stack([torch.amin(c, dim=0), torch.amax(c, dim=0)]).tolist()
        lo, hi = lo_hi
        extent = [h - l + 1 for l, h in zip(lo, hi)]
        size = (extent[0], *(e + 2 * pad for e in extent[1:]))
        if float(np.prod(np.array(size, dtype=np.float64))) >= _MAX_KEY:
            raise KernelMapError(f"coordinate extent {extent[1:]} x {extent[0]} scenes is too large")
        return cls((lo[0], lo[1] - pad, lo[2] - pad, lo[3] - pad), size, pad)

    @property
    def strides(self) -> tuple[int, int, int, int]:
        s = self.size
        return (s[1] * s[2] * s[3], s[2] * s[3], s[3], 1)

    @property
    def cells(self) -> int:
        return self.strides[0] * self.size[0]

    def keys(self, c: torch.Tensor) -> torch.Tensor:
        s = self.strides
        k = (c[:, 0] - self.lo[0]) * s[0]
        k += (c[:, 1] - self.lo[1]) * s[1]
        k += (c[:, 2] - self.lo[2]) * s[2]
        k += c[:, 3] - self.lo[3]
        return k

    def decode(self, keys: torch.Tensor) -> torch.Tensor:
        s = self.strides
        cols = [keys // s[0], keys % s[0] // s[1], keys % s[1] // s[2], keys % s[2]]
        return torch.stack([col + lo for col, lo in zip(cols, self.lo)], dim=1)

    def deltas(self, kernel: int) -> torch.Tensor:
        """(kernel³,) key offset of every tap, in the tables' flat tap order."""
        r = kernel // 2
        d = torch.arange(-r, r + 1, dtype=torch.int64)
        s = self.strides
        return (d[:, None, None] * s[1] + d[None, :, None] * s[2] + d[None, None, :] * s[3]).reshape(-1)


def _subm_tables(c: torch.Tensor, kernel: int, inner: int | None, grid_budget: int | None,
                 check_duplicates: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(M, kernel³) submanifold neighbour table, missing = M, and (if `inner`) the (M, inner³) table of the
    centred smaller kernel (the same lookups)."""
    m = len(c)
    pack = _Packing.of(c, kernel // 2)
    keys = pack.keys(c)
    table_bytes = 4 * m * (kernel**3 + (inner**3 if inner else 0))
    budget = max(DEFAULT_GRID_BUDGET, table_bytes) if grid_budget is None else grid_budget
    if 4 * pack.cells <= budget:
        return _grid_tables(c, keys, pack, kernel, inner, check_duplicates)
    table = _sorted_table(c, keys, pack, kernel, check_duplicates)
    if inner is None:
        return table, None
    o = (kernel - inner) // 2
    cube = table.view(m, kernel, kernel, kernel)[:, o : o + inner, o : o + inner, o : o + inner]
    return table, cube.reshape(m, inner**3)


def _chunk_rows(device: torch.device, taps: int) -> int:
    return max(1, _CHUNK_ENTRIES.get(device.type, _CHUNK_ENTRIES["cuda"]) // taps)


def _duplicate_error(c: torch.Tensor, count: int, row: int) -> KernelMapError:
    return KernelMapError(
        f"{count} duplicate voxel(s): (batch, x, y, z) = {c[row].tolist()} appears more than once; "
        "voxelise the cloud first (one row per voxel)"
    )


def _grid_tables(c: torch.Tensor, keys: torch.Tensor, pack: _Packing, kernel: int, inner: int | None,
                 check_duplicates: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense lookup: an int32 grid over the padded bounding box holds each cell's row id (M where empty).

    A row's K³ neighbours are one strided window of that grid (``as_strided`` with the key strides), so a
    chunk of rows is one ``index_select`` of windows straight into the table, in input row order, and no
    per-tap needle keys are materialised. The inner table is cut out of each chunk while it is in cache."""
    m, dev = len(c), c.device
    grid = torch.full((pack.cells,), m, dtype=torch.int32, device=dev)
    rows = torch.arange(m, dtype=torch.int32, device=dev)
    grid[keys] = rows
    if check_duplicates:  # with duplicates one row per key wins the write; the others read back another id
        lost = grid.index_select(0, keys) != rows
        count = int(lost.sum())
        if count:
            raise _duplicate_error(c, count, int(torch.nonzero(lost)[0, 0]))
    s = pack.strides
    corner = (kernel // 2) * (s[1] + s[2] + s[3])  # key offset from a window's lowest corner to its centre
    windows = grid.as_strided((pack.cells - 2 * corner, kernel, kernel, kernel), (1, s[1], s[2], s[3]))
    vol = kernel**3
    table = torch.empty((m, vol), dtype=torch.int32, device=dev)
    small = crop = None
    if inner is not None:
        o, cube = (kernel - inner) // 2, torch.arange(vol).reshape(kernel, kernel, kernel)
        crop = cube[o : o + inner, o : o + inner, o : o + inner].reshape(-1).to(dev)
        small = torch.empty((m, inner**3), dtype=torch.int32, device=dev)
    chunk = _chunk_rows(dev, vol)
    for a in range(0, m, chunk):
        b = min(a + chunk, m)
        torch.index_select(windows, 0, keys[a:b] - corner, out=table[a:b].view(b - a, kernel, kernel, kernel))
        if small is not None:
            torch.index_select(table[a:b], 1, crop, out=small[a:b])
    return table, small


def _sorted_table(c: torch.Tensor, keys: torch.Tensor, pack: _Packing, kernel: int,
                  check_duplicates: bool) -> torch.Tensor:
    """Sorted keys + binary search (``torch.searchsorted``): no memory beyond the keys and the table.

    Rows are visited in key order, so consecutive searches touch nearby keys, and each pair of neighbours
    is searched once: if q = p + d then p = q - d, so only the first half of the taps is searched and the
    opposite tap (K³ - 1 - f) of the hit is filled from the same result (2.8x faster than searching every
    tap of every row in input order, measured with one thread at 307k voxels)."""
    m, dev = len(c), c.device
    sk, perm = torch.sort(keys)
    if check_duplicates:
        same = sk[1:] == sk[:-1]
        count = int(same.sum())
        if count:
            raise _duplicate_error(c, count, int(perm[int(torch.nonzero(same)[0, 0])]))
    vol = kernel**3
    half = vol // 2
    table = torch.full((m + 1, vol), m, dtype=torch.int32, device=dev)  # row m: sink for the misses' mirror writes
    flat = table.view(-1)
    table[:, half] = torch.arange(m + 1, dtype=torch.int32, device=dev)
    deltas = pack.deltas(kernel)[:half].to(dev)
    cols = torch.arange(half, device=dev)
    mirror = vol - 1 - cols
    missing = torch.tensor(m, dtype=torch.int64, device=dev)
    chunk = _chunk_rows(dev, half) * 2
    for a in range(0, m, chunk):
        b = min(a + chunk, m)
        needles = (sk[a:b, None] + deltas).reshape(-1)
        pos = torch.searchsorted(sk, needles).clamp_(max=m - 1)
        hit = sk.index_select(0, pos) == needles
        q = torch.where(hit, perm.index_select(0, pos), missing).view(b - a, half)
        p = perm[a:b, None]
        flat.scatter_(0, (p * vol + cols).reshape(-1), q.reshape(-1).to(torch.int32))  # scatter_: 1.5x index_put_
        flat.scatter_(0, (q * vol + mirror).reshape(-1), p.expand(b - a, half).reshape(-1).to(torch.int32))
    return table[:m]


def _downsample(fine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coarse sites of a k2s2 conv and its down / up tables.

    fine: (M_f, 4) (b, x, y, z). Returns coarse (M_c, 4) sorted by key, down (M_c, 8), up (M_f, 8)."""
    m_f = len(fine)
    half = torch.cat([fine[:, :1], torch.div(fine[:, 1:], 2, rounding_mode="floor")], dim=1)
    pack = _Packing.of(half, 0)
    uniq, parent = torch.unique(pack.keys(half), sorted=True, return_inverse=True)
    coarse = pack.decode(uniq)
    m_c = len(uniq)
    odd = fine[:, 1:] & 1
    tap = 4 * odd[:, 0] + 2 * odd[:, 1] + odd[:, 2]
    rows = torch.arange(m_f, dtype=torch.int32, device=fine.device)
    down = torch.full((m_c * 8,), m_f, dtype=torch.int32, device=fine.device)
    down[parent * 8 + tap] = rows
    up = torch.full((m_f, 8), m_c, dtype=torch.int32, device=fine.device)
    up.scatter_(1, tap[:, None], parent.to(torch.int32)[:, None])
    return coarse, down.reshape(m_c, 8), up


__all__ = ["DEFAULT_GRID_BUDGET", "MAX_ROWS", "KernelMapError", "KernelMaps", "build_kernel_maps", "table_names"]
