"""Segmentation fine-tuning of the image model on generated rooms, the image counterpart of ``training.segment``:

    input RGB views -> ImageSegmentModel (pre-trained trunk + per-voxel classifier over K classes + empty)
    -> cross-entropy against voxel targets from the room's labelled points (``model.images.segment.voxel_targets``:
       majority label per voxel, "empty" for seen voxels without points, unseen voxels ignored)

Evaluation (``evaluate_image_segment``): held-out rooms, input views spread over each room's frames, every
labelled point of the room classified from the trilinear voxel logits (``point_labels``), the official
I/U/T metric (``training.metrics.SegMetrics``), on all points and on the points some input view sees; the
point-cloud model (``--point-checkpoint``) is scored on the same rooms and the same two point sets.

Config (YAML, see training/configs/segment-images-small-cpu.yaml): ``model`` (an image model mapping, used
without ``init``), ``init`` (a pre-trained image model folder whose weights start the trunk), ``data``
(``training.images.config.ImageDataConfig``; ``generate`` writes train and ``val_fraction`` val rooms),
``train``, ``eval`` {split, scenes, input_views}, ``empty_weight``, ``class_names`` (default ScanNet-20),
``out_dir``, ``threads``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.images.config import ImageModelConfig
from model.images.inputs import check_views
from model.images.lifting import project, visible
from model.images.segment import IGNORE, ImageSegmentModel, point_labels, segment_config_from, voxel_targets
from model.render.cameras import Camera
from model.config_io import FORBID, from_file
from training.config_io import ConfigError, load, read_yaml
from training.data.formats import load_rgbd_frames, load_scene
from training.train_config import TrainConfig, check_threads
from training.images.config import ImageDataConfig
from training.pretrain.dataset import find_scenes
from training.pretrain.evaluate import held_out_frames

log = logging.getLogger(__name__)


@dataclass
class SegmentEvalConfig:
    split: str = "val"
    scenes: int = 2
    input_views: int = 5


@dataclass
class ImageSegmentTrainConfig:
    """Every section by the typed loader; ``model`` is an ``ImageModelConfig`` mapping (its defaults when absent)."""

    __pydantic_config__ = FORBID
    model: ImageModelConfig = field(default_factory=ImageModelConfig)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: SegmentEvalConfig = field(default_factory=SegmentEvalConfig)
    init: str | None = None          # a pre-trained image model folder: its trunk starts the segmenter
    empty_weight: float = 0.2        # cross-entropy weight of the empty-space class
    val_fraction: float = 0.3        # rooms generated into the val split
    class_names: tuple[str, ...] = ()  # default: ScanNet-20
    out_dir: str = "runs/segment-images"
    threads: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ImageSegmentTrainConfig":
        cfg = load(cls, data)
        cfg.train.validate()
        check_threads(cfg.threads)
        if not cfg.class_names:
            from training.data.classes import SCANNET20_NAMES

            cfg.class_names = tuple(SCANNET20_NAMES)
        if cfg.data.input_views < 2:
            raise ConfigError(f"data.input_views must be >= 2, got {cfg.data.input_views}")
        if cfg.empty_weight < 0 or not 0 < cfg.val_fraction < 1:
            raise ConfigError(f"empty_weight must be >= 0 and val_fraction in (0, 1), got {cfg.empty_weight}, "
                              f"{cfg.val_fraction}")
        return cfg


def load_segment_config(path: str | Path) -> ImageSegmentTrainConfig:
    return from_file(path, read_yaml, ImageSegmentTrainConfig.from_dict)


def ensure_segment_data(cfg: ImageSegmentTrainConfig) -> None:
    """Generate the rooms (train + val splits, RGB-D frames) when ``data.root`` does not exist yet."""
    from training.data.synthetic import SceneConfig, generate_dataset
    from training.data.synthetic.dataset import needs_generation

    root, gen = Path(cfg.data.root), cfg.data.generate
    if gen is None or not needs_generation(root, gen.scenes):  # an incomplete generation is refused there
        return
    log.info("generating %d synthetic rooms into %s", gen.scenes, root)
    scene_cfg = SceneConfig(num_frames=gen.frames, image_downscale=gen.image_downscale,
                            points_per_m2=gen.points_per_m2, room_x=tuple(gen.room_x), room_y=tuple(gen.room_y))
    generate_dataset(root, gen.scenes, gen.seed, scene_cfg,
                     splits=(("train", 1 - cfg.val_fraction), ("val", cfg.val_fraction)), progress=True)


# ------------------------------------------------------------------------------------------ samples


class RoomViews:
    """Per room: ``input_views`` RGB frames with their cameras, the lifted box, and the labelled points."""

    def __init__(self, cfg: ImageDataConfig, split: str, max_scenes: int | None = None):
        data = dataclasses.replace(cfg.scene_data(), split=split, max_scenes=max_scenes)
        self.cfg = cfg
        self.scenes = find_scenes(data, split=split)

    def __len__(self) -> int:
        return len(self.scenes)

    def sample(self, index: int, frames) -> dict[str, Any]:
        entry = self.scenes[index]
        raw = load_scene(entry.points)
        v = load_rgbd_frames(entry.rgbd, [int(f) for f in frames])
        m = self.cfg.bounds_margin
        coord = raw["coord"].astype(np.float32)
        return {"images": v["rgb"], "K": v["intrinsic"][:, :3, :3].astype(np.float32),
                "w2c": v["extrinsic"].astype(np.float32),
                "bounds": np.stack([coord.min(0) - m, coord.max(0) + m]).astype(np.float32),
                "coord": coord, "segment": raw["segment"].astype(np.int64), "scene_id": entry.scene_id}


class ImageSegmenter(ImageSegmentModel):
    """ImageSegmentModel whose ``forward`` returns the losses of a collated batch (so DDP wraps it)."""

    empty_weight: float = 0.2

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        images = batch["images"].permute(0, 1, 4, 2, 3).float() / 255.0
        logits, lifted = super().forward(images, batch["K"], batch["w2c"], batch["bounds"])
        render = self.cfg.trunk.render
        k = self.cfg.num_classes
        targets = torch.stack([voxel_targets(batch["coord"][b], batch["segment"][b], cube, render.grid_shape,
                                             render.field.norm_padding, lifted.count[b], k)
                               for b, cube in enumerate(lifted.cubes)])
        weight = torch.ones(k + 1, device=logits.device)
        weight[k] = self.empty_weight
        flat = logits.flatten(2)  # (B, K + 1, Z·Y·X)
        loss = F.cross_entropy(flat, targets, weight=weight, ignore_index=IGNORE)
        valid = targets != IGNORE
        acc = (flat.argmax(1)[valid] == targets[valid]).float().mean() if valid.any() else loss.new_zeros(())
        return {"loss": loss, "voxel_acc": acc.detach()}


def build_segmenter(cfg: ImageSegmentTrainConfig) -> ImageSegmenter:
    """Weights drawn from ``cfg.train.seed``; the trunk from ``cfg.init`` (a pre-trained image model) if set."""
    torch.manual_seed(cfg.train.seed)
    trunk_cfg = cfg.model
    state = None
    if cfg.init:
        from model.images.checkpoint import load_image_model

        pre = load_image_model(cfg.init)
        trunk_cfg, state = pre.cfg, pre.state_dict()
    model = ImageSegmenter(segment_config_from(trunk_cfg, cfg.class_names))
    model.empty_weight = cfg.empty_weight
    if state is not None:
        model.trunk.load_state_dict(state, strict=True)
    return model


class ImageSegmentTask:
    def __init__(self, cfg: ImageSegmentTrainConfig, rooms: RoomViews | None = None):
        self.cfg = cfg
        self.rooms = rooms or RoomViews(cfg.data, cfg.data.split, cfg.data.max_scenes)
        self._frames = [np.asarray(e.frames) for e in self.rooms.scenes]  # data.frames applied by find_scenes

    def num_samples(self) -> int:
        return len(self.rooms)

    def load_sample(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        frames = self._frames[index]
        n = self.cfg.data.input_views
        return self.rooms.sample(index, rng.choice(frames, n, replace=n > len(frames)))

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        if len({s["images"].shape for s in samples}) != 1:
            raise ValueError("samples of one batch must share their image shape and view count")
        stack = lambda key: torch.from_numpy(np.stack([s[key] for s in samples]))  # noqa: E731
        return {"images": stack("images"), "K": stack("K"), "w2c": stack("w2c"), "bounds": stack("bounds"),
                "coord": [torch.from_numpy(s["coord"]) for s in samples],
                "segment": [torch.from_numpy(s["segment"]) for s in samples],
                "scene_id": [s["scene_id"] for s in samples]}

    def losses(self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Tensor]:
        return model(batch, generator)


# ------------------------------------------------------------------------------------------ evaluation


def seen_by(points: np.ndarray, sample: dict[str, Any]) -> np.ndarray:
    """(N,) bool: the point projects inside some input view, in front of it (occlusion not modelled)."""
    h, w = sample["images"].shape[1:3]
    uv, z = project(torch.from_numpy(points), torch.from_numpy(sample["K"]), torch.from_numpy(sample["w2c"]))
    return visible(uv, z, w, h).any(0).numpy()


@torch.no_grad()
def evaluate_image_segment(model: ImageSegmentModel, cfg: ImageSegmentTrainConfig,
                           point_checkpoint: str | Path | None = None) -> dict[str, Any]:
    """mIoU of the image model (and of a point-cloud model) on the held-out rooms, all points and seen points."""
    from training.metrics import SegMetrics

    rooms = RoomViews(cfg.data, cfg.eval.split, cfg.eval.scenes)
    if not len(rooms):
        raise ValueError(f"no rooms in split {cfg.eval.split!r} of {cfg.data.root}")
    k = model.cfg.num_classes
    names = model.cfg.class_names
    image_all, image_seen = SegMetrics(k, names), SegMetrics(k, names)
    point_all = point_seen = predictor = None
    if point_checkpoint is not None:
        from model.inference import load_predictor

        predictor = load_predictor(point_checkpoint)
        point_all, point_seen = SegMetrics(k, names), SegMetrics(k, names)
    seconds = 0.0
    model.eval()
    for i, entry in enumerate(rooms.scenes):
        s = rooms.sample(i, held_out_frames(entry.frames, cfg.eval.input_views))
        h, w = s["images"].shape[1:3]
        cams = [Camera(K=s["K"][v].astype(np.float64), w2c=s["w2c"][v].astype(np.float64), width=w, height=h)
                for v in range(len(s["K"]))]
        views = check_views(list(s["images"]), cams, [str(v) for v in range(len(cams))])
        start = time.perf_counter()
        pred = point_labels(model, views, s["coord"], s["bounds"].astype(np.float64))
        seconds += time.perf_counter() - start
        seen = seen_by(s["coord"], s)
        image_all.update(pred, s["segment"])
        image_seen.update(pred[seen], s["segment"][seen])
        if predictor is not None:
            from model.pointcloud.cloud import PointCloud

            raw = load_scene(entry.points)
            result = predictor.segment(PointCloud(raw["coord"], raw.get("color"), raw.get("normal"),
                                                  source=str(entry.points)))
            point_all.update(result.labels.astype(np.int64), s["segment"])
            point_seen.update(result.labels.astype(np.int64)[seen], s["segment"][seen])
    out: dict[str, Any] = {"rooms": [e.scene_id for e in rooms.scenes], "input_views": cfg.eval.input_views,
                           "images": {"all_points": _scores(image_all), "seen_points": _scores(image_seen),
                                      "seconds_per_room": seconds / len(rooms)}}
    if point_all is not None:
        out["point_cloud"] = {"checkpoint": str(point_checkpoint), "all_points": _scores(point_all),
                              "seen_points": _scores(point_seen)}
    return out


def _scores(metrics) -> dict[str, float]:
    present = metrics.target > 0
    return {"mIoU": round(metrics.miou, 4), "mIoU_present_classes": round(float(np.mean(metrics.iou[present])), 4)
            if present.any() else 0.0, "allAcc": round(metrics.allacc, 4), "points": int(metrics.target.sum())}
