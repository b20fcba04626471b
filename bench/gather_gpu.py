"""The spconv-free gather-matmul encoder (``export/graph.py``) on a CUDA GPU: parity with the official
fixtures and the published-size encoder's time on a generated room, against the same graph on this
machine's CPU in the same process. Needs no spconv (the GPU hosts we get have none), only torch.

    python bench/gather_gpu.py --fixtures ../shared/reference [--device cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from export.graph import GatherSpUNet
from model.pointcloud.cloud import PointCloud
from model.pointcloud.voxelize import voxelize

CASES = (("spunet_v1m1_seg", None, "expected.npz"), ("ppt_v1m3_seg", "ScanNet", "expected_scannet.npz"),
         ("ppt_v1m3_seg", "S3DIS", "expected_s3dis.npz"))


def read_state(path: Path) -> dict[str, torch.Tensor]:
    # the official pickles name numpy.core.multiarray.scalar; numpy 2 moved it to numpy._core
    scalar = (np._core.multiarray.scalar, "numpy.core.multiarray.scalar") if np.__version__ >= "2" \
        else np.core.multiarray.scalar
    allowed = [np.dtype, scalar, np.dtypes.Float64DType]
    with torch.serialization.safe_globals(allowed):
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def run(graph: GatherSpUNet, voxels, device: str, condition: str | None = None):
    maps = graph.kernel_maps(voxels.grid_coord).to(device)
    index = graph.conditions.index(condition) if condition else 0
    args = graph.example_inputs(maps, torch.from_numpy(voxels.feat).to(device), index)
    args = tuple(a.to(device) for a in args)
    with torch.no_grad():
        return [o.float().cpu().numpy() for o in graph(*args)]


def parity(fixtures: Path, device: str) -> None:
    for name, condition, expected_file in CASES:
        folder = fixtures / "fixtures" / name
        inp, expected = np.load(folder / "input.npz"), np.load(folder / expected_file)
        voxels = voxelize(PointCloud(inp["coord"], inp["color"], inp["normal"]))
        graph = GatherSpUNet.from_state_dict(read_state(folder / "checkpoint.pth")).to(device)
        feat, logits = run(graph, voxels, device, condition)
        p = voxels.point_to_voxel
        print(f"parity {name:<16} {condition or '-':<8} on {device}: backbone_feat max|d| "
              f"{np.abs(feat[p] - expected['backbone_feat']).max():.2e}, seg_logits max|d| "
              f"{np.abs(logits[p] - expected['seg_logits']).max():.2e}", flush=True)


def published_size_state(listing: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the published SpUNet-v1m1 shapes (unit-variance activations, identity BN)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for line in listing.read_text().splitlines()[1:]:
        key, shape, dtype = line.split("\t")
        key = key.removeprefix("module.")
        dims = () if shape == "scalar" else tuple(int(x) for x in shape.split("x"))
        if dtype == "int64":
            state[key] = torch.zeros(dims, dtype=torch.int64)
        elif key.endswith("running_var") or (key.endswith(".weight") and len(dims) == 1):
            state[key] = torch.ones(dims)
        elif len(dims) == 1:
            state[key] = torch.zeros(dims)
        else:
            fan_in = int(np.prod(dims[1:]))
            state[key] = torch.randn(dims, generator=gen) / np.sqrt(fan_in)
    return state


def timing(fixtures: Path, device: str, repeats: int, voxels_target: int) -> None:
    from training.data.synthetic import SceneConfig, generate_scene

    scene = generate_scene(7, SceneConfig(points_per_m2=1300.0, num_frames=0, room_x=(6.0, 6.0), room_y=(5.0, 5.0)))
    voxels = voxelize(PointCloud(scene.points.coord, scene.points.color, scene.points.normal))
    graph = GatherSpUNet.from_state_dict(published_size_state(fixtures / "keys" / "semseg-spunet-v1m1-0-base.tsv"))
    results = {}
    for dev in ("cpu", device):
        g = graph.to(dev)
        run(g, voxels, dev)  # warm-up
        times = []
        for _ in range(repeats):
            if dev == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = run(g, voxels, dev)
            if dev == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        results[dev] = (min(times), out[0])
        print(f"published SpUNet-v1m1, {voxels.num_voxels:,} voxels on {dev}: {min(times):.3f} s "
              f"({voxels.num_voxels / min(times):,.0f} voxels/s; kernel maps included)", flush=True)
    cpu, gpu = results["cpu"], results[device]
    rel = np.abs(cpu[1] - gpu[1]).max() / max(np.abs(cpu[1]).max(), 1e-12)
    print(f"ratio cpu/{device}: {cpu[0] / gpu[0]:.1f}x; max relative difference of the features {rel:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixtures", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "reference")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--voxels", type=int, default=130_000)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""), flush=True)
    parity(args.fixtures, args.device)
    timing(args.fixtures, args.device, args.repeats, args.voxels)


if __name__ == "__main__":
    main()
