"""Pre-training samples (spec §7.2 ``ScanNetRGBDDataset`` and §7.4 "Indoor pre-train"): one item = one scene's
augmented, grid-sampled point cloud plus ``num_cameras`` RGB-D views whose cameras follow every point transform.

Reads the real layouts (a ScanNet user points ``data.root`` at the preprocessed scenes and ``data.rgbd_root`` at
the ``reader.py`` export); ``ponder datasets generate`` writes the same layouts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.pointcloud.voxelize import assemble_features
from training.data.formats import list_frames, load_rgbd_frames, load_scene, read_skip_list, read_split
from training.pretrain.config import DataConfig
from training.transforms import (CenterShift, Compose, GridSample, RandomDropout, RandomFlip, RandomRotate,
                                 RandomScale, ShufflePoint)

log = logging.getLogger(__name__)
CAMERAS = ("extrinsic",)


def pretrain_pipeline(cfg: DataConfig, grid_size: float) -> Compose:
    """The official indoor pre-train transforms up to GridSample and the second CenterShift (spec §7.4)."""
    steps: list = [CenterShift(apply_z=True, keys=CAMERAS)]
    if cfg.dropout > 0:
        steps.append(RandomDropout(cfg.dropout, p=1.0))
    if cfg.augment:
        steps += [
            RandomRotate((-1, 1), axis="z", center=(0, 0, 0), p=0.5, keys=CAMERAS),
            RandomRotate((-1 / 64, 1 / 64), axis="x", p=0.5, keys=CAMERAS),
            RandomRotate((-1 / 64, 1 / 64), axis="y", p=0.5, keys=CAMERAS),
            RandomScale((0.9, 1.1), keys=CAMERAS),
            RandomFlip(0.5, keys=CAMERAS),
        ]
    steps += [GridSample(grid_size), CenterShift(apply_z=False, keys=CAMERAS), ShufflePoint()]
    return Compose(steps)


@dataclass(frozen=True)
class SceneEntry:
    scene_id: str
    points: Path   # Pointcept folder or .pth file
    rgbd: Path     # ScanNet RGB-D export folder
    frames: tuple[int, ...]


def find_scenes(cfg: DataConfig, split: str | None = None, selection=None) -> list[SceneEntry]:
    """Scenes of ``split`` that have a point cloud and at least one selected RGB-D frame."""
    split = split or cfg.split
    root = Path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such data folder (data.root)")
    split_dir = root / split
    try:
        ids = read_split(root, split)
    except FileNotFoundError:
        if not split_dir.is_dir():
            raise FileNotFoundError(f"{root}: neither {split}.txt nor a {split}/ folder") from None
        ids = sorted(p.stem if p.suffix == ".pth" else p.name for p in split_dir.iterdir()
                     if p.is_dir() or p.suffix == ".pth")
    skip = read_skip_list(cfg.skip_list) if cfg.skip_list else {}
    selection = selection or cfg.frames.selection()
    entries = []
    for scene_id in ids:
        points = split_dir / scene_id if (split_dir / scene_id).is_dir() else split_dir / f"{scene_id}.pth"
        rgbd = cfg.rgbd_dir() / scene_id
        if not points.exists():
            raise FileNotFoundError(f"{points}: scene {scene_id} is listed for {split} but has no point cloud")
        if not rgbd.is_dir():
            log.warning("scene %s has no RGB-D export at %s; skipped", scene_id, rgbd)
            continue
        frames = list_frames(rgbd, selection, skip.get(scene_id, ()))
        if not frames:
            log.warning("scene %s has no frames after the selection %s; skipped", scene_id, selection)
            continue
        entries.append(SceneEntry(scene_id, points, rgbd, tuple(frames)))
        if cfg.max_scenes is not None and len(entries) >= cfg.max_scenes:
            break
    if not entries:
        raise ValueError(f"{root}: no {split} scene has both a point cloud and selected RGB-D frames")
    return entries


class PretrainDataset:
    """Item i: scene i with ``num_cameras`` views drawn as the official ``np.random.choice(frames, V,
    replace=V > len(frames))``, then the pre-train pipeline (with ``rng``)."""

    def __init__(self, cfg: DataConfig, grid_size: float = 0.02, input_features: tuple[str, ...] = ("color", "normal")):
        self.cfg, self.grid_size, self.input_features = cfg, grid_size, tuple(input_features)
        self.scenes = find_scenes(cfg)
        self.pipeline = pretrain_pipeline(cfg, grid_size)

    def __len__(self) -> int:
        return len(self.scenes)

    def raw(self, index: int, frame_ids) -> dict[str, Any]:
        """The untransformed scene and views (float coordinates, w2c extrinsics, depth in sensor units)."""
        entry = self.scenes[index]
        scene = load_scene(entry.points)
        views = load_rgbd_frames(entry.rgbd, [int(i) for i in frame_ids], align_axis=self.cfg.align_axis)
        data = {"coord": scene["coord"].astype(np.float32), "segment": scene["segment"],
                "color": scene["color"] if "color" in scene else None,
                "normal": scene["normal"].astype(np.float32) if "normal" in scene else None,
                "scene_id": entry.scene_id, "frame_ids": np.asarray(frame_ids, dtype=np.int64),
                **{k: views[k] for k in ("rgb", "depth", "intrinsic", "extrinsic", "semantic")},
                "depth_scale": float(views["depth_scale"]), "condition": self.cfg.condition}
        for key in self.input_features:
            if key in ("color", "normal") and data[key] is None:
                raise ValueError(f"{entry.points}: the scene has no {key}, which the model takes as input")
        return data

    def load(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        frames = self.scenes[index].frames
        v = self.cfg.num_cameras
        chosen = rng.choice(np.asarray(frames), v, replace=v > len(frames))
        data = self.pipeline(self.raw(index, chosen), rng)
        data["feat"] = assemble_features(data["color"], data["normal"], data["coord"], self.input_features)
        return data


def collate(samples: list[dict[str, Any]], max_points: int | None = None) -> dict[str, Any]:
    """The official ``collate_fn`` for pre-training: points concatenated (``offset`` cumulative, plus a per-point
    ``batch`` index), views stacked (B, V, ...). A sample that would push the batch past ``max_points`` is
    dropped (the first one is always kept)."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    kept, total = [], 0
    for s in samples:
        if kept and max_points is not None and total + len(s["coord"]) > max_points:
            log.warning("skip %s: %d points would exceed max_points=%d", s["scene_id"], len(s["coord"]), max_points)
            continue
        kept.append(s)
        total += len(s["coord"])
    conditions = {s["condition"] for s in kept}
    if len(conditions) != 1:
        raise ValueError(f"a batch must hold one condition, got {sorted(conditions)}")
    shapes = {s["depth"].shape for s in kept}
    if len(shapes) != 1:
        raise ValueError(f"views of one batch must share (V, H, W); got {sorted(shapes)}")
    counts = [len(s["coord"]) for s in kept]
    cat = lambda key, dtype: torch.from_numpy(np.concatenate([s[key] for s in kept]).astype(dtype))  # noqa: E731
    stack = lambda key, dtype: torch.from_numpy(np.stack([s[key] for s in kept]).astype(dtype))  # noqa: E731
    return {
        "coord": cat("coord", np.float32), "grid_coord": cat("grid_coord", np.int32), "feat": cat("feat", np.float32),
        "batch": torch.from_numpy(np.repeat(np.arange(len(kept)), counts)),
        "offset": torch.from_numpy(np.cumsum(counts)),
        "rgb": stack("rgb", np.uint8),             # (B, V, H, W, 3) 0..255
        "depth": stack("depth", np.float32),       # (B, V, H, W) sensor units
        "intrinsic": stack("intrinsic", np.float32),
        "extrinsic": stack("extrinsic", np.float32),  # (B, V, 4, 4) world-to-camera, augmented world
        "semantic": stack("semantic", np.int64),   # (B, V, H, W) label or -1
        "depth_scale": torch.tensor([s["depth_scale"] for s in kept], dtype=torch.float32),
        "condition": kept[0]["condition"],
        "scene_id": [s["scene_id"] for s in kept],
    }
