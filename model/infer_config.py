"""Infer a ModelConfig from an official state_dict (official checkpoints carry no config)."""

from __future__ import annotations

import re

import torch

from model.config import (BACKBONE_CONDITIONS, DATASET_CLASS_NAMES, PPT_CONDITIONS, PPT_VALID_INDEX,
                          SCANNET20_NAMES, S3DIS_NAMES, BackboneConfig, ModelConfig)

PPT_VOCABULARY = ("wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
                  "bookcase", "picture", "counter", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
                  "ceiling", "refrigerator", "television", "shower curtain", "nightstand", "toilet", "sink", "lamp",
                  "bathtub", "garbagebin", "board", "beam", "column", "clutter", "otherstructure", "otherfurniture",
                  "otherprop")
KNOWN_LABEL_SETS = {20: SCANNET20_NAMES, 13: S3DIS_NAMES}


def infer_backbone(sd: dict[str, torch.Tensor], prefix: str) -> BackboneConfig:
    """Read channels, blocks per stage, classes and PDNorm settings off the backbone's keys."""
    keys = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if "conv_input.0.weight" in keys:
        kind, stem = "SpUNet-v1m1", keys["conv_input.0.weight"]
    elif "conv_input.conv.weight" in keys:
        kind, stem = "SpUNet-v1m3", keys["conv_input.conv.weight"]
    else:
        raise ValueError(f"no SpUNet stem under {prefix!r} (expected {prefix}conv_input.0.weight or "
                         f"{prefix}conv_input.conv.weight)")
    conv = "0" if kind == "SpUNet-v1m1" else "conv"
    stages = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"down\.(\d+)\.", k)))
    down = [keys[f"down.{s}.{conv}.weight"].shape[0] for s in range(stages)]
    up = [keys[f"up.{s}.{conv}.weight"].shape[0] for s in reversed(range(stages))]  # up.3 … up.0

    def blocks(part: str, s: int) -> int:
        return len({m.group(1) for k in keys if (m := re.match(rf"{part}\.{s}\.block(\d+)\.", k))})

    layers = [blocks("enc", s) for s in range(stages)] + [blocks("dec", s) for s in reversed(range(stages))]
    cfg = BackboneConfig(type=kind, in_channels=stem.shape[-1], base_channels=stem.shape[0],
                         num_classes=keys["final.weight"].shape[0] if "final.weight" in keys else 0,
                         channels=tuple(down + up), layers=tuple(layers))
    if kind == "SpUNet-v1m3":
        norm = "conv_input.bn."
        banks = len({m.group(1) for k in keys if (m := re.match(rf"{re.escape(norm)}bns\.(\d+)\.", k))})
        cfg.norm_decouple = banks > 0
        cfg.norm_adaptive = f"{norm}modulation.1.weight" in keys
        cfg.norm_affine = f"{norm}bns.0.weight" in keys or f"{norm}bn.weight" in keys
        if cfg.norm_adaptive:
            cfg.context_channels = keys[f"{norm}modulation.1.weight"].shape[1]
        cfg.conditions = BACKBONE_CONDITIONS if banks == 3 else tuple(f"condition{i}" for i in range(max(banks, 1)))
    return cfg


def _wrapper_conditions(rows: int) -> tuple[str, ...]:
    return PPT_CONDITIONS if rows == 3 else ("ScanNet",) if rows == 1 else tuple(f"condition{i}" for i in range(rows))


def infer_config(sd: dict[str, torch.Tensor]) -> ModelConfig:
    """Kind, architecture, conditions and class names of an official (prefix-stripped) state_dict."""
    if any(k.startswith("backbone.backbone.") for k in sd):  # PPT in backbone_mode under a DefaultSegmentor
        backbone = infer_backbone(sd, "backbone.backbone.")
        conditions = _wrapper_conditions(sd["backbone.embedding_table.weight"].shape[0])
        return ModelConfig(kind="ppt-backbone-segmentor", backbone=backbone, conditions=conditions,
                           class_names=_label_names(backbone.num_classes, conditions))
    backbone = infer_backbone(sd, "backbone.")
    if any(k.startswith("proj_net.") for k in sd):
        from model.pretrain import infer_render_config

        conditions = _wrapper_conditions(sd["embedding_table.weight"].shape[0])
        return ModelConfig(kind="pretrain", backbone=backbone, conditions=conditions,
                           valid_index=_valid_index(sd, conditions), vocabulary=_vocabulary(sd),
                           render=infer_render_config(sd))
    if "proj_head.weight" in sd and "class_embedding" in sd:
        conditions = _wrapper_conditions(sd["embedding_table.weight"].shape[0])
        valid_index = _valid_index(sd, conditions)
        names = {c: DATASET_CLASS_NAMES[c] for c, idx in zip(conditions, valid_index)
                 if c in DATASET_CLASS_NAMES and len(DATASET_CLASS_NAMES[c]) == len(idx)}
        return ModelConfig(kind="ppt-segmentor", backbone=backbone, conditions=conditions, valid_index=valid_index,
                           vocabulary=_vocabulary(sd), class_names=names)
    if "embedding_table.weight" in sd:
        conditions = _wrapper_conditions(sd["embedding_table.weight"].shape[0])
        return ModelConfig(kind="encoder", backbone=backbone, conditions=conditions,
                           class_names=_label_names(backbone.num_classes, conditions))
    kind = "segmentor" if backbone.num_classes > 0 else "encoder"
    return ModelConfig(kind=kind, backbone=backbone, class_names=_label_names(backbone.num_classes, ()))


def _vocabulary(sd: dict[str, torch.Tensor]) -> tuple[str, ...]:
    rows = sd["class_embedding"].shape[0] if "class_embedding" in sd else 0
    if rows == len(PPT_VOCABULARY):
        return PPT_VOCABULARY
    if rows == len(SCANNET20_NAMES):
        return SCANNET20_NAMES
    return tuple(f"class{i}" for i in range(rows))


def _valid_index(sd: dict[str, torch.Tensor], conditions: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    rows = sd["class_embedding"].shape[0] if "class_embedding" in sd else 0
    if conditions == PPT_CONDITIONS and rows == len(PPT_VOCABULARY):
        return PPT_VALID_INDEX
    return tuple(tuple(range(rows)) for _ in conditions)


def _label_names(num_classes: int, conditions: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    if num_classes == 0:
        return {}
    names = KNOWN_LABEL_SETS.get(num_classes, tuple(f"class{i}" for i in range(num_classes)))
    return {c: names for c in conditions} if conditions else {"default": names}
