"""Kernel-map building (`model.sparse.kernel_maps`, torch) against the numpy implementation it replaced,
in one process on the same inputs: the generated room at 0.02 m (~131k voxels), the 1M-point cloud of
bench/encoder.py at 0.02 m (~307k voxels) and a ~1M-voxel room (1.8M points at 0.01 m). All with the
SpUNet's 5 levels and 5³ stem. Columns: the numpy baseline (CPU), the torch code on ``--device`` with
its default lookup (dense grid when it fits the budget) and with the sorted-key fallback forced, best of
``--repeats`` runs interleaved; every result is checked equal to the baseline's.

    .venv/bin/python bench/kernel_maps.py [--threads 2] [--repeats 3] [--device cpu|cuda] [--cases room,cloud,1m]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from model.pointcloud.voxelize import voxelize
from model.sparse.kernel_maps import build_kernel_maps
from encoder import room_cloud  # bench/encoder.py (bench scripts run as files)
from timing import timed  # bench/timing.py

# label, points per m2 of the generated 6 x 5 m room, grid size (m)
CASES = {"room": ("room ~131k voxels", 1300.0, 0.02), "cloud": ("1M-point cloud", 7700.0, 0.02),
         "1m": ("~1M voxels (0.01 m)", 14000.0, 0.01)}


# ---- the numpy implementation this module had before the torch one (baseline only) ------------------

def numpy_kernel_maps(coord: np.ndarray, num_levels: int = 5, stem_kernel: int = 5,
                      subm_kernel: int = 3) -> list[np.ndarray]:
    """Tables in `KernelMaps.tables` order (int64), one scene, as the old code built them."""
    coords = [np.concatenate([np.zeros((len(coord), 1), np.int64), coord.astype(np.int64)], axis=1)]
    down, up = [], []
    for _ in range(num_levels - 1):
        coarse, d, u = _np_downsample(coords[-1])
        coords.append(coarse)
        down.append(d)
        up.append(u)
    stem = _np_subm_table(coords[0], stem_kernel)
    o = (stem_kernel - subm_kernel) // 2
    cube = stem.reshape(len(stem), stem_kernel, stem_kernel, stem_kernel)
    subm = [np.ascontiguousarray(cube[:, o : o + subm_kernel, o : o + subm_kernel, o : o + subm_kernel])
            .reshape(len(stem), subm_kernel**3)]
    subm += [_np_subm_table(c, subm_kernel) for c in coords[1:]]
    return [stem, *subm, *down, *up]


def _np_packing(c: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray]:
    extent = c.max(axis=0) + 1
    size = np.array([extent[0], *(extent[1:] + 2 * pad)], dtype=np.int64)
    strides = np.array([size[1] * size[2] * size[3], size[2] * size[3], size[3], 1], dtype=np.int64)
    return (c + np.array([0, pad, pad, pad], dtype=np.int64)) @ strides, strides


def _np_subm_table(c: np.ndarray, kernel: int) -> np.ndarray:
    m, r = len(c), kernel // 2
    keys, strides = _np_packing(c, r)
    perm = np.argsort(keys, kind="stable")
    sk = keys[perm]
    vol = kernel**3
    table = np.full((m, vol), m, dtype=np.int64)
    table[:, vol // 2] = np.arange(m)
    for f in range(vol // 2):  # half of the offsets; the opposite tap comes from the same hits
        i, j, k = f // (kernel * kernel), (f // kernel) % kernel, f % kernel
        delta = (i - r) * strides[1] + (j - r) * strides[2] + (k - r) * strides[3]
        pos = np.searchsorted(sk, sk + delta)
        np.minimum(pos, m - 1, out=pos)
        hit = np.flatnonzero(sk[pos] == sk + delta)
        p, q = perm[hit], perm[pos[hit]]
        table[p, f] = q
        table[q, vol - 1 - f] = p
    return table


def _np_downsample(fine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    m_f = len(fine)
    half = fine.copy()
    half[:, 1:] //= 2
    keys, _ = _np_packing(half, 0)
    uniq, first, parent = np.unique(keys, return_index=True, return_inverse=True)
    m_c = len(uniq)
    odd = fine[:, 1:] & 1
    tap = 4 * odd[:, 0] + 2 * odd[:, 1] + odd[:, 2]
    down = np.full((m_c, 8), m_f, dtype=np.int64)
    down[parent, tap] = np.arange(m_f)
    up = np.full((m_f, 8), m_c, dtype=np.int64)
    up[np.arange(m_f), tap] = parent
    return half[first], down, up


# ---- the run ---------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--cases", default="room,cloud,1m", help=f"comma-separated of {','.join(CASES)}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    print(f"threads={args.threads} device={device} repeats={args.repeats} (best of) "
          f"load={os.getloadavg()[0]:.2f} torch={torch.__version__}")
    print(f"{'input':<22} {'voxels':>9} {'numpy s':>8} {'torch s':>8} {'ratio':>6} {'sorted s':>9} {'ratio':>6}")
    for name in args.cases.split(","):
        label, density, grid_size = CASES[name]
        grid = voxelize(room_cloud(density), grid_size).grid_coord
        coord = torch.from_numpy(grid).to(device)

        def build(budget=None):
            maps = build_kernel_maps(coord, grid_budget=budget)
            sync()
            return maps

        build()  # warm-up (CUDA context, allocator)
        old_s = new_s = sorted_s = float("inf")
        for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit all three
            t, old = timed(lambda: numpy_kernel_maps(grid), 1)
            old_s = min(old_s, t)
            t, new = timed(build, 1)
            new_s = min(new_s, t)
            t, fallback = timed(lambda: build(0), 1)
            sorted_s = min(sorted_s, t)
        for maps in (new, fallback):
            assert all(torch.equal(t.cpu().long(), torch.from_numpy(o)) for t, o in zip(maps.tables(), old)), \
                "tables differ from the numpy baseline"
        print(f"{label:<22} {len(grid):>9,} {old_s:>8.3f} {new_s:>8.3f} {old_s / new_s:>5.1f}x "
              f"{sorted_s:>9.3f} {old_s / sorted_s:>5.1f}x", flush=True)


if __name__ == "__main__":
    main()
