"""Novel-view rendering after pre-training: quality against the untrained model, speed, and memory.

1. Quality: held-out RGB-D views of training scenes (the config's ``eval`` section: frames the training
   selection skips), rendered from the full point cloud by ``model.novel_view`` with the untrained model
   (the config's seed) and with a trained checkpoint: PSNR (dB) and mean absolute depth error (m) over the
   valid-depth pixels.
2. Speed: seconds per megapixel of ``render_views`` (rays only) and the time of one scene volume.
3. Memory: peak RSS growth of rendering one view in a fresh process, per chunk and image size, through
   ``render_views`` (keeps only colour and depth per pixel) and through the head's eval path (``val_ray_split``
   chunks, which also keeps every per-sample output: weights, sdf, gradients, z_vals).

    .venv/bin/python bench/render.py --config training/configs/pretrain-small-cpu.yaml \
        --checkpoint /tmp/ponder-pretrain-small/final [--threads 1] [--memory 120x90,320x240]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpoint import load_checkpoint  # noqa: E402
from model.novel_view import render_views_of, scene_volume  # noqa: E402
from model.pointcloud.cloud import PointCloud  # noqa: E402
from model.render import Camera  # noqa: E402
from training.data.formats import load_rgbd_frames, load_scene  # noqa: E402
from training.pretrain.config import load_config  # noqa: E402
from training.pretrain.dataset import find_scenes  # noqa: E402
from training.pretrain.evaluate import evaluate_views  # noqa: E402
from training.pretrain.task import build_pretrain_model  # noqa: E402


def first_scene(cfg):
    entry = find_scenes(cfg.data, split=cfg.eval.split, selection=cfg.eval.frames.selection())[0]
    scene = load_scene(entry.points)
    cloud = PointCloud(scene["coord"], scene.get("color"), scene.get("normal"), source=entry.scene_id)
    views = load_rgbd_frames(entry.rgbd, [entry.frames[0]])
    return cloud, views


def scaled_camera(views, width: int, height: int) -> Camera:
    """The first recorded camera with its intrinsics rescaled to width x height (integer pixel centres)."""
    h, w = views["depth"].shape[1:]
    K = views["intrinsic"][0][:3, :3].copy()
    sx, sy = width / w, height / h
    K[0] = [K[0, 0] * sx, 0, (K[0, 2] + 0.5) * sx - 0.5]
    K[1] = [0, K[1, 1] * sy, (K[1, 2] + 0.5) * sy - 0.5]
    return Camera(K=K, w2c=views["extrinsic"][0], width=width, height=height)


def quality(cfg, checkpoint: Path | None) -> dict:
    out = {}
    untrained = build_pretrain_model(cfg)
    out["untrained"] = evaluate_views(untrained, cfg.model, cfg.data, cfg.eval).summary()
    if checkpoint is not None:
        loaded = load_checkpoint(checkpoint)
        out["trained"] = evaluate_views(loaded.model, loaded.config, cfg.data, cfg.eval).summary()
        out["psnr_gain_db"] = round(out["trained"]["psnr_db"] - out["untrained"]["psnr_db"], 2)
        out["depth_error_ratio"] = round(out["untrained"]["depth_mae_m"] / out["trained"]["depth_mae_m"], 2)
    return out


def speed(cfg, checkpoint: Path | None, width: int, height: int, chunk: int) -> dict:
    loaded = load_checkpoint(checkpoint) if checkpoint else None
    model, mcfg = (loaded.model, loaded.config) if loaded else (build_pretrain_model(cfg).eval(), cfg.model)
    cloud, views = first_scene(cfg)
    start = time.perf_counter()
    volume = scene_volume(model, mcfg, cloud, cfg.data.condition)
    volume_s = time.perf_counter() - start
    camera = scaled_camera(views, width, height)
    start = time.perf_counter()
    render_views_of(model, volume, [camera], chunk)
    render_s = time.perf_counter() - start
    mp = width * height / 1e6
    return {"points": len(cloud), "voxels": volume.num_voxels, "volume_s": round(volume_s, 2),
            "image": f"{width}x{height}", "render_s": round(render_s, 2),
            "seconds_per_megapixel": round(render_s / mp, 1), "rays_per_s": round(width * height / render_s)}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_probe(config: str, checkpoint: str | None, mode: str, chunk: int, width: int, height: int) -> None:
    """Run in a fresh process: the peak RSS growth (MiB) of one render, after the volume is built (the kernel's
    peak-RSS mark is reset first through /proc/self/clear_refs)."""
    cfg = load_config(config)
    loaded = load_checkpoint(checkpoint) if checkpoint else None
    model, mcfg = (loaded.model, loaded.config) if loaded else (build_pretrain_model(cfg).eval(), cfg.model)
    cloud, views = first_scene(cfg)
    volume = scene_volume(model, mcfg, cloud, cfg.data.condition)
    camera = scaled_camera(views, width, height)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _rss_kib("VmRSS")
    if mode == "views":
        render_views_of(model, volume, [camera], chunk)
    else:  # the head's eval path: val_ray_split chunks, every per-sample output kept and concatenated
        from model.render import get_rays

        w2c = torch.from_numpy(camera.w2c @ np.linalg.inv(volume.world_to_unit)).float()
        o, d = get_rays(height, width, torch.from_numpy(camera.K).float(), w2c)
        renderer = model.render_head.renderer.eval()
        with torch.no_grad():
            renderer.render(o.reshape(-1, 3), d.reshape(-1, 3), volume.volume, chunk, semantic=False)
    peak = _rss_kib("VmHWM")
    print(json.dumps({"mode": mode, "chunk": chunk, "image": f"{width}x{height}",
                      "peak_growth_mib": round((peak - base) / 1024, 1)}))


def memory(args) -> list[dict]:
    small, large = args.memory.split(",")
    rows = []
    for mode, chunk, size in (("views", 1024, small), ("views", 4096, small), ("views", 4096, large),
                              ("head_eval", 4096, small), ("head_eval", 4096, large)):
        width, height = (int(v) for v in size.split("x"))
        cmd = [sys.executable, __file__, "--config", str(args.config), "--threads", str(args.threads),
               "--probe", mode, str(chunk), str(width), str(height)]
        if args.checkpoint:
            cmd += ["--checkpoint", str(args.checkpoint)]
        # Large blocks through mmap, so freed chunk temporaries leave the process: the peak is live memory, not
        # whatever the allocator's heap kept from earlier chunks.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        result = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=Path("training/configs/pretrain-small-cpu.yaml"))
    p.add_argument("--checkpoint", type=Path, default=None, help="trained checkpoint (our folder format)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--speed", default="160x120", help="image size of the speed test (WxH)")
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--memory", default="120x90,320x240",
                   help="small and large image of the memory test (WxH,WxH); 'off' to skip")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--probe", nargs=4, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:
        mode, chunk, w, h = args.probe
        checkpoint = str(args.checkpoint) if args.checkpoint else None
        memory_probe(str(args.config), checkpoint, mode, int(chunk), int(w), int(h))
        return
    cfg = load_config(args.config)
    report = {"threads": args.threads, "torch": torch.__version__}
    if not args.skip_quality:
        report["quality"] = quality(cfg, args.checkpoint)
    if not args.skip_speed:
        width, height = (int(v) for v in args.speed.split("x"))
        report["speed"] = speed(cfg, args.checkpoint, width, height, args.chunk)
    if args.memory != "off":
        report["memory"] = memory(args)
    for part in report.get("quality", {}).values():
        if isinstance(part, dict):
            part.pop("per_view", None)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
