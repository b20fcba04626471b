"""Losses of the voting head: objectness on every voxel, class / vote / size / yaw on foreground voxels.

Kept free of the sparse backbone (plain torch) so it can be checked on any device.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .config import LossConfig


def detection_losses(out: dict[str, Tensor], batch: dict[str, Tensor], cfg: LossConfig) -> dict[str, Tensor]:
    """Objectness BCE on every voxel; class CE and L1 on vote offset, log size and yaw vector on foreground
    voxels, weighted per voxel (``instance_balance``)."""
    fg = batch["foreground"]
    objectness = F.binary_cross_entropy_with_logits(out["objectness"], fg.float())
    if fg.any():
        w = batch["weight"][fg]
        classification = (F.cross_entropy(out["class_logits"][fg], batch["label"][fg], reduction="none") * w).mean()
        l1 = {name: ((out[name][fg] - batch[name][fg]).abs().sum(dim=1) * w).mean()
              for name in ("offset", "log_size", "yaw")}
        accuracy = (out["class_logits"][fg].argmax(dim=1) == batch["label"][fg]).float().mean()
    else:  # no object in the batch: keep the graph, contribute nothing
        zero = sum(v.sum() for v in out.values()) * 0.0
        classification, accuracy = zero, zero.detach()
        l1 = {name: zero for name in ("offset", "log_size", "yaw")}
    loss = (cfg.objectness * objectness + cfg.classification * classification + cfg.offset * l1["offset"]
            + cfg.size * l1["log_size"] + cfg.yaw * l1["yaw"])
    return {"loss": loss, "objectness": objectness.detach(), "classification": classification.detach(),
            "offset": l1["offset"].detach(), "size": l1["log_size"].detach(), "yaw": l1["yaw"].detach(),
            "class_acc": accuracy.detach()}
