"""Per-voxel voting head for 3D boxes, in the style of VoteNet.

Every voxel predicts, from its encoder feature: objectness (does it belong to an object of a detection class?),
class logits, the offset from itself to its object's box centre (its *vote*), the box size (log metres) and
the box yaw as (sin 4θ, cos 4θ) of the canonical yaw θ ∈ [-π/4, π/4) (``boxes.canonical_boxes``).
``postprocess.decode`` groups the votes of foreground voxels into clusters and aggregates each cluster's
predictions into one box.

Why this design: all targets are dense per-voxel quantities read off the ground-truth boxes, so training is a
plain supervised loss with no proposal matching; it converges on a CPU in minutes on small generated rooms and
works on any encoder's (N, C) features. The head is a small MLP shared by every voxel.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class DecodeConfig:
    """How votes become boxes (defaults used by ``detect``; each call may override the thresholds).

    seed_threshold: objectness a voxel needs for its vote to count.
    vote_radius: grouping radius around a cluster centre (metres).
    min_votes: clusters with a smaller summed objectness are scaled down in score (support = sum / min_votes).
    max_votes: foreground votes kept (highest objectness first) to bound the cost on huge scenes.
    max_proposals: clusters seeded by farthest-point sampling of the votes.
    score_threshold / iou_threshold: final score cut and per-class 3D NMS IoU.
    max_detections: boxes returned at most.
    """

    seed_threshold: float = 0.5
    vote_radius: float = 0.3
    min_votes: float = 8.0
    max_votes: int = 50000
    max_proposals: int = 256
    mean_shift_steps: int = 2
    score_threshold: float = 0.3
    iou_threshold: float = 0.25
    max_detections: int = 200


@dataclass
class HeadConfig:
    in_channels: int
    class_names: tuple[str, ...]
    hidden_channels: int = 64
    num_layers: int = 2
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def __post_init__(self) -> None:
        self.class_names = tuple(self.class_names)
        if isinstance(self.decode, dict):
            known = {f.name for f in fields(DecodeConfig)}
            unknown = set(self.decode) - known
            if unknown:
                raise ValueError(f"unknown detection decode keys: {sorted(unknown)} (known: {sorted(known)})")
            self.decode = DecodeConfig(**self.decode)
        if self.in_channels < 1 or self.hidden_channels < 1 or self.num_layers < 0:
            raise ValueError(f"invalid detection head sizes: in {self.in_channels}, hidden {self.hidden_channels}, "
                             f"layers {self.num_layers}")
        if not self.class_names:
            raise ValueError("the detection head needs at least one class name")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"duplicate detection class names: {list(self.class_names)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HeadConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown detection head config keys: {sorted(unknown)} (known: {sorted(known)})")
        missing = {"in_channels", "class_names"} - set(data)
        if missing:
            raise ValueError(f"the detection head config needs {sorted(missing)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["class_names"] = list(self.class_names)
        return out


# Layout of the head's output channels: name -> width (num_classes filled in per head).
def _layout(num_classes: int) -> dict[str, int]:
    return {"objectness": 1, "class_logits": num_classes, "offset": 3, "log_size": 3, "yaw": 2}


class DetectionHead(nn.Module):
    """(N, C) voxel features → dict of per-voxel predictions:
    objectness (N,) logits, class_logits (N, K), offset (N, 3) metres, log_size (N, 3), yaw (N, 2)."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        width = cfg.in_channels
        for _ in range(cfg.num_layers):
            layers += [nn.Linear(width, cfg.hidden_channels, bias=False), nn.BatchNorm1d(cfg.hidden_channels),
                       nn.ReLU(inplace=True)]
            width = cfg.hidden_channels
        self.mlp = nn.Sequential(*layers)
        self.layout = _layout(len(cfg.class_names))
        self.out = nn.Linear(width, sum(self.layout.values()))
        with torch.no_grad():  # start near a plausible box: 0.5 m sizes, low objectness
            self.out.weight.mul_(0.1)
            self.out.bias.zero_()
            bias = dict(zip(self.layout, torch.split(self.out.bias, list(self.layout.values()))))
            bias["log_size"].fill_(-0.7)
            bias["objectness"].fill_(-1.0)

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> "DetectionHead":
        return cls(HeadConfig.from_dict(dict(data)))

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.cfg.class_names

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        if features.dim() != 2 or features.shape[1] != self.cfg.in_channels:
            raise ValueError(f"the detection head takes (N, {self.cfg.in_channels}) features, got "
                             f"{tuple(features.shape)}")
        raw = self.out(self.mlp(features.float()))                        # (N, 1 + K + 3 + 3 + 2)
        out = dict(zip(self.layout, torch.split(raw, list(self.layout.values()), dim=1)))
        out["objectness"] = out["objectness"].squeeze(1)
        return out
