"""The segmentation fine-tune task: model construction, initialisation from a pre-trained checkpoint with
the official ``CheckpointLoader`` semantics (spec §1.2), and the CE + Lovász loss for ``training.engine``.

Model kinds (``model.config.ModelConfig.kind``):
* head "linear" + SpUNet-v1m1 -> "segmentor" (DefaultSegmentor, logits from ``backbone.final``);
* head "linear" + SpUNet-v1m3 -> "ppt-backbone-segmentor" (PPT backbone mode, ``backbone.backbone.final``);
* head "language" + SpUNet-v1m3 -> "ppt-segmentor" (PPT-v1m1: ``proj_head`` + frozen ``class_embedding``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from model.build import build_model
from model.checkpoint import read_checkpoint
from model.config import PPT_CONDITIONS, PPT_VALID_INDEX, ModelConfig
from model.infer_config import PPT_VOCABULARY
from training.losses import segmentation_loss
from training.segment.config import SegmentConfig
from training.segment.dataset import SegmentDataset, collate

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ checkpoints


@dataclass
class Pretrained:
    """A source checkpoint: its state_dict (``module.`` prefix removed) and its (stored or inferred) config."""

    path: str
    state: dict[str, torch.Tensor]
    config: ModelConfig


def read_pretrained(path: str | Path, trust: bool = False) -> Pretrained:
    """Our folder (``model.safetensors`` + ``config.json``) or an official ``.pth`` container, of any kind
    (pre-training, fine-tuned segmentor, encoder)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
    state, config = read_checkpoint(path, trust)
    return Pretrained(str(path), state, config)


@dataclass
class InitReport:
    """What ``load_pretrained`` did, counted the way the official loader logs it."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)       # model keys left at their fresh initialisation
    unexpected: list[str] = field(default_factory=list)    # source keys the model has no place for
    mismatched: list[str] = field(default_factory=list)    # same key, different shape (kept fresh)

    def summary(self) -> str:
        def groups(keys: list[str]) -> str:
            counts: dict[str, int] = {}
            for key in keys:
                counts[_component(key)] = counts.get(_component(key), 0) + 1
            return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"

        return (f"init from {self.source}: loaded {len(self.loaded)} tensors ({groups(self.loaded)}); "
                f"missing {len(self.missing)} ({groups(self.missing)}); "
                f"unexpected {len(self.unexpected)} ({groups(self.unexpected)}); "
                f"shape mismatches {len(self.mismatched)} ({groups(self.mismatched)})")


def _component(key: str) -> str:
    """Report group of a key: the wrapper-level name (``class_embedding``, ``proj_head``, ``proj_net``...),
    ``backbone``, or ``backbone.final`` for the classifier, whether or not PPT backbone mode nests it."""
    parts = key.split(".")
    if parts[0] == "backbone" and len(parts) > 1 and (parts[1] == "backbone" or len(parts) == 2 or parts[1] in
                                                      ("embedding_table", "proj_head")):
        parts = parts[1:]
    if parts[0] == "backbone" and len(parts) > 1 and parts[1] == "final":
        return "backbone.final"
    return parts[0]


def map_keys(state: dict[str, torch.Tensor], keywords: str, replacement: str) -> dict[str, torch.Tensor]:
    """CheckpointLoader steps 2-4 on one process: keys carry ``module.``; every occurrence of ``keywords`` is
    replaced; the prefix is removed again. (The official single-GPU loader drops the first 7 characters
    blindly, which silently mangles prefix-less checkpoints; here the prefix is removed only where present.)"""
    if not keywords:
        return dict(state)
    out = {}
    for key, value in state.items():
        new = ("module." + key).replace(keywords, replacement)
        out[new.removeprefix("module.")] = value
    return out


def load_pretrained(model: nn.Module, source: Pretrained, keywords: str = "", replacement: str = "") -> InitReport:
    """``load_state_dict(strict=False)`` of the keys that exist in the model with the same shape."""
    state = map_keys(source.state, keywords, replacement)
    own = model.state_dict()
    report = InitReport(source.path)
    selected = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(own[key].shape) != tuple(value.shape):
            report.mismatched.append(f"{key}")
        else:
            selected[key] = value
    report.loaded = list(selected)
    report.missing = [k for k in own if k not in selected]
    model.load_state_dict(selected, strict=False)
    return report


def default_keywords(kind: str, source: Pretrained) -> tuple[str, str]:
    """The official configs' mapping: PPT backbone mode nests the encoder one level deeper."""
    nested = any(k.startswith("backbone.backbone.") for k in source.state)
    if kind == "ppt-backbone-segmentor" and not nested:
        return "module.", "module.backbone."
    return "", ""


