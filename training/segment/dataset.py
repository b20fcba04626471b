"""Fine-tuning samples (spec §7.4 "Semseg fine-tune train"): one item = one scene, augmented, grid-sampled
(one random point per voxel), cropped, with features ``[color/127.5 - 1, normal]`` and per-voxel labels.

Scenes are read through ``training.data.formats.load_scene``, so generated scenes, Pointcept folders and
PonderV2 ``.pth`` files all work. The data-efficient setting (``label_fraction``) is applied here.
"""

from __future__ import annotations

import logging
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.pointcloud.cloud import PointCloud
from model.pointcloud.voxelize import assemble_features, complete_cloud
from training.data.formats import load_scene, read_split
from training.segment.config import SegDataConfig

log = logging.getLogger(__name__)
IGNORE_INDEX = -1


def find_scenes(root: str | Path, split: str) -> list[Path]:
    """Scene folders / ``.pth`` files of ``<root>/<split>``, in ``<root>/<split>.txt`` order when that list exists."""
    root = Path(root)
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir}: no such split folder (expected <data root>/{split}/<scene>)")
    if (root / f"{split}.txt").is_file():
        scenes = []
        for scene_id in read_split(root, split):
            path = split_dir / scene_id
            path = path if path.exists() else split_dir / f"{scene_id}.pth"
            if not path.exists():
                raise FileNotFoundError(f"{root / (split + '.txt')} lists {scene_id}, but {split_dir} has "
                                        f"neither {scene_id}/ nor {scene_id}.pth")
            scenes.append(path)
    else:
        scenes = sorted(p for p in split_dir.iterdir() if p.is_dir() or p.suffix == ".pth")
    if not scenes:
        raise FileNotFoundError(f"{split_dir}: no scenes (Pointcept folders or .pth files)")
    return scenes


def _scene_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def sparse_labels(segment: np.ndarray, fraction: float, seed: int, name: str) -> np.ndarray:
    """Labels of a seeded random ``fraction`` of the labelled points (at least one); the rest -1."""
    if fraction >= 1:
        return segment
    labelled = np.flatnonzero(segment != IGNORE_INDEX)
    keep = max(1, round(fraction * len(labelled))) if len(labelled) else 0
    chosen = _scene_rng(seed, name).choice(labelled, keep, replace=False)
    out = np.full_like(segment, IGNORE_INDEX)
    out[chosen] = segment[chosen]
    return out


def choose_scenes(count: int, fraction: float, seed: int) -> np.ndarray:
    """Indices of a seeded random ``fraction`` of ``count`` scenes (at least one), in increasing order."""
    if fraction >= 1:
        return np.arange(count)
    keep = max(1, math.ceil(fraction * count))
    return np.sort(np.random.default_rng(seed).choice(count, keep, replace=False))


def train_pipeline(cfg: SegDataConfig, grid_size: float):
    """The official fine-tune transforms up to the second CenterShift (NormalizeColor and Collect are done by
    ``SegmentDataset.sample``). ``augment: none`` keeps only CenterShift, GridSample and SphereCrop."""
    from training.transforms import (CenterShift, ChromaticAutoContrast, ChromaticJitter, ChromaticTranslation,
                                     Compose, ElasticDistortion, GridSample, RandomDropout, RandomFlip,
                                     RandomJitter, RandomRotate, RandomScale, ShufflePoint, SphereCrop)

    steps: list = [CenterShift(apply_z=True)]
    if cfg.augment == "official":
        steps += [
            RandomDropout(0.2, p=0.2),
            RandomRotate((-1, 1), axis="z", center=(0, 0, 0), p=0.5),
            RandomRotate((-1 / 64, 1 / 64), axis="x", p=0.5),
            RandomRotate((-1 / 64, 1 / 64), axis="y", p=0.5),
            RandomScale((0.9, 1.1)),
            RandomFlip(0.5),
            RandomJitter(0.005, 0.02),
            ElasticDistortion(((0.2, 0.4), (0.8, 1.6))),
            ChromaticAutoContrast(0.2, None),
            ChromaticTranslation(0.95, 0.05),
            ChromaticJitter(0.95, 0.05),
        ]
    steps.append(GridSample(grid_size))
    if cfg.point_max is not None:
        steps.append(SphereCrop(cfg.point_max, mode="random"))
    steps.append(CenterShift(apply_z=False))
    if cfg.augment == "official":
        steps.append(ShufflePoint())
    return Compose(steps)


