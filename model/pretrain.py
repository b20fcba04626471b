"""PonderIndoor-v2: the rendering pre-training model (spec §5) = sparse backbone + condition embedding +
the render head (``proj_net`` UNet3D and the NeuS ``renderer``), with the official state_dict layout:
``[mtoken], logit_scale, class_embedding, backbone.*, proj_net.*, renderer.field.*, embedding_table.weight,
[proj_head.*]``.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from model.conditions import condition_index
from model.config import ModelConfig
from model.config_io import ConfigError
from model.render import PonderRenderHead, infer_head_config
from model.render.config import RenderSection


def infer_render_config(sd: Mapping[str, Tensor]) -> RenderSection:
    """The ``render`` section of a ModelConfig, read off a (prefix-stripped) pre-training state_dict."""
    return RenderSection(head=infer_head_config(sd), proj_head="proj_head.weight" in sd,
                         semantic="class_embedding" in sd,
                         mask_channels=int(sd["mtoken"].shape[1]) if "mtoken" in sd else 0)


class PonderIndoor(nn.Module):
    def __init__(self, backbone: nn.Module, head: PonderRenderHead, conditions: tuple[str, ...],
                 valid_index: tuple[tuple[int, ...], ...], context_channels: int, vocabulary_size: int,
                 semantic: bool = True, proj_head: bool = True, mask_channels: int = 0, embed_dim: int = 512):
        super().__init__()
        self.conditions, self.valid_index = tuple(conditions), tuple(tuple(v) for v in valid_index)
        if mask_channels:
            self.mtoken = nn.Parameter(torch.zeros(1, mask_channels))
        if semantic:
            self.logit_scale = nn.Parameter(torch.zeros(()), requires_grad=False)
            self.register_buffer("class_embedding", torch.zeros(vocabulary_size, embed_dim))
        self.backbone = backbone
        self.proj_net = head.proj_net      # registered at the top level, as in the official model
        self.renderer = head.renderer
        self.embedding_table = nn.Embedding(len(self.conditions), context_channels)
        if semantic and proj_head:
            self.proj_head = nn.Linear(backbone.out_channels, embed_dim)
        # The head object shares proj_net/renderer; kept out of the module tree so keys are not duplicated.
        self.__dict__["render_head"] = head

    @classmethod
    def from_config(cls, cfg: ModelConfig, backbone: Callable[[], nn.Module] | None = None) -> "PonderIndoor":
        """``backbone``: builds the encoder (default: the spconv SpUNet of ``cfg.backbone``; model.build passes the
        engine-backed one for inference). The head is built first, then the backbone (the random init of a run)."""
        from model.build import build_backbone

        render = cfg.render
        if render is None:
            raise ConfigError("a pretrain model config needs a render section (the render head)")
        head = PonderRenderHead(render.head)
        encoder = backbone() if backbone is not None else build_backbone(cfg.backbone)
        return cls(encoder, head, cfg.conditions, cfg.valid_index, cfg.backbone.context_channels,
                   len(cfg.vocabulary), semantic=render.semantic, proj_head=render.proj_head,
                   mask_channels=render.mask_channels)

    has_classifier = False

    def context(self, condition: str | None) -> Tensor:
        return self.embedding_table.weight[condition_index(self.conditions, condition)][None]  # (1, ctx)

    def features(self, feat: Tensor, grid_coord: Tensor, batch: Tensor, condition: str | None = None) -> Tensor:
        """Backbone features (N, C); the v1m1 backbone ignores the condition context."""
        context = self.context(condition) if self.conditions else None
        return self.backbone.forward_features(feat, grid_coord, batch, condition, context)

    def classify(self, features: Tensor, condition: str | None = None) -> Tensor:
        raise ValueError("a pre-training checkpoint has no segmentation head; fine-tune one with `ponder train segment`")

    def volume(self, backbone_feat: Tensor, coord: Tensor, offsets: Tensor, scenes=None) -> Tensor:
        """Dense render volume (B, C, Z, Y, X) from backbone features and metric point coordinates."""
        return self.render_head(backbone_feat, coord, offsets, scenes)