# ------------------------------------------------------------------------------------------ model


def segment_model_config(cfg: SegmentConfig, source: ModelConfig | None = None) -> ModelConfig:
    """The fine-tuned model's config: architecture from the checkpoint (or the YAML), head and labels from the YAML."""
    m, d = cfg.model, cfg.data
    take = source is not None and cfg.init.architecture_from_checkpoint
    backbone = dataclasses.replace(source.backbone if take else m.backbone)
    grid_size = source.grid_size if take else m.grid_size
    features = tuple(source.input_features) if take else tuple(m.input_features)
    names = tuple(d.class_names)
    description = (f"fine-tuned from {cfg.init.checkpoint or 'random initialisation'} on {d.root} "
                   f"(labels {d.label_fraction:g} by {d.label_mode})")
    common = dict(grid_size=grid_size, input_features=features, name=m.name, description=description)
    if backbone.type == "SpUNet-v1m1":
        if m.head == "language":
            raise ValueError("the language-guided head (PPT-v1m1) needs a SpUNet-v1m3 (PDNorm) backbone; "
                             "use model.head: linear with SpUNet-v1m1")
        backbone.num_classes = len(names)
        return ModelConfig(kind="segmentor", backbone=backbone, class_names={"default": names}, **common)
    conditions = tuple(source.conditions) if take and source.conditions else PPT_CONDITIONS
    if d.condition not in conditions or d.condition not in backbone.conditions:
        raise ValueError(f"data.condition {d.condition!r} must be one of the model's conditions {list(conditions)} "
                         f"and of its backbone's {list(backbone.conditions)}")
    if m.head == "linear":
        backbone.num_classes = len(names)
        return ModelConfig(kind="ppt-backbone-segmentor", backbone=backbone, conditions=conditions,
                           class_names={d.condition: names}, **common)
    backbone.num_classes = 0
    if conditions != PPT_CONDITIONS:
        raise ValueError(f"the language-guided head uses the official conditions {PPT_CONDITIONS}, got {conditions}")
    rows = PPT_VALID_INDEX[conditions.index(d.condition)]
    if len(rows) != len(names):
        raise ValueError(f"condition {d.condition!r} scores {len(rows)} classes but data.class_names has {len(names)}")
    return ModelConfig(kind="ppt-segmentor", backbone=backbone, conditions=conditions, valid_index=PPT_VALID_INDEX,
                       vocabulary=PPT_VOCABULARY, class_names={d.condition: names}, **common)


def build_segment_model(cfg: SegmentConfig, source: Pretrained | None = None) -> tuple[ModelConfig, nn.Module,
                                                                                        InitReport | None]:
    """Seeded fresh model; then the checkpoint's matching tensors. Without CLIP, a fresh language head gets
    seeded random unit text embeddings and ``logit_scale`` from the config (a checkpoint's values replace them)."""
    model_cfg = segment_model_config(cfg, source.config if source else None)
    torch.manual_seed(cfg.train.seed)
    model = build_model(model_cfg)
    if model_cfg.kind == "ppt-segmentor":
        with torch.no_grad():
            emb = torch.randn(model.class_embedding.shape)
            model.class_embedding.copy_(emb / emb.norm(dim=1, keepdim=True))
            model.logit_scale.fill_(cfg.model.logit_scale)
    report = None
    if source is not None:
        keywords, replacement = default_keywords(model_cfg.kind, source)
        if cfg.init.keywords is not None:
            keywords, replacement = cfg.init.keywords, cfg.init.replacement or ""
        report = load_pretrained(model, source, keywords, replacement)
    return model_cfg, model, report


