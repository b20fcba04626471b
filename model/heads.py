"""Model wrappers that the published checkpoints carry: the DefaultSegmentor, the PPT-v1m1
language-guided segmentor, and PPT's backbone mode (prompted encoder).

Every wrapper offers the same two steps, so inference, training and export treat them alike:
``features(feat, grid_coord, batch, condition) -> (N, C)`` and ``classify(features, condition) -> (N, K)``.
"""

from __future__ import annotations

import torch
from torch import nn

from model.conditions import condition_index


class Segmentor(nn.Module):
    """DefaultSegmentor: ``backbone.*`` only; logits from the backbone's ``final`` 1x1 conv."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    @property
    def has_classifier(self) -> bool:
        return self.backbone.num_classes > 0

    def features(self, feat, grid_coord, batch, condition: str | None = None) -> torch.Tensor:
        return self.backbone.forward_features(feat, grid_coord, batch, condition)

    def classify(self, features: torch.Tensor, condition: str | None = None) -> torch.Tensor:
        return self.backbone.classify(features)


class PromptedEncoder(nn.Module):
    """PPT-v1m1 with ``backbone_mode=True``: a PDNorm backbone plus the condition ``embedding_table``.

    ``conditions`` is the wrapper's order (embedding rows), which differs from the backbone's BN-bank order.
    """

    def __init__(self, backbone: nn.Module, conditions: tuple[str, ...], context_channels: int):
        super().__init__()
        self.conditions = tuple(conditions)
        self.backbone = backbone
        self.embedding_table = nn.Embedding(len(self.conditions), context_channels)

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    @property
    def out_channels(self) -> int:
        return self.backbone.out_channels

    @property
    def has_classifier(self) -> bool:
        return self.backbone.num_classes > 0

    def context(self, condition: str | None) -> torch.Tensor:
        return self.embedding_table.weight[condition_index(self.conditions, condition)][None]  # (1, ctx)

    def forward_features(self, feat, grid_coord, batch, condition: str | None = None) -> torch.Tensor:
        return self.backbone.forward_features(feat, grid_coord, batch, condition, self.context(condition))

    features = forward_features

    def classify(self, features: torch.Tensor, condition: str | None = None) -> torch.Tensor:
        return self.backbone.classify(features)


class LanguageGuidedSegmentor(nn.Module):
    """PPT-v1m1 (``backbone_mode=False``): cosine similarity between projected point features and the
    frozen CLIP text embeddings of each condition's classes, scaled by ``exp(logit_scale)``.

    Registration order reproduces the official state_dict: logit_scale, class_embedding, backbone,
    embedding_table, proj_head.
    """

    def __init__(self, backbone: nn.Module, conditions: tuple[str, ...], valid_index: tuple[tuple[int, ...], ...],
                 context_channels: int, vocabulary_size: int, embed_dim: int = 512):
        super().__init__()
        if len(conditions) != len(valid_index):
            raise ValueError(f"{len(conditions)} conditions but {len(valid_index)} valid_index lists")
        self.conditions = tuple(conditions)
        self.valid_index = tuple(tuple(v) for v in valid_index)
        self.logit_scale = nn.Parameter(torch.zeros(()), requires_grad=False)
        self.register_buffer("class_embedding", torch.zeros(vocabulary_size, embed_dim))
        self.backbone = backbone
        self.embedding_table = nn.Embedding(len(self.conditions), context_channels)
        self.proj_head = nn.Linear(backbone.out_channels, embed_dim)

    has_classifier = True

    def features(self, feat, grid_coord, batch, condition: str | None = None) -> torch.Tensor:
        context = self.embedding_table.weight[condition_index(self.conditions, condition)][None]  # (1, ctx)
        return self.backbone.forward_features(feat, grid_coord, batch, condition, context)

    def classify(self, features: torch.Tensor, condition: str | None = None) -> torch.Tensor:
        index = self.valid_index[condition_index(self.conditions, condition)]
        projected = self.proj_head(features)                                # (N, 512)
        projected = projected / projected.norm(dim=-1, keepdim=True)        # no epsilon, as the official code
        text = self.class_embedding[list(index)]                            # (K, 512)
        return self.logit_scale.exp() * projected @ text.t()                # (N, K)
