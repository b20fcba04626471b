"""Detection fine-tuning for the training engine: the model (an encoder from any checkpoint + DetectionHead),
its losses, and the ``TrainTask`` that feeds the engine.

The trained model is an ``encoder`` ModelConfig with ``detection`` set, so ``build_model`` rebuilds it with
``model.detector`` and its checkpoint holds ``backbone.*`` (+ ``embedding_table.*`` for PDNorm encoders) and
``detector.*``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from model.build import build_model
from model.checkpoint import load_checkpoint
from model.config import ModelConfig

from .config import DetectConfig, LossConfig
from .dataset import DetectionSamples, DetectionScenes, collate, find_scene_dirs
from .losses import detection_losses

log = logging.getLogger(__name__)


def detection_model_config(cfg: DetectConfig, base: ModelConfig | None = None) -> ModelConfig:
    """The ModelConfig of the detector: the encoder of ``base`` (an init checkpoint's config) or of
    ``cfg.model.backbone``, plus the head."""
    m = cfg.model
    if base is not None:
        backbone = dataclasses.replace(base.backbone, num_classes=0)
        conditions, features, grid = base.conditions, base.input_features, m.grid_size or base.grid_size
    else:
        backbone = m.backbone_config()
        conditions, features, grid = tuple(m.conditions), tuple(m.input_features), m.grid_size or 0.02
    head = m.head_config(backbone.out_channels, cfg.data.class_names)
    return ModelConfig(kind="encoder", backbone=backbone, conditions=conditions, grid_size=grid,
                       input_features=features, detection=head, name=m.name,
                       description="3D object detection: encoder + voting DetectionHead (ponder train detect)")


def build_detector(cfg: DetectConfig, init: str | None = None) -> tuple[nn.Module, ModelConfig]:
    """The detector (``build_model``) with its encoder weights copied from ``init`` (default: cfg.model.init).

    Encoder weights (everything but ``detector.*``, and a segmentor's ``final`` classifier) must match the init
    checkpoint in name and shape; the head starts from ``train.seed``, or from the checkpoint when it already
    holds a head of the same configuration."""
    init = init or cfg.model.init
    torch.manual_seed(cfg.train.seed)
    base = load_checkpoint(init, trust=cfg.model.trust_init) if init else None
    model_cfg = detection_model_config(cfg, base.config if base else None)
    model = build_model(model_cfg)
    if base is not None:
        source = base.model.state_dict()
        own = model.state_dict()
        encoder_keys = [k for k in own if not k.startswith("detector.")]
        missing = [k for k in encoder_keys if k not in source or source[k].shape != own[k].shape]
        if missing:
            raise ValueError(f"{init}: the checkpoint's encoder does not fit: {len(missing)} missing or mismatched "
                             f"weights (first: {missing[:3]})")
        state = {k: source[k] for k in encoder_keys}
        if base.config.detection == model_cfg.detection:
            state.update({k: v for k, v in source.items() if k.startswith("detector.")})
            log.info("continuing from the detection head in %s", init)
        model.load_state_dict(state, strict=False)
        log.info("encoder initialised from %s (%s, %d tensors)", init, base.config.kind, len(encoder_keys))
    return model, model_cfg


class DetectorTrainer(nn.Module):
    """Training view of a detector: the same submodules (so state_dict keys are unchanged) with a ``forward``
    that returns the losses of a collated batch (what DistributedDataParallel needs)."""

    def __init__(self, model: nn.Module, loss: LossConfig, condition: str | None, freeze_backbone: bool = False):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        self.__dict__["detector_model"] = model   # keeps features(); not registered twice
        self.loss_cfg, self.condition, self.frozen = loss, condition, freeze_backbone
        if freeze_backbone:
            for name, p in self.named_parameters():
                if not name.startswith("detector."):
                    p.requires_grad_(False)

    def train(self, mode: bool = True) -> "DetectorTrainer":
        super().train(mode)
        if self.frozen:  # a frozen encoder keeps its BatchNorm statistics
            for name, child in self.named_children():
                if name != "detector":
                    child.eval()
        return self

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            features = self.detector_model.features(batch["feat"], batch["grid_coord"], batch["batch"],
                                                    self.condition)            # (N, C)
        return detection_losses(self.detector(features), batch, self.loss_cfg)


def train_scene_dirs(cfg: DetectConfig) -> list:
    """Training scenes after ``max_scenes`` and ``label_fraction`` (a seeded subset, at least one scene)."""
    dirs = find_scene_dirs(cfg.data.root, cfg.data.train_split)
    if cfg.data.max_scenes is not None:
        dirs = dirs[:cfg.data.max_scenes]
    if cfg.data.label_fraction < 1:
        count = max(1, math.ceil(cfg.data.label_fraction * len(dirs)))
        chosen = np.sort(np.random.default_rng(cfg.train.seed).permutation(len(dirs))[:count])
        dirs = [dirs[i] for i in chosen]
    return dirs


class DetectTask:
    """``TrainTask`` of ``training.engine``: augmented scenes in, detection losses out."""

    def __init__(self, cfg: DetectConfig, model_cfg: ModelConfig):
        self.cfg = cfg
        self.scenes = DetectionScenes(train_scene_dirs(cfg), cfg.data.class_names)
        self.samples = DetectionSamples(self.scenes, model_cfg.grid_size, model_cfg.input_features, cfg.augment,
                                        cfg.loss.instance_balance)

    def num_samples(self) -> int:
        return len(self.samples)

    def load_sample(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        return self.samples.load(index, rng)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Tensor]:
        return collate(samples)

    def losses(self, model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        return model(batch)
