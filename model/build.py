"""Build a model from its ModelConfig (a dict of constructors keyed by kind).

``engine=False`` builds the spconv modules (training, ``--backend spconv``); ``engine=True`` the same module
tree and state_dict layout with engine-backed backbones (`model.backbones.engine_backed`): inference without
importing spconv. spconv is imported only when a spconv backbone is built.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from model.config import BackboneConfig, ModelConfig
from model.heads import LanguageGuidedSegmentor, PromptedEncoder, Segmentor

Backbone = Callable[[], nn.Module]  # builds the backbone when the wrapper's construction order needs it


def build_backbone(cfg: BackboneConfig, engine: bool = False) -> nn.Module:
    if engine:
        from model.backbones.engine_backed import build_engine_backed

        return build_engine_backed(cfg)
    if cfg.type == "SpUNet-v1m1":
        from model.backbones.spunet_v1m1 import SpUNetV1m1  # imports spconv

        return SpUNetV1m1(cfg.in_channels, cfg.num_classes, cfg.base_channels, cfg.channels, cfg.layers)
    if cfg.type == "SpUNet-v1m3":
        from model.backbones.spunet_v1m3 import SpUNetV1m3  # imports spconv

        return SpUNetV1m3(cfg.in_channels, cfg.num_classes, cfg.base_channels, cfg.context_channels, cfg.channels,
                          cfg.layers, cfg.conditions, cfg.norm_decouple, cfg.norm_adaptive, cfg.norm_affine)
    raise ValueError(f"unknown backbone type {cfg.type!r}; expected 'SpUNet-v1m1' or 'SpUNet-v1m3'")


def _encoder(cfg: ModelConfig, backbone: Backbone) -> nn.Module:
    if cfg.backbone.type == "SpUNet-v1m3":  # a PDNorm backbone needs its condition embedding
        return PromptedEncoder(backbone(), cfg.conditions, cfg.backbone.context_channels)
    return Segmentor(backbone())


def _segmentor(cfg: ModelConfig, backbone: Backbone) -> nn.Module:
    return Segmentor(backbone())


def _ppt_backbone_segmentor(cfg: ModelConfig, backbone: Backbone) -> nn.Module:
    return Segmentor(PromptedEncoder(backbone(), cfg.conditions, cfg.backbone.context_channels))


def _ppt_segmentor(cfg: ModelConfig, backbone: Backbone) -> nn.Module:
    return LanguageGuidedSegmentor(backbone(), cfg.conditions, cfg.valid_index, cfg.backbone.context_channels,
                                   vocabulary_size=len(cfg.vocabulary))


def _pretrain(cfg: ModelConfig, backbone: Backbone) -> nn.Module:
    from model.pretrain import PonderIndoor  # the render decoder is only imported when needed

    return PonderIndoor.from_config(cfg, backbone)


BUILDERS: dict[str, Callable[[ModelConfig, Backbone], nn.Module]] = {
    "encoder": _encoder,
    "segmentor": _segmentor,
    "ppt-backbone-segmentor": _ppt_backbone_segmentor,
    "ppt-segmentor": _ppt_segmentor,
    "pretrain": _pretrain,
}


def build_model(cfg: ModelConfig, engine: bool = False) -> nn.Module:
    """The model of ``cfg.kind``. Optional heads are attached under fixed names: a 3D detection head as
    ``detector`` (keys ``detector.*``) and, for non-pretrain kinds, a render head as ``proj_net`` +
    ``renderer`` (the official pre-training names), so one checkpoint can segment, detect and render.
    ``engine``: engine-backed backbone (inference only, no spconv), same state_dict layout."""
    if cfg.kind not in BUILDERS:
        raise ValueError(f"unknown model kind {cfg.kind!r}; expected one of {list(BUILDERS)}")
    model = BUILDERS[cfg.kind](cfg, lambda: build_backbone(cfg.backbone, engine=engine))
    if cfg.render and cfg.kind != "pretrain":
        from model.render import PonderRenderHead

        head = PonderRenderHead(cfg.render.head)
        model.proj_net, model.renderer = head.proj_net, head.renderer
        model.__dict__["render_head"] = head  # shares proj_net/renderer; not registered twice
    if cfg.detection:
        from model.detection import DetectionHead

        model.detector = DetectionHead.from_config(cfg.detection)
    if engine:
        from model.backbones.engine_backed import attach_all

        attach_all(model, cfg)
    return model
