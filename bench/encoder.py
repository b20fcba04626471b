"""Encoder speed on this machine: the published SpUNet-v1m1 size on a generated room (~130k voxels at 0.02 m)
and on a 1M-point cloud, spconv (native algorithm) vs the torch engine (mask buckets + row bags, fp32 and bf16), same
process, same weights, same input, runs interleaved (best of ``--repeats``) so load changes hit both.

Prints wall and process-CPU seconds, voxels/s, the speed-up over spconv (wall and CPU time) and the largest
feature difference from spconv (relative to the largest feature), for every thread count asked, and the machine's
fp32 GEMM rate before and after (`gemm_rate`: the ratios move with it). Freed memory is
kept for reuse as every ``ponder`` command does (model/engine/memory.py; it speeds up both encoders, spconv more);
``--glibc-default`` measures without it.

    .venv/bin/python bench/encoder.py [--threads 2 1] [--repeats 2] [--small] [--no-bf16] [--room-only] [--glibc-default]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
import torch

from model.checkpoint import LoadedModel
from model.config import BackboneConfig, ModelConfig
from model.engine.memory import reuse_freed_memory
from model.engine.cpu_bf16 import bf16_support, cpu_flags, onednn_has_bf16
from model.engine.encoder import EngineEncoder, SpconvEncoder
from model.inference import Predictor
from model.pointcloud.cloud import PointCloud
from training.data.synthetic import SceneConfig, generate_scene
from export_speed import scaled_model  # bench/export_speed.py: unit-gain random weights (features O(1))


def room_cloud(points_per_m2: float, seed: int = 7) -> PointCloud:
    scene = generate_scene(seed, SceneConfig(points_per_m2=points_per_m2, num_frames=0,
                                             room_x=(6.0, 6.0), room_y=(5.0, 5.0)))
    p = scene.points
    return PointCloud(p.coord, p.color, p.normal, source=f"room(seed={seed}, {points_per_m2:.0f}/m2)")


def random_segmentor(small: bool = False) -> LoadedModel:
    """SpUNet-v1m1 segmentor with unit-gain random weights: the published size (39M parameters), or ``small``
    fixture-sized channels."""
    backbone = BackboneConfig(type="SpUNet-v1m1", num_classes=20)
    if small:
        backbone = BackboneConfig(type="SpUNet-v1m1", num_classes=20, base_channels=16,
                                  channels=(16, 24, 32, 48, 48, 32, 24, 24), layers=(2, 2, 2, 2, 1, 1, 1, 1))
    config = ModelConfig(kind="segmentor", backbone=backbone)
    return LoadedModel(config, scaled_model(config), "random weights")


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def gemm_rate(threads: int) -> float:
    """fp32 GFLOP/s of a (4096x96)·(96x96) GEMM, best of 200, on ``threads`` threads: this machine's speed right now.
    The engine's time is mostly such GEMMs, so when this figure drops (other tenants on the cores: 210-290 GFLOP/s
    at 2 threads over 2026-12-06, a day after the engine's GEMM shapes reached 330-390 alone) the engine slows
    more than spconv and their ratio falls; read a run's ratios next to this figure."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, w = torch.randn(4096, 96), torch.randn(96, 96)
    out = torch.empty(4096, 96)
    best = float("inf")
    for _ in range(200):
        t = time.perf_counter()
        torch.mm(a, w, out=out)
        best = min(best, time.perf_counter() - t)
    torch.set_num_threads(before)
    return 2 * 4096 * 96 * 96 / best / 1e9


def gemm_rates(threads: list[int]) -> str:
    return ", ".join(f"{gemm_rate(t):.0f} GFLOP/s at {t} thread{'s' if t > 1 else ''}" for t in threads)


