"""Encoder speed on this machine: the published SpUNet size on a generated room (~130k voxels at 0.02 m)
and on a 1M-point cloud, through the same Predictor the CLI and the service use.

Prints voxels/s and peak memory, and — where the gather-matmul path of ``export/`` is installed — its time
and the ratio against spconv's native algorithm, measured in the same process on the same input.

    .venv/bin/python bench/encoder.py [--threads 2] [--repeats 2] [--small]
"""

from __future__ import annotations

import argparse
import resource

import torch

from model.build import build_model
from model.checkpoint import LoadedModel
from model.config import BackboneConfig, ModelConfig
from model.inference import Predictor
from model.pointcloud.cloud import PointCloud
from training.data.synthetic import SceneConfig, generate_scene
from timing import timed  # bench/timing.py (bench scripts run as files)


def room_cloud(points_per_m2: float, seed: int = 7) -> PointCloud:
    scene = generate_scene(seed, SceneConfig(points_per_m2=points_per_m2, num_frames=0,
                                             room_x=(6.0, 6.0), room_y=(5.0, 5.0)))
    p = scene.points
    return PointCloud(p.coord, p.color, p.normal, source=f"room(seed={seed}, {points_per_m2:.0f}/m2)")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="fixture-sized channels instead of the published size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    backbone = BackboneConfig(type="SpUNet-v1m1", num_classes=20)  # published SpUNet-v1m1 size (39M parameters)
    if args.small:
        backbone = BackboneConfig(type="SpUNet-v1m1", num_classes=20, base_channels=16,
                                  channels=(16, 24, 32, 48, 48, 32, 24, 24), layers=(2, 2, 2, 2, 1, 1, 1, 1))
    config = ModelConfig(kind="segmentor", backbone=backbone)
    torch.manual_seed(0)
    predictor = Predictor(LoadedModel(config, build_model(config).eval(), "random weights"))
    gather = _gather_runner(predictor)

    print(f"threads={args.threads}  model=SpUNet-v1m1 {'small' if args.small else 'published size'}  "
          f"params={sum(p.numel() for p in predictor.model.parameters()):,}")
    print(f"{'input':<34} {'points':>9} {'voxels':>8} {'prep s':>7} {'spconv s':>9} {'voxels/s':>9} "
          f"{'peak GiB':>8} {'gather s':>9} {'ratio':>6}")
    # the 6 x 5 m room has ~130 m2 of visible surface: 1300 points/m2 fill ~130k voxels, 7700/m2 give ~1M points
    for label, density in (("room ~130k voxels", 1300.0), ("1M-point cloud", 7700.0)):
        cloud = room_cloud(density)
        prep, voxels = timed(lambda: predictor.prepare(cloud), 1)
        predictor.encode([voxels])  # warm-up
        spconv_s, _ = timed(lambda: predictor.encode([voxels]), args.repeats)
        row = (f"{label:<34} {len(cloud):>9,} {voxels.num_voxels:>8,} {prep:>7.2f} {spconv_s:>9.2f} "
               f"{voxels.num_voxels / spconv_s:>9,.0f} {peak_rss_gib():>8.2f}")
        if gather is not None:
            gather_s, _ = timed(lambda: gather(voxels), args.repeats)
            row += f" {gather_s:>9.2f} {spconv_s / gather_s:>5.2f}x"
        print(row, flush=True)


def _gather_runner(predictor: Predictor):
    """The torch gather-matmul path of ``export/`` on the same weights, if that package is installed."""
    try:
        from export.graph import GatherSpUNet
    except ImportError:
        return None
    graph = GatherSpUNet.from_state_dict(predictor.model.state_dict(), predictor.config, heads=False)

    @torch.no_grad()
    def run(voxels):
        maps = graph.kernel_maps(voxels.grid_coord)  # the kernel maps are part of the measured time
        return graph(*graph.example_inputs(maps, torch.from_numpy(voxels.feat)))

    return run


if __name__ == "__main__":
    main()
