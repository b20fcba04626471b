"""Detection samples: a point scene with its boxes, augmented (points and boxes alike), voxelised with the
inference pipeline (``model.pointcloud.voxelize``), and the dense per-voxel targets of the voting head.

Scenes are Pointcept folders with ``boxes.npy`` (M, 7) and ``box_labels.npy`` (ScanNet-20 indices), as
``ponder datasets generate`` writes them. A voxel belongs to the box whose ``box_instances`` entry equals the
voxel's ``instance`` label; scenes without instance labels fall back to the smallest box containing the voxel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from model.detection.boxes import as_boxes, canonical_boxes, points_in_boxes
from model.pointcloud.cloud import PointCloud
from model.pointcloud.voxelize import voxelize
from training.data.classes import SCANNET20_NAMES
from training.data.formats import load_scene, read_split

from .augment import BoxAugment
from .config import AugmentConfig

log = logging.getLogger(__name__)


def find_scene_dirs(root: str | Path, split: str | None) -> list[Path]:
    """Scene folders of ``split`` under ``root`` (``<root>/<split>.txt`` or the ``<root>/<split>/`` folders).
    ``root`` may also be a split folder or a single scene folder (then ``split`` is ignored)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such data folder")
    if (root / "coord.npy").is_file():
        return [root]
    if split is not None and (root / split).is_dir():
        try:
            ids = read_split(root, split)
        except FileNotFoundError:
            ids = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
        dirs = [root / split / i for i in ids]
    else:
        dirs = sorted(p for p in root.iterdir() if (p / "coord.npy").is_file())
    missing = [d for d in dirs if not (d / "coord.npy").is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: listed scene has no coord.npy")
    if not dirs:
        where = f"{root}/{split}" if split else str(root)
        raise FileNotFoundError(f"{where}: no scene folders (coord.npy, boxes.npy, ...) found")
    return dirs


def label_map(class_names: Sequence[str]) -> np.ndarray:
    """(20,) ScanNet-20 index → head class index, -1 for classes the head does not detect."""
    table = np.full(len(SCANNET20_NAMES), -1, dtype=np.int64)
    for i, name in enumerate(class_names):
        if name not in SCANNET20_NAMES:
            raise ValueError(f"detection class {name!r} is not a ScanNet-20 name; ground-truth box_labels are "
                             f"ScanNet-20 indices ({', '.join(SCANNET20_NAMES)})")
        table[SCANNET20_NAMES.index(name)] = i
    return table


def read_boxes(scene: dict[str, np.ndarray], source: str, mapping: np.ndarray):
    """(boxes (M, 7) float64, labels (M,) head indices, box instance ids (M,) or None) of the head's classes."""
    if "boxes" not in scene or "box_labels" not in scene:
        raise ValueError(f"{source}: the scene has no boxes.npy / box_labels.npy (detection ground truth)")
    boxes = as_boxes(scene["boxes"], f"{source}: boxes.npy")
    labels = scene["box_labels"].reshape(-1)
    if len(labels) != len(boxes):
        raise ValueError(f"{source}: {len(boxes)} boxes but {len(labels)} box labels")
    if labels.size and (labels.min() < 0 or labels.max() >= len(mapping)):
        raise ValueError(f"{source}: box labels must be ScanNet-20 indices 0..19, got {labels.min()}..{labels.max()}")
    instances = scene.get("box_instances")
    if instances is not None and len(instances) != len(boxes):
        raise ValueError(f"{source}: {len(boxes)} boxes but {len(instances)} box instance ids")
    keep = mapping[labels] >= 0
    return boxes[keep], mapping[labels][keep], None if instances is None else instances.reshape(-1)[keep]


@dataclass
class VoxelTargets:
    foreground: np.ndarray   # (M,) bool
    label: np.ndarray        # (M,) int64 head class, -1 background
    offset: np.ndarray       # (M, 3) box centre - voxel position
    log_size: np.ndarray     # (M, 3) log of the canonical box size
    yaw: np.ndarray          # (M, 2) sin 4θ, cos 4θ of the canonical yaw
    weight: np.ndarray       # (M,) loss weight of foreground voxels (mean 1), 0 for background


def voxel_targets(positions: np.ndarray, boxes: np.ndarray, labels: np.ndarray, instance: np.ndarray | None,
                  box_instances: np.ndarray | None, balance: float = 0.5) -> VoxelTargets:
    """Dense targets of the voting head for voxels at ``positions`` (M, 3)."""
    m = len(positions)
    if not len(boxes):  # an empty room: every voxel is background
        return VoxelTargets(np.zeros(m, dtype=bool), np.full(m, -1, dtype=np.int64), np.zeros((m, 3), np.float32),
                            np.zeros((m, 3), np.float32), np.zeros((m, 2), np.float32), np.zeros(m, np.float32))
    if instance is not None and box_instances is not None and (instance >= 0).any():
        order = np.argsort(box_instances, kind="stable")
        slot = np.clip(np.searchsorted(box_instances[order], instance), 0, len(order) - 1)
        owner = np.where(box_instances[order][slot] == instance, order[slot], -1)
    else:  # no instance labels: the smallest box containing the voxel
        inside = points_in_boxes(positions, boxes)                             # (M, B)
        volume = np.where(inside, (boxes[:, 3] * boxes[:, 4] * boxes[:, 5])[None], np.inf)
        owner = np.where(inside.any(axis=1), np.argmin(volume, axis=1), -1)
    fg = owner >= 0
    own = canonical_boxes(boxes)[np.maximum(owner, 0)]                          # (M, 7) the voxel's box
    counts = np.bincount(owner[fg], minlength=len(boxes)).astype(np.float64)
    weight = np.zeros(m)
    if fg.any():
        weight[fg] = counts[owner[fg]] ** -balance
        weight[fg] /= weight[fg].mean()
    return VoxelTargets(
        foreground=fg,
        label=np.where(fg, labels[np.maximum(owner, 0)], -1).astype(np.int64),
        offset=np.where(fg[:, None], own[:, :3] - positions, 0.0).astype(np.float32),
        log_size=np.where(fg[:, None], np.log(own[:, 3:6]), 0.0).astype(np.float32),
        yaw=np.where(fg[:, None], np.stack([np.sin(4 * own[:, 6]), np.cos(4 * own[:, 6])], axis=1), 0.0)
        .astype(np.float32),
        weight=weight.astype(np.float32),
    )


class DetectionScenes:
    """Scenes with ground-truth boxes, read once and kept in memory (a generated room is a few MB)."""

    def __init__(self, dirs: Sequence[Path], class_names: Sequence[str]):
        self.dirs = list(dirs)
        self.class_names = tuple(class_names)
        self.mapping = label_map(self.class_names)
        self._cache: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.dirs)

    def get(self, index: int) -> dict[str, Any]:
        """Copies of the scene's arrays: coord, color, normal, instance, boxes, labels, box_instances, source."""
        if index not in self._cache:
            path = self.dirs[index]
            scene = load_scene(path)
            boxes, labels, box_instances = read_boxes(scene, str(path), self.mapping)
            for key in ("color", "normal"):
                if key not in scene:
                    raise ValueError(f"{path}: the scene has no {key}.npy, which the model takes as input")
            self._cache[index] = {
                "coord": scene["coord"].astype(np.float32), "color": scene["color"],
                "normal": scene["normal"].astype(np.float32), "instance": scene["instance"],
                "boxes": boxes, "labels": labels, "box_instances": box_instances, "source": str(path)}
        return {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in self._cache[index].items()}

    def cloud(self, index: int) -> PointCloud:
        s = self.get(index)
        return PointCloud(s["coord"], s["color"], s["normal"], source=s["source"])