def interleaved(encoders: dict, voxels, repeats: int) -> tuple[dict[str, tuple[float, float]], dict[str, np.ndarray]]:
    """Best (wall, process CPU) seconds of each encoder over ``repeats`` rounds (one call of each per round)
    and its output. CPU time is the steadier figure on a shared machine (other jobs steal wall time)."""
    best = {name: (float("inf"), float("inf")) for name in encoders}
    out = {}
    for _ in range(max(repeats, 1)):
        for name, enc in encoders.items():
            wall, cpu = time.perf_counter(), time.process_time()
            (out[name],) = enc.encode([voxels], None)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="fixture-sized channels instead of the published size")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 engine")
    parser.add_argument("--room-only", action="store_true", help="skip the 1M-point cloud")
    parser.add_argument("--glibc-default", action="store_true",
                        help="leave glibc's allocator settings (big buffers unmapped on free) instead of what ponder uses")
    args = parser.parse_args()
    reused = False if args.glibc_default else reuse_freed_memory()

    loaded = random_segmentor(args.small)
    predictor = Predictor(loaded)  # places the model: spconv's native algorithm on CPU
    encoders = {"spconv": SpconvEncoder(predictor.model, predictor.device),
                "torch": EngineEncoder.from_loaded(loaded, "cpu")}
    bf16 = bf16_support(onednn_has_bf16(), cpu_flags())
    if args.no_bf16 or bf16 == "none":  # no oneDNN bf16 kernels: ~70x slower than fp32, minutes per run
        print("bf16 skipped: " + ("--no-bf16" if args.no_bf16 else
                                  f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no oneDNN bf16 kernels"))
    else:
        encoders["torch-bf16"] = EngineEncoder.from_loaded(loaded, "cpu", precision="bf16")
        print(f"bf16 on this CPU: {bf16} ({'AMX/AVX512-BF16' if bf16 == 'native' else 'no bf16 instructions'})")

    print(f"model=SpUNet-v1m1 {'small' if args.small else 'published size'}  "
          f"params={sum(p.numel() for p in predictor.model.parameters()):,}  freed memory reused: {reused}  "
          f"load average {load()}  cpu {torch.backends.cpu.get_cpu_capability()}, bf16 {bf16}")
    print(f"fp32 GEMM (4096x96)·(96x96): {gemm_rates(args.threads)}")
    print(f"{'input':<18} {'voxels':>9} {'thr':>3} {'encoder':<11} {'wall s':>7} {'cpu s':>7} {'voxels/s':>9} "
          f"{'vs spconv':>9} {'cpu ratio':>9} {'max|d|/max':>10}")
    # the 6 x 5 m room has ~130 m2 of visible surface: 1300 points/m2 fill ~130k voxels, 7700/m2 give ~1M points
    inputs = [("room ~130k voxels", 1300.0)] + ([] if args.room_only else [("1M-point cloud", 7700.0)])
    for label, density in inputs:
        cloud = room_cloud(density)
        voxels = predictor.prepare(cloud)
        for threads in args.threads:
            torch.set_num_threads(threads)
            interleaved(encoders, voxels, 1)  # warm-up
            best, out = interleaved(encoders, voxels, args.repeats)
            scale = float(np.abs(out["spconv"]).max()) or 1.0
            for name, (wall, cpu) in best.items():
                diff = float(np.abs(out[name] - out["spconv"]).max()) / scale
                print(f"{label:<18} {voxels.num_voxels:>9,} {threads:>3} {name:<11} {wall:>7.2f} {cpu:>7.2f} "
                      f"{voxels.num_voxels / wall:>9,.0f} {best['spconv'][0] / wall:>8.2f}x "
                      f"{best['spconv'][1] / cpu:>8.2f}x {diff:>10.1e}", flush=True)
    print(f"fp32 GEMM (4096x96)·(96x96) at the end: {gemm_rates(args.threads)}")
    print(f"peak RSS {peak_rss_gib():.2f} GiB  load average {load()} (other jobs make every figure noisier)")


if __name__ == "__main__":
    main()
