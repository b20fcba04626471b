"""Configuration of semantic-segmentation fine-tuning (spec §7.4, §9), read from YAML.

Sections: ``model`` (head and the backbone used for random initialisation), ``data``, ``train`` (the
engine's ``TrainConfig``, with ``optim``), ``init`` (the pre-trained checkpoint and how its keys map),
``evaluate`` and ``out_dir``. See training/configs/segment-scannet.yaml (official values) and
segment-small-cpu.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from model.config import BackboneConfig
from model.config_io import FORBID, from_file
from training.config_io import ConfigError, dump, load, read_yaml
from training.data.classes import SCANNET20_NAMES
from training.train_config import TrainConfig

HEADS = ("language", "linear")
LABEL_MODES = ("points", "scenes")
EVAL_MODES = ("fast", "precise", "none")


@dataclass
class SegModelConfig:
    """head "language": PPT-v1m1 (cosine similarity to the class text embeddings, SpUNet-v1m3 only);
    "linear": the backbone's ``final`` 1x1 conv (DefaultSegmentor; PPT backbone mode for SpUNet-v1m3).

    The backbone, grid size and input features here are used for random initialisation; with a
    pre-trained checkpoint they are taken from it (``init.architecture_from_checkpoint``)."""

    head: str = "linear"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    grid_size: float = 0.02
    input_features: tuple[str, ...] = ("color", "normal")
    logit_scale: float = 4.605170249938965  # ln(100), CLIP's value; only used without a checkpoint
    name: str = "ponder-segment"


@dataclass
class SegDataConfig:
    """Point scenes at ``<root>/<split>/<scene>`` (Pointcept folder or PonderV2 ``.pth``), ids from
    ``<root>/<split>.txt`` when present.

    label_fraction / label_mode (the data-efficient setting): "points" keeps the labels of a seeded random
    ``label_fraction`` of each training scene's labelled points (the rest become -1); "scenes" trains on a
    seeded random ``label_fraction`` of the scenes only. The choice depends on ``label_seed`` and the scene
    name, never on the epoch, so every epoch sees the same labels."""

    root: str = "data/scannet"
    train_split: str = "train"
    val_split: str = "val"
    condition: str = "ScanNet"
    class_names: tuple[str, ...] = SCANNET20_NAMES
    augment: str = "official"            # "official" fine-tune pipeline, or "none" (CenterShift + GridSample)
    point_max: int | None = 100_000      # SphereCrop limit (ScanNet); None: no crop
    mix_prob: float = 0.0                # Mix3D: probability that a batch overlays its scenes pairwise
    label_fraction: float = 1.0
    label_mode: str = "points"
    label_seed: int = 0
    max_scenes: int | None = None        # use only the first N scenes of the split (quick runs)


@dataclass
class InitConfig:
    """Official CheckpointLoader semantics: keys (with the ``module.`` prefix) have every occurrence of
    ``keywords`` replaced by ``replacement``; matching keys are loaded with strict=False. ``keywords: null``
    chooses the official mapping for the model kind (``module.`` -> ``module.backbone.`` for PPT backbone mode,
    as the ScanNet200 config does; no change otherwise)."""

    checkpoint: str | None = None
    keywords: str | None = None
    replacement: str | None = None
    architecture_from_checkpoint: bool = True
    trust: bool = False                  # allow full unpickling of an official .pth


@dataclass
class EvalConfig:
    mode: str = "fast"                   # after training: "fast", "precise" (13 TTA) or "none"
    split: str | None = None             # default: data.val_split
    max_scenes: int | None = None


@dataclass
class SegmentConfig:
    __pydantic_config__ = FORBID  # also refuses unknown keys in every section nested here
    model: SegModelConfig = field(default_factory=SegModelConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    init: InitConfig = field(default_factory=InitConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    out_dir: str = "runs/segment"

    def validate(self) -> None:
        m, d = self.model, self.data
        self.train.validate()
        _choice("model.head", m.head, HEADS)
        _choice("data.label_mode", d.label_mode, LABEL_MODES)
        _choice("evaluate.mode", self.evaluate.mode, EVAL_MODES)
        _choice("data.augment", d.augment, ("official", "none"))
        if not 0 < d.label_fraction <= 1:
            raise ConfigError(f"data.label_fraction must lie in (0, 1], got {d.label_fraction}")
        if not 0 <= d.mix_prob <= 1:
            raise ConfigError(f"data.mix_prob must lie in [0, 1], got {d.mix_prob}")
        if d.point_max is not None and d.point_max < 1:
            raise ConfigError(f"data.point_max must be positive or null, got {d.point_max}")
        if not m.grid_size > 0:
            raise ConfigError(f"model.grid_size must be positive, got {m.grid_size}")
        if not d.class_names:
            raise ConfigError("data.class_names is empty")


def load_config(path: str | Path) -> SegmentConfig:
    return from_file(path, read_yaml, config_from_dict)


def config_from_dict(data: Mapping[str, Any]) -> SegmentConfig:
    cfg = load(SegmentConfig, data, "config")  # errors name "config.<section>.<key>", as they always have
    cfg.validate()
    return cfg


def config_to_dict(cfg: SegmentConfig) -> dict[str, Any]:
    """Plain YAML-safe dict (tuples as lists), written beside a run for reproducibility."""
    return dump(cfg)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")

