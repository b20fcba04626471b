"""Configuration of detection fine-tuning (encoder + ``DetectionHead``), read from YAML.

Sections: ``model`` (where the encoder comes from, the head), ``data`` (scenes with ``boxes.npy`` /
``box_labels.npy``), ``augment``, ``loss``, ``eval``, ``train`` (``training.train_config.TrainConfig``) and
``out_dir``. See training/configs/detect-small-cpu.yaml and detect-scannet.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from model.config import BackboneConfig, DetectionConfig
from model.config_io import FORBID, from_file
from training.config_io import ConfigError, load, read_yaml
from training.data.classes import DETECTION_NAMES, SCANNET20_NAMES
from training.train_config import TrainConfig


@dataclass
class ModelSection:
    """The encoder comes from ``init`` (any checkpoint ``load_checkpoint`` reads: ours, official segmentors or
    pre-training checkpoints; only its encoder weights are used) or, without ``init``, is built from
    ``backbone``/``conditions`` with random weights. ``grid_size`` (None: the init checkpoint's, else 0.02) is
    the voxel size of training and of the saved model."""

    name: str = "ponder-detect"
    init: str | None = None
    trust_init: bool = False           # allow full unpickling of an official init checkpoint
    backbone: dict[str, Any] = field(default_factory=dict)
    conditions: tuple[str, ...] = ()
    condition: str | None = None       # condition of PDNorm/PPT encoders (default: the model's default)
    input_features: tuple[str, ...] = ("color", "normal")
    grid_size: float | None = None
    freeze_backbone: bool = False
    head: dict[str, Any] = field(default_factory=dict)  # HeadConfig fields except in_channels/class_names

    # backbone and head stay mappings (the task completes them from the init checkpoint and the data); these
    # make them the typed sections of the detector's ModelConfig, and check them on load
    def backbone_config(self) -> BackboneConfig:
        """``backbone``, the encoder trained from scratch (no classifier: ``num_classes`` 0)."""
        return load(BackboneConfig, {**self.backbone, "num_classes": 0}, "model.backbone")

    def head_config(self, in_channels: int, class_names: Sequence[str]) -> DetectionConfig:
        """``head`` on an encoder of ``in_channels`` features, for ``class_names``."""
        for reserved in ("in_channels", "class_names"):
            if reserved in self.head:
                raise ConfigError(f"model.head.{reserved} is set from the encoder / data.class_names; remove it")
        return load(DetectionConfig, {**self.head, "in_channels": in_channels, "class_names": tuple(class_names)},
                    "model.head")


@dataclass
class GenerateConfig:
    """Generate synthetic scenes into ``data.root`` when it does not exist yet (no RGB-D frames)."""

    scenes: int = 20
    seed: int = 0
    val_fraction: float = 0.25
    points_per_m2: float = 1500.0


@dataclass
class DataConfig:
    """Scenes at ``<root>/<split>/<scene>`` (Pointcept folders with boxes.npy, box_labels.npy and ideally
    instance.npy + box_instances.npy), listed by ``<root>/<split>.txt`` when present. Relative paths are
    relative to the working directory. ``class_names`` are ScanNet-20 names; boxes of other classes are ignored.
    ``label_fraction`` keeps that share of the training scenes (a seeded choice; data-efficient runs)."""

    root: str = "data/synthetic-detect"
    train_split: str = "train"
    val_split: str | None = "val"
    class_names: tuple[str, ...] = DETECTION_NAMES
    label_fraction: float = 1.0
    max_scenes: int | None = None
    generate: GenerateConfig | None = None


@dataclass
class AugmentConfig:
    """Box-aware geometry (flip → rotate → scale, applied to points, normals and boxes alike) and the shared
    colour/point transforms of training/transforms.py."""

    enabled: bool = True
    quarter_turns: bool = True            # random multiple of 90° about z
    rotate_deg: float = 10.0              # plus U(-rotate_deg, rotate_deg)
    flip: float = 0.5                     # probability of mirroring x, and independently y
    scale: tuple[float, float] = (0.9, 1.1)
    dropout: float = 0.0                  # RandomDropout ratio (p = 0.5)
    jitter: float = 0.005                 # RandomJitter sigma (metres), 0 = off
    color: bool = True                    # ChromaticAutoContrast / Translation / Jitter


@dataclass
class LossConfig:
    objectness: float = 1.0
    classification: float = 1.0
    offset: float = 1.0
    size: float = 1.0
    yaw: float = 0.5
    instance_balance: float = 0.5         # voxel weight ∝ (voxels of its object)^-balance; 0 = every voxel equal


@dataclass
class EvalConfig:
    score_threshold: float = 0.05         # low, so AP sees the whole ranking
    report_score: float = 0.3             # recall is also reported for boxes scoring at least this
    iou_thresholds: tuple[float, ...] = (0.25, 0.5)
    after_train: bool = True              # evaluate on data.val_split when training ends


@dataclass
class DetectConfig:
    __pydantic_config__ = FORBID  # also refuses unknown keys in every section nested here
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = "runs/detect"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DetectConfig":
        cfg = load(cls, data)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        self.train.validate()
        unknown = [n for n in self.data.class_names if n not in SCANNET20_NAMES]
        if unknown or not self.data.class_names:
            raise ConfigError(f"data.class_names must be ScanNet-20 names; unknown: {unknown} "
                              f"(known: {list(SCANNET20_NAMES)})")
        if not 0 < self.data.label_fraction <= 1:
            raise ConfigError(f"data.label_fraction must lie in (0, 1], got {self.data.label_fraction}")
        if self.model.grid_size is not None and not self.model.grid_size > 0:
            raise ConfigError(f"model.grid_size must be positive, got {self.model.grid_size}")
        if self.model.init is None and not self.model.backbone:
            raise ConfigError("give model.init (a checkpoint) or model.backbone (an architecture to train from scratch)")
        if self.model.backbone:
            self.model.backbone_config()
        self.model.head_config(1, self.data.class_names)
        lo, hi = self.augment.scale
        if not 0 < lo <= hi:
            raise ConfigError(f"augment.scale must be (low, high) with 0 < low <= high, got {self.augment.scale}")
        if not 0 <= self.augment.dropout < 1:
            raise ConfigError(f"augment.dropout must lie in [0, 1), got {self.augment.dropout}")
        for t in self.eval.iou_thresholds:
            if not 0 < t < 1:
                raise ConfigError(f"eval.iou_thresholds must lie in (0, 1), got {t}")


def load_config(path: str | Path) -> DetectConfig:
    return from_file(path, read_yaml, DetectConfig.from_dict)