class DetectionSamples:
    """Item i: scene i augmented with ``rng``, voxelised (random point per voxel), with voxel targets."""

    def __init__(self, scenes: DetectionScenes, grid_size: float, input_features: Sequence[str],
                 augment: AugmentConfig, balance: float = 0.5):
        self.scenes, self.grid_size, self.input_features = scenes, grid_size, tuple(input_features)
        self.augment, self.balance = BoxAugment(augment), balance

    def __len__(self) -> int:
        return len(self.scenes)

    def load(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        data = self.augment(self.scenes.get(index), rng)
        cloud = PointCloud(data["coord"], data["color"], data["normal"], source=data["source"])
        voxels = voxelize(cloud, self.grid_size, self.input_features, rng=rng)
        positions = data["coord"][voxels.kept].astype(np.float64)
        has_instances = data["box_instances"] is not None and (data["instance"] >= 0).any()
        targets = voxel_targets(positions, data["boxes"], data["labels"],
                                data["instance"][voxels.kept] if has_instances else None,
                                data["box_instances"], self.balance)
        return {"feat": voxels.feat, "grid_coord": voxels.grid_coord, "position": positions.astype(np.float32),
                "targets": targets, "source": data["source"]}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Voxels of all samples concatenated, with a per-voxel ``batch`` index."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    counts = [len(s["feat"]) for s in samples]
    cat = lambda get, dtype: torch.from_numpy(np.concatenate([get(s) for s in samples]).astype(dtype))  # noqa: E731
    t = lambda name: (lambda s: getattr(s["targets"], name))  # noqa: E731
    return {
        "feat": cat(lambda s: s["feat"], np.float32),
        "grid_coord": cat(lambda s: s["grid_coord"], np.int32),
        "batch": torch.from_numpy(np.repeat(np.arange(len(samples)), counts)),
        "position": cat(lambda s: s["position"], np.float32),
        "foreground": cat(t("foreground"), np.bool_),
        "label": cat(t("label"), np.int64),
        "offset": cat(t("offset"), np.float32),
        "log_size": cat(t("log_size"), np.float32),
        "yaw": cat(t("yaw"), np.float32),
        "weight": cat(t("weight"), np.float32),
    }
