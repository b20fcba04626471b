"""Rendering losses (`SurfaceModel.get_loss`), spec §5.16. Each entry is already multiplied by its weight;
a loss whose weight is 0 is left out of the dict, as in the original."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from model.render.config import LossConfig


def semantic_contrastive_loss(pred: Tensor, target: Tensor, valid: Tensor, temperature: float) -> Tensor:
    """CLIP-style cross-entropy over **all** rays: logits = normalize(pred) @ targetᵀ / T, shape (R, R),
    row i labelled i. Rows whose ray is invalid or whose target is all zeros are ignored; every column
    (including zero targets and rays of the same class) stays a negative (QUIRK of the original)."""
    pred = F.normalize(pred, dim=-1)
    logits = torch.mm(pred, target.transpose(1, 0)) / temperature
    labels = torch.arange(pred.shape[0], dtype=torch.long, device=pred.device)
    keep = valid[:, 0] & target.any(dim=-1)
    labels[~keep] = -100
    if not bool(keep.any()):
        return pred.new_zeros(())
    return F.cross_entropy(logits, labels)


def render_losses(pred: Mapping[str, Tensor], target: Mapping[str, Tensor], cfg: LossConfig) -> dict[str, Tensor]:
    """pred: depth (R, 1), rgb (R, 3), semantic (R, D), sdf (R, S, 1), z_vals (R, S, 1), gradients (R, S, 3).
    target: depth (R, 1) (≤ 0 = invalid), rgb (R, 3), semantic (R, D). Returns the weighted losses and ``psnr``
    (logged only). The eval-mode semantic branch of the original refers to an undefined variable and cannot
    run; the training formula is used in both modes here."""
    needed = [("pred", pred, ("depth", "sdf", "z_vals", "gradients")), ("target", target, ("depth",))]
    if cfg.rgb_loss > 0:
        needed += [("pred", pred, ("rgb",)), ("target", target, ("rgb",))]
    if cfg.semantic_loss > 0:
        needed += [("pred", pred, ("semantic",)), ("target", target, ("semantic",))]
    for side, mapping, keys in needed:
        missing = [k for k in keys if k not in mapping]
        if missing:
            raise ValueError(f"render losses need {side}[{', '.join(missing)}] (set that loss weight to 0 otherwise)")
    losses: dict[str, Tensor] = {}
    depth_gt = target["depth"]
    valid = depth_gt > 0.0
    if cfg.depth_loss > 0:
        depth_loss = torch.sum(valid * torch.abs(depth_gt - pred["depth"])) / torch.clamp(valid.sum(), min=1.0)
        losses["depth_loss"] = depth_loss * cfg.depth_loss
    if cfg.rgb_loss > 0:
        losses["rgb_loss"] = F.l1_loss(pred["rgb"], target["rgb"]) * cfg.rgb_loss
        losses["psnr"] = 20.0 * torch.log10(1.0 / (pred["rgb"] - target["rgb"]).pow(2).mean().sqrt())
    if cfg.semantic_loss > 0:
        losses["semantic_loss"] = semantic_contrastive_loss(pred["semantic"], target["semantic"], valid,
                                                            cfg.temperature) * cfg.semantic_loss
    sdf = pred["sdf"][..., 0]  # (R, S)
    z_vals = pred["z_vals"][..., 0]
    tau = cfg.sensor_depth_truncation
    front = valid & (z_vals < (depth_gt - tau))  # free space in front of the surface
    back = valid & (z_vals > (depth_gt + tau))
    band = valid & ~front & ~back  # within ±tau of the surface
    if cfg.free_space_loss > 0:
        free = (F.relu(tau - sdf) * front).sum() / torch.clamp(front.sum(), min=1.0)
        losses["free_space_loss"] = free * cfg.free_space_loss
    if cfg.sdf_loss > 0:
        sdf_loss = (torch.abs(z_vals + sdf - depth_gt) * band).sum() / torch.clamp(band.sum(), min=1.0)
        losses["sdf_loss"] = sdf_loss * cfg.sdf_loss
    if cfg.eikonal_loss > 0:
        eikonal = ((pred["gradients"].norm(2, dim=-1) - 1) ** 2).mean()
        losses["eikonal_loss"] = eikonal * cfg.eikonal_loss
    return losses


def total_loss(losses: Mapping[str, Tensor]) -> Tensor:
    """The optimised loss: the sum of every entry whose key contains "loss" (so ``psnr`` is excluded)."""
    return sum(v for k, v in losses.items() if "loss" in k)
