"""The image pre-training task for ``training.engine.Trainer``:

    input RGB views -> ImageRenderModel (backbone, lifting, UNet3D) -> training rays of the target views
    (``sample_training_rays``, as the point-cloud task) -> NeuS rendering -> the same render losses.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from model.images.backbone import load_image_weights
from model.images.model import ImageRenderModel
from model.render import sample_training_rays, total_loss
from training.images.config import ImagePretrainConfig
from training.images.dataset import ImageViewsDataset, collate
from training.pretrain.task import cpu_generator


class ImagePretrainer(ImageRenderModel):
    """ImageRenderModel whose ``forward`` returns the losses of a collated batch (so DDP wraps it)."""

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        cfg = self.head.cfg
        images = batch["images"].permute(0, 1, 4, 2, 3).float() / 255.0  # (B, V, 3, H, W)
        volume, lifted = super().forward(images, batch["K"], batch["w2c"], batch["bounds"])
        extrinsic = torch.stack([c.transform_extrinsics(batch["extrinsic"][b]) for b, c in enumerate(lifted.cubes)])
        depth_scale = batch["depth_scale"] * torch.stack([c.scale for c in lifted.cubes])
        rays = sample_training_rays(batch["rgb"].float() / 255.0, batch["depth"], batch["intrinsic"], extrinsic,
                                    depth_scale, cfg.ray_nsample, cfg.bounds, generator=cpu_generator(generator))
        pred = self.head.render(volume, rays.origins, rays.directions, semantic=False, generator=generator)
        losses = self.head.losses(pred, rays)
        return {"loss": total_loss(losses), **losses}


def build_image_model(cfg: ImagePretrainConfig) -> ImagePretrainer:
    """Weights drawn from ``cfg.train.seed`` (the untrained baseline repeats); ``image_weights`` loaded if set."""
    torch.manual_seed(cfg.train.seed)
    model = ImagePretrainer(cfg.model)
    if cfg.image_weights:
        load_image_weights(model.backbone, cfg.image_weights)
    return model


class ImagePretrainTask:
    def __init__(self, cfg: ImagePretrainConfig, dataset: ImageViewsDataset | None = None):
        self.cfg = cfg
        self.dataset = dataset or ImageViewsDataset(cfg.data)

    def num_samples(self) -> int:
        return len(self.dataset)

    def load_sample(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        return self.dataset.load(index, rng)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples)

    def losses(self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Tensor]:
        return model(batch, generator)
