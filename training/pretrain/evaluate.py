"""Render held-out RGB-D views of scenes and score them: PSNR of the colour and absolute error of the depth,
both over the pixels whose sensor depth is valid (the only pixels with a known target).

It goes through ``model.novel_view`` (the renderer the CLI and the service use), with the full point cloud
and the recorded cameras in the scene's own frame.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from model.config import ModelConfig
from model.novel_view import render_views_of, scene_volume
from model.pointcloud.cloud import PointCloud
from model.render import Camera
from training.data.formats import load_rgbd_frames, load_scene
from training.pretrain.config import DataConfig, EvalConfig
from training.pretrain.dataset import find_scenes


@dataclass
class ViewScore:
    scene_id: str
    frame: int
    psnr: float          # dB over valid-depth pixels, colours in [0, 1]
    depth_mae: float     # metres, mean |rendered z-depth - sensor z-depth| over valid-depth pixels
    valid_pixels: int


@dataclass
class EvalResult:
    views: list[ViewScore]
    seconds: float       # rendering time (volumes + rays)
    megapixels: float

    @property
    def psnr(self) -> float:
        return float(np.mean([v.psnr for v in self.views]))

    @property
    def depth_mae(self) -> float:
        return float(np.mean([v.depth_mae for v in self.views]))

    def summary(self) -> dict:
        return {"psnr_db": round(self.psnr, 3), "depth_mae_m": round(self.depth_mae, 4), "views": len(self.views),
                "seconds": round(self.seconds, 2), "seconds_per_megapixel": round(self.seconds / self.megapixels, 2),
                "per_view": [dataclasses.asdict(v) for v in self.views]}


def score_view(rgb: np.ndarray, depth: np.ndarray, gt_rgb: np.ndarray,
               gt_depth: np.ndarray) -> tuple[float, float, int]:
    """(psnr, depth_mae, n): rgb (H, W, 3) in [0, 1], depths (H, W) metres; ground-truth depth 0 = unknown."""
    valid = gt_depth > 0
    n = int(valid.sum())
    if n == 0:
        return float("nan"), float("nan"), 0
    mse = float(np.mean((rgb[valid] - gt_rgb[valid]) ** 2))
    psnr = float(-10 * np.log10(max(mse, 1e-12)))
    return psnr, float(np.mean(np.abs(depth[valid] - gt_depth[valid]))), n


def held_out_frames(frames: tuple[int, ...], views: int) -> list[int]:
    """``views`` frames spread evenly over the selected ones (deterministic)."""
    idx = np.unique(np.linspace(0, len(frames) - 1, num=min(views, len(frames))).round().astype(int))
    return [frames[i] for i in idx]


@torch.no_grad()
def evaluate_views(model: nn.Module, config: ModelConfig, data: DataConfig, cfg: EvalConfig,
                   condition: str | None = None) -> EvalResult:
    """Score ``cfg.views`` held-out views of the first ``cfg.scenes`` scenes of ``cfg.split``."""
    entries = find_scenes(dataclasses.replace(data, max_scenes=cfg.scenes), split=cfg.split,
                          selection=cfg.frames.selection())
    scores, seconds, pixels = [], 0.0, 0
    for entry in entries:
        scene = load_scene(entry.points)
        cloud = PointCloud(scene["coord"], scene.get("color"), scene.get("normal"), source=entry.scene_id)
        frames = held_out_frames(entry.frames, cfg.views)
        views = load_rgbd_frames(entry.rgbd, frames, align_axis=data.align_axis)
        height, width = views["depth"].shape[1:]
        cameras = [Camera(K=views["intrinsic"][i][:3, :3], w2c=views["extrinsic"][i], width=width, height=height)
                   for i in range(len(frames))]
        start = time.perf_counter()
        volume = scene_volume(model, config, cloud, condition or data.condition)
        rendered = render_views_of(model, volume, cameras, cfg.chunk)
        seconds += time.perf_counter() - start
        pixels += len(frames) * height * width
        for i, view in enumerate(rendered):
            psnr, mae, n = score_view(view.rgb.cpu().numpy(), view.depth.cpu().numpy(),
                                      views["rgb"][i].astype(np.float32) / 255.0,
                                      views["depth"][i] * float(views["depth_scale"]))
            scores.append(ViewScore(entry.scene_id, int(frames[i]), psnr, mae, n))
    return EvalResult(views=scores, seconds=seconds, megapixels=pixels / 1e6)
