"""Build a model from its ModelConfig (a dict of constructors keyed by kind)."""

from __future__ import annotations

from typing import Callable

from torch import nn

from model.backbones import SpUNetV1m1, SpUNetV1m3
from model.config import BackboneConfig, ModelConfig
from model.heads import LanguageGuidedSegmentor, PromptedEncoder, Segmentor


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    if cfg.type == "SpUNet-v1m1":
        return SpUNetV1m1(cfg.in_channels, cfg.num_classes, cfg.base_channels, cfg.channels, cfg.layers)
    if cfg.type == "SpUNet-v1m3":
        return SpUNetV1m3(cfg.in_channels, cfg.num_classes, cfg.base_channels, cfg.context_channels, cfg.channels,
                          cfg.layers, cfg.conditions, cfg.norm_decouple, cfg.norm_adaptive, cfg.norm_affine)
    raise ValueError(f"unknown backbone type {cfg.type!r}; expected 'SpUNet-v1m1' or 'SpUNet-v1m3'")


def _encoder(cfg: ModelConfig) -> nn.Module:
    backbone = build_backbone(cfg.backbone)
    if cfg.backbone.type == "SpUNet-v1m3":  # a PDNorm backbone needs its condition embedding
        return PromptedEncoder(backbone, cfg.conditions, cfg.backbone.context_channels)
    return Segmentor(backbone)


def _segmentor(cfg: ModelConfig) -> nn.Module:
    return Segmentor(build_backbone(cfg.backbone))


def _ppt_backbone_segmentor(cfg: ModelConfig) -> nn.Module:
    return Segmentor(PromptedEncoder(build_backbone(cfg.backbone), cfg.conditions, cfg.backbone.context_channels))


def _ppt_segmentor(cfg: ModelConfig) -> nn.Module:
    return LanguageGuidedSegmentor(build_backbone(cfg.backbone), cfg.conditions, cfg.valid_index,
                                   cfg.backbone.context_channels, vocabulary_size=len(cfg.vocabulary))


def _pretrain(cfg: ModelConfig) -> nn.Module:
    from model.pretrain import PonderIndoor  # the render decoder is only imported when needed

    return PonderIndoor.from_config(cfg)


BUILDERS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "encoder": _encoder,
    "segmentor": _segmentor,
    "ppt-backbone-segmentor": _ppt_backbone_segmentor,
    "ppt-segmentor": _ppt_segmentor,
    "pretrain": _pretrain,
}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model of ``cfg.kind``. Optional heads are attached under fixed names: a 3D detection head as
    ``detector`` (keys ``detector.*``) and, for non-pretrain kinds, a render head as ``proj_net`` +
    ``renderer`` (the official pre-training names), so one checkpoint can segment, detect and render."""
    model = BUILDERS[cfg.kind](cfg)
    if cfg.render and cfg.kind != "pretrain":
        from model.render import PonderRenderHead, RenderHeadConfig

        head = PonderRenderHead(RenderHeadConfig.from_dict(cfg.render["head"]))
        model.proj_net, model.renderer = head.proj_net, head.renderer
        model.__dict__["render_head"] = head  # shares proj_net/renderer; not registered twice
    if cfg.detection:
        from model.detection import DetectionHead

        model.detector = DetectionHead.from_config(cfg.detection)
    return model
