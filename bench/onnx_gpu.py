"""The exported ONNX encoder in onnxruntime on a GPU host: parity of the CUDA execution provider with the
official fixtures, and the published-size encoder's time on a generated room with onnxruntime-CUDA and
torch-CUDA against onnxruntime on the host's CPU (the baseline), all in this process, kernel maps included.
Needs no spconv; the graph is exported on the spot (TorchScript exporter).

    python bench/onnx_gpu.py --fixtures ../shared/reference [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.graph import GatherSpUNet
from export.onnx_export import export_onnx
from export.onnxrt import OnnxRunner
from gather_gpu import CASES, published_size_state, read_state, run  # bench/gather_gpu.py (scripts run as files)
from model.pointcloud.cloud import PointCloud
from model.pointcloud.voxelize import voxelize
from timing import timed  # bench/timing.py


def parity(fixtures: Path, work: Path, device: str) -> None:
    for name, condition, expected_file in CASES:
        folder = fixtures / "fixtures" / name
        inp, expected = np.load(folder / "input.npz"), np.load(folder / expected_file)
        voxels = voxelize(PointCloud(inp["coord"], inp["color"], inp["normal"]))
        path = export_onnx(GatherSpUNet.from_state_dict(read_state(folder / "checkpoint.pth")), work / f"{name}.onnx")
        runner = OnnxRunner(path, device=device)
        out = runner.run(voxels.feat, voxels.grid_coord, condition=condition)
        p = voxels.point_to_voxel
        print(f"parity {name:<16} {condition or '-':<8} onnxruntime {runner.providers[0]}: backbone_feat max|d| "
              f"{np.abs(out['backbone_feat'][p] - expected['backbone_feat']).max():.2e}, seg_logits max|d| "
              f"{np.abs(out['seg_logits'][p] - expected['seg_logits']).max():.2e}", flush=True)


def timing(fixtures: Path, work: Path, repeats: int) -> None:
    from training.data.synthetic import SceneConfig, generate_scene

    scene = generate_scene(7, SceneConfig(points_per_m2=1300.0, num_frames=0, room_x=(6.0, 6.0), room_y=(5.0, 5.0)))
    voxels = voxelize(PointCloud(scene.points.coord, scene.points.color, scene.points.normal))
    graph = GatherSpUNet.from_state_dict(published_size_state(fixtures / "keys" / "semseg-spunet-v1m1-0-base.tsv"))
    start = time.perf_counter()
    path = export_onnx(graph, work / "published.onnx")
    print(f"published SpUNet-v1m1 exported in {time.perf_counter() - start:.1f} s "
          f"({path.stat().st_size / 2**20:.0f} MiB); room of {voxels.num_voxels:,} voxels", flush=True)
    runs = {"onnxruntime CPU": OnnxRunner(path, device="cpu", threads=os.cpu_count())}
    if "CUDAExecutionProvider" in ort.get_available_providers():
        runs["onnxruntime CUDA"] = OnnxRunner(path, device="cuda")
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        runs["onnxruntime TensorRT"] = OnnxRunner(path, device="tensorrt")
    results = {}
    for label, runner in runs.items():
        runner.run(voxels.feat, voxels.grid_coord)  # warm-up (and engine build for TensorRT)
        seconds, out = timed(lambda r=runner: r.run(voxels.feat, voxels.grid_coord), repeats)
        results[label] = (seconds, out["backbone_feat"])
    if torch.cuda.is_available():
        g = graph.to("cuda")
        run(g, voxels, "cuda")

        def torch_cuda():
            return run(g, voxels, "cuda")[0]  # numpy on the host, so the GPU work has finished

        results["torch CUDA (gather graph)"] = timed(torch_cuda, repeats)
    base_time, base_feat = results["onnxruntime CPU"]
    for label, (seconds, feat) in results.items():
        rel = np.abs(feat - base_feat).max() / max(np.abs(base_feat).max(), 1e-12)
        print(f"{label:<27} {seconds:7.3f} s  {voxels.num_voxels / seconds:>10,.0f} voxels/s  "
              f"{base_time / seconds:5.1f}x the CPU baseline  max rel. diff {rel:.1e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixtures", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "reference")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parity-only", action="store_true", help="skip the published-size timing")
    args = parser.parse_args()
    device = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    print(f"onnxruntime {ort.__version__} providers {ort.get_available_providers()}; torch {torch.__version__}"
          + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""), flush=True)
    with tempfile.TemporaryDirectory() as work:
        parity(args.fixtures, Path(work), device)
        if not args.parity_only:
            timing(args.fixtures, Path(work), args.repeats)


if __name__ == "__main__":
    main()