class SegmentationForward(nn.Module):
    """``forward(feat, grid_coord, batch, condition) -> logits (N, K)`` for a segmentor, so the step runs through
    DistributedDataParallel's forward. It shares the segmentor's parameter, buffer and submodule tables: its
    state_dict has the segmentor's keys and tensors, and ``.to()`` moves both."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.__dict__["net"] = net
        self._parameters, self._buffers, self._modules = net._parameters, net._buffers, net._modules
        self._non_persistent_buffers_set = net._non_persistent_buffers_set

    def forward(self, feat: torch.Tensor, grid_coord: torch.Tensor, batch: torch.Tensor,
                condition: str | None) -> torch.Tensor:
        return self.net.classify(self.net.features(feat, grid_coord, batch, condition), condition)


# ------------------------------------------------------------------------------------------ task


class SegmentTask:
    """``TrainTask`` of the engine over a ``SegmentDataset``; loss = CE + Lovász (ignore -1)."""

    def __init__(self, dataset: SegmentDataset, mix_prob: float = 0.0, condition: str | None = None):
        self.dataset, self.mix_prob = dataset, mix_prob
        self.condition = condition  # None for unconditioned (v1m1) models

    def num_samples(self) -> int:
        return len(self.dataset)

    def load_sample(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        return self.dataset.sample(index, rng)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples, self.mix_prob)

    def losses(self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        logits = model(batch["feat"], batch["grid_coord"], batch["batch"], self.condition)  # (N, K)
        return segmentation_loss(logits, batch["segment"])


# ------------------------------------------------------------------------------------------ a whole run


@dataclass
class FineTuneResult:
    model_config: ModelConfig
    model: nn.Module
    checkpoint: Path                     # our format, <out>/final
    history: list[dict[str, float]]
    init: InitReport | None
    metrics: Any = None                  # training.metrics.SegMetrics after the final evaluation


def check_labelled(dataset: SegmentDataset) -> None:
    """Refuse training data without a single labelled point (after ``label_fraction``): the loss would be 0 at
    every step and the run would "succeed" with an untrained head. Stops at the first labelled scene."""
    from training.data.formats import load_scene
    from training.segment.dataset import IGNORE_INDEX, sparse_labels

    d = dataset.cfg
    for path in dataset.scenes:
        labels = load_scene(path)["segment"]
        segment = sparse_labels(labels, d.label_fraction, d.label_seed, path.name) if d.label_mode == "points" \
            else labels
        if (segment != IGNORE_INDEX).any():
            labelled = int((labels != IGNORE_INDEX).sum())
            if d.label_mode == "points" and d.label_fraction * labelled < 1:
                log.warning("label fraction %g keeps only the minimum of 1 labelled point per scene (%s has %d): "
                            "augmentation can drop it, and a step without labels has loss 0", d.label_fraction,
                            path.name, labelled)
            return
    after = f" after label fraction {d.label_fraction:g} by {d.label_mode}" if d.label_fraction < 1 else ""
    raise ValueError(f"no labelled points in the training split {Path(d.root) / d.train_split} "
                     f"({len(dataset.scenes)} scenes{after}): every segment label is -1")


def fine_tune(cfg: SegmentConfig, out_dir: str | Path, resume: bool = False,
              before_training: Callable[[], None] | None = None) -> FineTuneResult:
    """Build, initialise, train with ``training.engine.Trainer`` (official container in ``<out>/model``, our
    format in ``<out>/final``) and evaluate on ``evaluate.split`` unless ``evaluate.mode`` is "none".
    ``before_training`` runs once the data and the resume checks have passed, before the first step (the CLI
    records ``config.yaml`` there, so a failed start leaves the run folder as it was)."""
    from model.checkpoint import LoadedModel, save_checkpoint
    from model.inference import Predictor
    from training.engine import Trainer
    from training.segment.dataset import find_scenes
    from training.segment.evaluate import evaluate_scenes

    out = Path(out_dir)
    source = read_pretrained(cfg.init.checkpoint, cfg.init.trust) if cfg.init.checkpoint else None
    model_cfg, net, report = build_segment_model(cfg, source)
    if report is not None:
        log.info("%s", report.summary())
    dataset = SegmentDataset(cfg.data, model_cfg.grid_size, model_cfg.input_features)
    check_labelled(dataset)
    condition = cfg.data.condition if model_cfg.conditions else None
    task = SegmentTask(dataset, cfg.data.mix_prob, condition)
    trainer = Trainer(SegmentationForward(net), task, cfg.train, out,
                      save_fn=lambda _module, folder: save_checkpoint(net, model_cfg, folder),
                      model_config=model_cfg.to_dict())
    if resume:
        trainer.resume()
    if before_training is not None and trainer.rank == 0:
        before_training()
    history = trainer.fit(resume=False)
    result = FineTuneResult(model_cfg, net, out / "final", history, report)
    if cfg.evaluate.mode != "none" and trainer.rank == 0:
        predictor = Predictor(LoadedModel(model_cfg, net, str(out / "final")), trainer.device)
        scenes = find_scenes(cfg.data.root, cfg.evaluate.split or cfg.data.val_split)
        scenes = scenes[:cfg.evaluate.max_scenes] if cfg.evaluate.max_scenes else scenes
        result.metrics = evaluate_scenes(predictor, scenes, condition, precise=cfg.evaluate.mode == "precise")
    return result