class SegmentDataset:
    """Training scenes of one split, with the label-efficiency choice applied once at construction."""

    def __init__(self, cfg: SegDataConfig, grid_size: float, feature_keys: tuple[str, ...] = ("color", "normal"),
                 split: str | None = None):
        self.cfg, self.grid_size, self.feature_keys = cfg, grid_size, tuple(feature_keys)
        scenes = find_scenes(cfg.root, split or cfg.train_split)
        if cfg.max_scenes is not None:
            scenes = scenes[:cfg.max_scenes]
        if cfg.label_mode == "scenes":
            scenes = [scenes[i] for i in choose_scenes(len(scenes), cfg.label_fraction, cfg.label_seed)]
        self.scenes = scenes
        self.pipeline = train_pipeline(cfg, grid_size)

    def __len__(self) -> int:
        return len(self.scenes)

    def scene(self, index: int) -> dict[str, np.ndarray]:
        """Full-resolution arrays of scene ``index`` with the sparse-label choice applied (``segment``)."""
        path = self.scenes[index]
        raw = load_scene(path)
        cloud = complete_cloud(PointCloud(raw["coord"], raw.get("color"), raw.get("normal"), source=str(path)),
                               self.grid_size, self.feature_keys)
        segment = raw["segment"]
        num_classes = len(self.cfg.class_names)
        bad = (segment != IGNORE_INDEX) & ((segment < 0) | (segment >= num_classes))
        if bad.any():
            raise ValueError(f"{path}: labels must lie in [0, {num_classes}) or be -1; found {segment[bad][0]}")
        if self.cfg.label_mode == "points":
            segment = sparse_labels(segment, self.cfg.label_fraction, self.cfg.label_seed, path.name)
        data = {"coord": cloud.coord, "segment": segment}
        if cloud.color is not None:
            data["color"] = cloud.color.astype(np.float32)
        if cloud.normal is not None:
            data["normal"] = cloud.normal
        return data

    def sample(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        data = self.pipeline(self.scene(index), rng)
        feat = assemble_features(data.get("color"), data.get("normal"), data["coord"], self.feature_keys)
        return {"feat": feat, "grid_coord": data["grid_coord"].astype(np.int32),
                "segment": data["segment"].astype(np.int64), "condition": self.cfg.condition,
                "mix": float(rng.random())}


def collate(samples: list[dict[str, Any]], mix_prob: float = 0.0) -> dict[str, Any]:
    """Concatenate scenes; ``batch`` gives each voxel its scene. With Mix3D (drawn from the first sample's RNG),
    scenes 2k and 2k+1 share one batch index, i.e. are overlaid in one sparse tensor, as the official
    ``point_collate_fn`` does by merging neighbouring offsets."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    conditions = {s["condition"] for s in samples}
    if len(conditions) != 1:
        raise ValueError(f"a batch must hold one condition, got {sorted(conditions)}")
    mixed = len(samples) > 1 and samples[0]["mix"] < mix_prob
    scene = [i // 2 if mixed else i for i in range(len(samples))]
    return {
        "feat": torch.from_numpy(np.concatenate([s["feat"] for s in samples])),
        "grid_coord": torch.from_numpy(np.concatenate([s["grid_coord"] for s in samples])),
        "segment": torch.from_numpy(np.concatenate([s["segment"] for s in samples])),
        "batch": torch.from_numpy(np.concatenate([np.full(len(s["feat"]), b, np.int64)
                                                  for b, s in zip(scene, samples)])),
        "condition": samples[0]["condition"],
    }
