"""Encoder time of the three execution paths on the same generated room and the same weights:
spconv (ConvAlgo.Native, the official layers), the torch gather-matmul graph (`export.graph`) and that
graph exported to ONNX and run in onnxruntime (`export.onnxrt`). Kernel-map building is timed
separately (it runs once per request on the host, whatever executes the graph).

    .venv/bin/python bench/export_speed.py [--threads 2] [--repeats 2] [--small-only] [--conv]

Published SpUNet-v1m1 size (39M parameters), random weights scaled to keep activations O(1).
``--conv`` adds the single-conv comparison behind `gather_conv`'s formulation (one accumulated matmul
per tap vs one big gather + GEMM), in torch and in onnxruntime.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from export.graph import GatherSpUNet
from export.onnx_export import export_onnx
from export.onnxrt import OnnxRunner
from model.build import build_model
from model.checkpoint import LoadedModel
from model.config import BackboneConfig, ModelConfig
from model.inference import Predictor
from model.pointcloud.cloud import PointCloud
from model.pointcloud.voxelize import voxelize
from training.data.synthetic import SceneConfig, generate_scene
from timing import timed  # bench/timing.py (bench scripts run as files)

# ~130 m2 of visible surface in a 6 x 5 m room: 1300 points/m2 fill ~130k voxels at 0.02 m
ROOMS = {"room ~130k voxels": ((6.0, 6.0), (5.0, 5.0), 1300.0), "small room": ((3.0, 3.0), (2.5, 2.5), 1300.0)}


def room(x: tuple[float, float], y: tuple[float, float], density: float, seed: int = 7) -> PointCloud:
    points = generate_scene(seed, SceneConfig(points_per_m2=density, num_frames=0, room_x=x, room_y=y)).points
    return PointCloud(points.coord, points.color, points.normal, source="generated room")


def scaled_model(config: ModelConfig) -> torch.nn.Module:
    """Random weights with unit-gain convs (std 1/sqrt(fan-in)) and mild BN statistics, so features stay
    O(1) through 40 layers and the parity figures mean something."""
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if p.dim() == 5:
                p.normal_(0.0, p[0].numel() ** -0.5 if p.shape[1:4].numel() > 1 else p.shape[-1] ** -0.5)
            elif name.endswith("running_var"):
                p.uniform_(0.5, 2.0)
            elif name.endswith("running_mean") or name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            elif name.endswith(".weight") and p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def encoder_bench(args) -> None:
    config = ModelConfig(kind="encoder", backbone=BackboneConfig(type="SpUNet-v1m1"))
    predictor = Predictor(LoadedModel(config, scaled_model(config), "random weights"))
    graph = GatherSpUNet.from_state_dict(predictor.model.state_dict(), config)
    fused = GatherSpUNet.from_state_dict(predictor.model.state_dict(), config, taps_per_matmul=27)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        onnx_path = export_onnx(graph, Path(tmp) / "spunet.onnx")
        print(f"ONNX export (TorchScript exporter): {time.perf_counter() - start:.1f} s, "
              f"{onnx_path.stat().st_size / 2**20:.0f} MiB")
        runner = OnnxRunner(onnx_path, device="cpu", threads=args.threads)
        fused_runner = OnnxRunner(export_onnx(fused, Path(tmp) / "fused.onnx"), device="cpu", threads=args.threads)

        print(f"threads={args.threads}, best of {args.repeats}; times in seconds, ratio = spconv time / time; "
              "onnx27 = onnxruntime with one gather + GEMM per conv (taps_per_matmul=27)")
        print(f"{'input':<20} {'voxels':>8} {'maps':>6} {'spconv':>7} {'gather':>7} {'ratio':>6} {'onnxrt':>7} "
              f"{'ratio':>6} {'onnx27':>7} {'ratio':>6} {'gather err':>11} {'onnx err':>9}")
        rooms = {k: v for k, v in ROOMS.items() if not args.small_only or k == "small room"}
        for label, spec in rooms.items():
            voxels = predictor.prepare(room(*spec))
            maps_s, maps = timed(lambda: graph.kernel_maps(voxels.grid_coord), 1)
            inputs = graph.example_inputs(maps, torch.from_numpy(voxels.feat))
            feeds = {"feat": voxels.feat, **maps.onnx_inputs()}
            predictor.encode([voxels])  # warm-up
            spconv_s, (ref,) = timed(lambda: predictor.encode([voxels]), args.repeats)
            with torch.no_grad():
                gather_s, (feat,) = timed(lambda: graph(*inputs), args.repeats)
            onnx_s, out = timed(lambda: runner.run_feeds(feeds), args.repeats)
            fused_s, fused_out = timed(lambda: fused_runner.run_feeds(feeds), args.repeats)
            scale = float(np.abs(ref).max())
            gather_err = float(np.abs(feat.numpy() - ref).max()) / scale
            onnx_err = max(float(np.abs(o["backbone_feat"] - ref).max()) for o in (out, fused_out)) / scale
            print(f"{label:<20} {voxels.num_voxels:>8,} {maps_s:>6.2f} {spconv_s:>7.2f} {gather_s:>7.2f} "
                  f"{spconv_s / gather_s:>5.2f}x {onnx_s:>7.2f} {spconv_s / onnx_s:>5.2f}x {fused_s:>7.2f} "
                  f"{spconv_s / fused_s:>5.2f}x {gather_err:>11.1e} {onnx_err:>9.1e}", flush=True)
        print("errors: max |x - spconv| / max |spconv| over the (M, 96) encoder features")


def conv_bench(args, n: int = 100_000, channels: int = 64) -> None:
    """One 27-tap submanifold conv on a room's voxels: per-tap accumulation vs one big gather + GEMM."""
    import onnxruntime as ort

    from model.sparse.gather_ops import gather_conv, pad_zero_row
    from model.sparse.kernel_maps import build_kernel_maps

    class Loop(torch.nn.Module):
        def forward(self, x, table, w):
            return gather_conv(x, table, w)

    class Batched(torch.nn.Module):
        def forward(self, x, table, w):
            gathered = pad_zero_row(x).index_select(0, table.reshape(-1))  # (M*K, C_in)
            return gathered.reshape(table.shape[0], -1) @ w.reshape(-1, w.shape[2])

    voxels = voxelize(room(*ROOMS["room ~130k voxels"]), 0.02, ("color", "normal"))
    grid = voxels.grid_coord[:n]
    table = build_kernel_maps(grid, num_levels=1, stem_kernel=None).subm[0]
    x = torch.randn(len(grid), channels)
    w = torch.randn(27, channels, channels) / (27 * channels) ** 0.5
    print(f"\nsingle conv: {len(grid):,} voxels, {channels}->{channels}, 27 taps "
          f"({(table < len(grid)).float().mean() * 27:.1f} real neighbours per voxel)")

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks
        for name, module in (("per-tap loop", Loop()), ("gather+GEMM", Batched())):
            with torch.no_grad():
                t_torch, ref = timed(lambda: module(x, table, w), args.repeats)
            path = str(Path(tmp) / f"{name}.onnx")
            torch.onnx.export(module, (x, table, w), path, dynamo=False, input_names=["x", "t", "w"],
                              dynamic_axes={"x": {0: "m"}, "t": {0: "m"}})
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            feeds = {"x": x.numpy(), "t": table.numpy(), "w": w.numpy()}
            t_ort, (out,) = timed(lambda: sess.run(None, feeds), args.repeats)
            print(f"  {name:<14} torch {t_torch:.3f} s   onnxruntime {t_ort:.3f} s   "
                  f"(onnx vs torch max abs {np.abs(out - ref.numpy()).max():.1e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--small-only", action="store_true", help="only the small room (quick check)")
    parser.add_argument("--conv", action="store_true", help="also the single-conv formulation comparison")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder_bench(args)
    if args.conv:
        conv_bench(args)


if __name__ == "__main__":
    main()
