"""The 2D backbone: a ResNet (BasicBlock; depth 18 or 34) written here, and a lateral 1x1 projection of its
stages to one common width.

torchvision is not a dependency: its PyPI wheels are built against the CUDA torch and do not load next to
torch 2.13.0+cpu (``operator torchvision::nms does not exist``). The module names follow torchvision's ResNet
(``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0`` ...), so a locally saved torchvision
``resnet18``/``resnet34`` state_dict (e.g. ImageNet weights) loads with ``load_image_weights`` when ``width``
is 64; nothing is ever downloaded.

Shapes: images (N, 3, H, W) normalised with the ImageNet mean/std -> stage s (1-based) at stride 2^(s+1):
(N, width·2^(s-1), ⌈H/2^(s+1)⌉, ⌈W/2^(s+1)⌉); ``stages=3`` keeps strides 4, 8, 16.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    """ResNet-18/34 trunk without the classifier; ``forward`` returns the first ``stages`` stage outputs."""

    def __init__(self, depth: int = 18, width: int = 64, stages: int = 3):
        super().__init__()
        if depth not in BLOCKS:
            raise ValueError(f"backbone depth must be one of {sorted(BLOCKS)}, got {depth}")
        if not 1 <= stages <= 4 or width < 1:
            raise ValueError(f"backbone stages must be 1..4 and width positive, got {stages}, {width}")
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.channels: list[int] = []
        in_ch = width
        for s in range(stages):
            out_ch = width * 2 ** s
            blocks = [BasicBlock(in_ch if b == 0 else out_ch, out_ch, (1 if s == 0 else 2) if b == 0 else 1)
                      for b in range(BLOCKS[depth][s])]
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
            self.channels.append(out_ch)
            in_ch = out_ch
        self.strides = [2 ** (s + 2) for s in range(stages)]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (N, 3, H, W) RGB in [0, 1] -> one map per stage (see the module docstring)."""
        x = (images - self.mean) / self.std
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for s in range(len(self.channels)):
            x = getattr(self, f"layer{s + 1}")(x)
            outs.append(x)
        return outs


class FeatureNeck(nn.Module):
    """1x1 lateral convs: every stage -> ``dim`` channels (the maps keep their own strides)."""

    def __init__(self, channels: list[int], dim: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in channels)

    def forward(self, maps: list[Tensor]) -> list[Tensor]:
        return [conv(m) for conv, m in zip(self.lateral, maps)]


def load_image_weights(backbone: ResNet, path: str | Path) -> list[str]:
    """Load a local torchvision-layout ResNet state_dict (``torch.load(weights_only=True)``) into ``backbone``.

    Keys of parts this trunk does not build (``fc.*``, unused later stages) are skipped and returned; every
    key the trunk has must be present with the same shape, else ``ValueError`` naming the first mismatches.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image-weights file")
    from model.checkpoint import load_torch_file

    state = load_torch_file(path)  # weights only; a damaged or code-running file is one CheckpointError line
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict (a mapping of tensor names), got {type(state).__name__}")
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        raise ValueError(f"{path}: does not fit the image backbone (width {backbone.conv1.out_channels}); missing "
                         f"{missing[:3]}, shape mismatches {wrong[:3]}")
    backbone.load_state_dict({k: state[k] for k in own}, strict=True)
    return sorted(k for k in state if k not in own)
