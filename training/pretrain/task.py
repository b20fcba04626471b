"""The rendering pre-training task for ``training.engine.Trainer`` (spec §5.2):

    [block masking] → backbone features → to_unit_cube → dense volume (UNet3D) → training rays
    (``sample_training_rays``) → NeuS rendering of those rays → render losses.

The forward pass lives in ``PonderPretrainer.forward`` (a PonderIndoor with the same state_dict) so that it
runs through DistributedDataParallel's forward under torchrun.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from model.pretrain import PonderIndoor
from model.render import sample_training_rays, total_loss
from training.pretrain.config import MaskConfig, PretrainConfig
from training.pretrain.dataset import PretrainDataset, collate


def block_mask(feat: Tensor, grid_coord: Tensor, batch: Tensor, ratio: float, size: int, mtoken: Tensor,
               generator: torch.Generator | None = None) -> Tensor:
    """Spec §5.3: blocks are (batch, grid_coord // size); per scene keep round(n·(1 - ratio)) random blocks;
    points of the other blocks get ``mtoken`` (1, C) as features. feat (N, C) -> (N, C)."""
    blocks = torch.cat([batch[:, None].long(), torch.div(grid_coord.long(), size, rounding_mode="floor")], dim=1)
    unique, inverse = torch.unique(blocks, dim=0, return_inverse=True)  # rows sorted, so grouped by batch
    keep = torch.zeros(len(unique), dtype=torch.bool, device=feat.device)
    scene_of_block = unique[:, 0]
    for b in torch.unique(scene_of_block):
        idx = torch.nonzero(scene_of_block == b)[:, 0]
        n_keep = int(round(len(idx) * (1 - ratio)))
        draw_on = generator.device if generator is not None else feat.device
        order = torch.argsort(torch.rand(len(idx), generator=generator, device=draw_on)).to(idx.device)
        keep[idx[order[:n_keep]]] = True
    masked = ~keep[inverse]
    return torch.where(masked[:, None], mtoken.to(feat.dtype).expand_as(feat), feat)


def cpu_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """A CPU generator seeded from ``generator`` (ray sampling draws ``randperm`` on the CPU)."""
    if generator is None:
        return None
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    return torch.Generator().manual_seed(seed)


class PonderPretrainer(PonderIndoor):
    """PonderIndoor-v2 whose forward computes the pre-training losses of a collated batch."""

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None,
                mask: MaskConfig | None = None) -> dict[str, Tensor]:
        cfg = self.render_head.cfg
        feat, grid_coord, index = batch["feat"], batch["grid_coord"], batch["batch"]
        if mask is not None:
            feat = block_mask(feat, grid_coord, index, mask.ratio, mask.size, self.mtoken, generator)
        condition = batch["condition"]
        backbone_feat = self.features(feat, grid_coord, index, condition)  # (N, C)
        coord, offsets = batch["coord"], batch["offset"]
        scenes = self.render_head.fit_scenes(coord, offsets)
        volume = self.volume(backbone_feat, coord, offsets, scenes)  # (B, C', Z, Y, X)
        extrinsic = torch.stack([s.cube.transform_extrinsics(batch["extrinsic"][b]) for b, s in enumerate(scenes)])
        depth_scale = batch["depth_scale"] * torch.stack([s.cube.scale for s in scenes])
        semantic = self.renders_semantic
        index2semantic = None
        if semantic:
            rows = self.valid_index[self.conditions.index(condition)]
            index2semantic = self.class_embedding[torch.tensor(rows, device=self.class_embedding.device)]
        rays = sample_training_rays(batch["rgb"].float() / 255.0, batch["depth"], batch["intrinsic"], extrinsic,
                                    depth_scale, cfg.ray_nsample, cfg.bounds,
                                    semantic=batch["semantic"] if semantic else None, index2semantic=index2semantic,
                                    generator=cpu_generator(generator))
        pred = self.render_head.render(volume, rays.origins, rays.directions, semantic=semantic, generator=generator)
        losses = self.render_head.losses(pred, rays)
        return {"loss": total_loss(losses), **losses}

    @property
    def renders_semantic(self) -> bool:
        """Semantic rays are rendered and scored only when the loss uses them (their decoder is 512 wide)."""
        cfg = self.render_head.cfg
        return (cfg.loss.semantic_loss > 0 and cfg.field.semantic_decoder is not None
                and hasattr(self, "class_embedding"))


def build_pretrain_model(cfg: PretrainConfig) -> PonderPretrainer:
    """The model of ``cfg`` with weights drawn from ``cfg.train.seed`` (so the untrained baseline repeats)."""
    torch.manual_seed(cfg.train.seed)
    model = PonderPretrainer.from_config(cfg.model)
    if hasattr(model, "mtoken"):
        nn.init.trunc_normal_(model.mtoken, mean=0.0, std=0.02, a=-0.02, b=0.02)
    if cfg.class_embedding:
        emb = np.load(cfg.class_embedding, allow_pickle=False)
        if not hasattr(model, "class_embedding") or emb.shape != tuple(model.class_embedding.shape):
            want = tuple(model.class_embedding.shape) if hasattr(model, "class_embedding") else None
            raise ValueError(f"{cfg.class_embedding}: class embedding of shape {emb.shape}; the model needs {want}")
        model.class_embedding.copy_(torch.from_numpy(emb).float())
    return model


class PretrainTask:
    """``TrainTask`` of the engine: samples from ``PretrainDataset``, losses from ``PonderPretrainer``."""

    def __init__(self, cfg: PretrainConfig, dataset: PretrainDataset | None = None):
        self.cfg = cfg
        self.dataset = dataset or PretrainDataset(cfg.data, cfg.model.grid_size, cfg.model.input_features)

    def num_samples(self) -> int:
        return len(self.dataset)

    def load_sample(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        return self.dataset.load(index, rng)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples, self.cfg.data.max_points)

    def losses(self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Tensor]:
        return model(batch, generator, self.cfg.mask)
