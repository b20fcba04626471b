"""Novel-view rendering speed on a GPU host, which has torch but no spconv.

The scene volume needs the spconv backbone, so it is made here first (``--prepare``: the bundled render model on
a generated room, saved with the render head's weights and a camera as plain tensors); the GPU host then
renders through ``model.render.render_views`` only (UNet3D output -> NeuS sampling -> colour/depth), timing
CUDA against its own CPU (the baseline, all cores) in one process, and checking that both give the same image.

    .venv/bin/python bench/render_gpu.py --prepare gpuref/render.pt      # here (CPU, spconv)
    python bench/render_gpu.py gpuref/render.pt [--size 640x480]         # on the GPU host
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from model.render import Camera, PonderRenderHead, RenderHeadConfig, render_views


def prepare(out: Path) -> None:
    from model.checkpoint import load_checkpoint
    from model.inference import default_checkpoint
    from model.novel_view import scene_volume
    from model.pointcloud.cloud import PointCloud
    from training.data.synthetic import SceneConfig, generate_scene

    loaded = load_checkpoint(default_checkpoint("render"))
    scene = generate_scene(3, SceneConfig(num_frames=2))
    cloud = PointCloud(scene.points.coord, scene.points.color, scene.points.normal)
    volume = scene_volume(loaded.model, loaded.config, cloud)
    frames = scene.frames  # the first recorded RGB-D camera of the room
    height, width = frames.depth.shape[1:]
    head = loaded.model.render_head
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"head_config": json.dumps(head.cfg.to_dict()), "head": head.state_dict(),
                "volume": volume.volume.cpu(), "world_to_unit": torch.from_numpy(volume.world_to_unit),
                "K": torch.from_numpy(frames.intrinsic[:3, :3].astype(np.float64)),
                "w2c": torch.from_numpy(np.linalg.inv(frames.pose[0]).astype(np.float64)),
                "size": torch.tensor([width, height])}, out)
    print(f"wrote {out}: volume {tuple(volume.volume.shape)} of a {volume.num_voxels:,}-voxel room")


def scaled(K: np.ndarray, w2c: np.ndarray, size: tuple[int, int], width: int, height: int) -> Camera:
    sx, sy = width / size[0], height / size[1]
    K = K.copy()
    K[0, 0], K[0, 2] = K[0, 0] * sx, (K[0, 2] + 0.5) * sx - 0.5
    K[1, 1], K[1, 2] = K[1, 1] * sy, (K[1, 2] + 0.5) * sy - 0.5
    return Camera(K=K, w2c=w2c, width=width, height=height)


def render_time(head: PonderRenderHead, volume: torch.Tensor, world_to_unit: np.ndarray, camera: Camera,
                chunk: int, device: str):
    head, volume = head.to(device), volume.to(device)
    render_views(head.renderer, volume, world_to_unit, [scaled_small(camera)], chunk)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    view = render_views(head.renderer, volume, world_to_unit, [camera], chunk)[0]
    rgb, depth = view.rgb.cpu().numpy(), view.depth.cpu().numpy()  # copies back, so the GPU work has finished
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return seconds, rgb, depth, peak


def scaled_small(camera: Camera) -> Camera:
    return scaled(camera.K, camera.w2c, (camera.width, camera.height), 32, 24)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--prepare", action="store_true", help="write the bundle (needs spconv)")
    parser.add_argument("--size", default="640x480", help="GPU image size WxH")
    parser.add_argument("--cpu-size", default="160x120", help="CPU baseline image size WxH (same camera)")
    parser.add_argument("--chunks", default="4096,65536", help="rays per chunk on the GPU, comma-separated")
    args = parser.parse_args()
    if args.prepare:
        prepare(args.bundle)
        return
    data = torch.load(args.bundle, map_location="cpu", weights_only=True)
    head = PonderRenderHead(RenderHeadConfig.from_dict(json.loads(data["head_config"])))
    head.load_state_dict(data["head"])
    world_to_unit = data["world_to_unit"].numpy()
    size = tuple(int(v) for v in data["size"])
    K, w2c = data["K"].numpy(), data["w2c"].numpy()
    cw, ch = (int(v) for v in args.cpu_size.split("x"))
    gw, gh = (int(v) for v in args.size.split("x"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""), flush=True)
    small = scaled(K, w2c, size, cw, ch)
    cpu_s, cpu_rgb, cpu_depth, _ = render_time(head, data["volume"], world_to_unit, small, 4096, "cpu")
    cpu_rate = cpu_s / (cw * ch / 1e6)
    print(f"cpu  {cw}x{ch}: {cpu_s:.2f} s = {cpu_rate:.1f} s per megapixel (baseline)", flush=True)
    if not torch.cuda.is_available():
        return
    _, gpu_rgb, gpu_depth, _ = render_time(head, data["volume"], world_to_unit, small, 4096, "cuda")
    print(f"cuda vs cpu on the {cw}x{ch} view: colour max|d| {np.abs(gpu_rgb - cpu_rgb).max():.1e}, "
          f"depth max|d| {np.abs(gpu_depth - cpu_depth).max():.1e} m", flush=True)
    big = scaled(K, w2c, size, gw, gh)
    for chunk in (int(c) for c in args.chunks.split(",")):
        seconds, _, _, peak = render_time(head, data["volume"], world_to_unit, big, chunk, "cuda")
        rate = seconds / (gw * gh / 1e6)
        print(f"cuda {gw}x{gh}, chunk {chunk}: {seconds:.3f} s = {rate:.2f} s per megapixel, "
              f"{cpu_rate / rate:.0f}x the CPU baseline, peak GPU memory {peak:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
