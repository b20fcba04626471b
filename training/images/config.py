"""Configuration of image pre-training, read from YAML (sections ``model``, ``data``, ``train``, ``eval``,
``out_dir``, ``threads``); see training/configs/pretrain-images-small-cpu.yaml. ``model`` is an
``model.images.ImageModelConfig`` mapping."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from model.config_io import FORBID, from_file
from model.images.config import ImageModelConfig
from training.config_io import ConfigError, load, read_yaml
from training.train_config import TrainConfig, check_threads
from training.pretrain.config import DataConfig, FrameConfig, GenerateConfig


@dataclass
class ImageDataConfig:
    """Scenes and RGB-D exports in the layouts of ``training.pretrain`` (``ponder datasets generate`` writes
    them). Each sample draws ``input_views + target_views`` distinct frames of the ``frames`` selection: the
    first are the model's input (RGB only), the rest the rendering targets (RGB + depth). The lifted box is
    the scene's point-cloud bounding box grown by ``bounds_margin`` metres."""

    root: str = "data/scannet"
    split: str = "train"
    rgbd_root: str | None = None
    input_views: int = 5
    target_views: int = 2
    frames: FrameConfig = field(default_factory=FrameConfig)
    max_scenes: int | None = None
    bounds_margin: float = 0.05
    generate: GenerateConfig | None = None

    def scene_data(self) -> DataConfig:
        """The point-cloud task's DataConfig for the same scenes (``find_scenes``)."""
        return DataConfig(root=self.root, split=self.split, rgbd_root=self.rgbd_root, frames=self.frames,
                          max_scenes=self.max_scenes, generate=self.generate)


@dataclass
class ImageEvalConfig:
    """Held-out views: inputs are ``input_views`` frames spread over the training ``data.frames`` selection;
    targets are ``views`` frames of ``frames`` (e.g. the ones training never sees), first ``scenes`` scenes."""

    split: str = "train"
    frames: FrameConfig = field(default_factory=lambda: FrameConfig(start=1, stop=None, step=2))
    scenes: int = 1
    views: int = 2
    chunk: int = 4096


@dataclass
class ImagePretrainConfig:
    """Every section by the typed loader; ``model`` is an ``ImageModelConfig`` mapping."""

    __pydantic_config__ = FORBID  # also refuses unknown keys in every section nested here
    model: ImageModelConfig
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: ImageEvalConfig = field(default_factory=ImageEvalConfig)
    out_dir: str = "runs/pretrain-images"
    threads: int | None = None
    image_weights: str | None = None  # local torchvision-layout ResNet state_dict to start the 2D backbone from

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ImagePretrainConfig":
        cfg = load(cls, data)
        cfg.train.validate()
        check_threads(cfg.threads)
        if cfg.data.input_views < 2 or cfg.data.target_views < 1:
            raise ConfigError(f"data.input_views must be >= 2 and data.target_views >= 1, got "
                              f"{cfg.data.input_views}, {cfg.data.target_views}")
        return cfg


def load_config(path: str | Path) -> ImagePretrainConfig:
    return from_file(path, read_yaml, ImagePretrainConfig.from_dict)
