"""SpUNet-v1m1: the sparse-convolution UNet of Pointcept/PonderV2 (``spconv_unet_v1m1_base.py``).

Module names, registration order and arithmetic follow the official code so that its state_dict
keys load with ``strict=True`` and its outputs are reproduced exactly.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

import spconv.pytorch as spconv
import torch
from torch import nn

from model.sparse.conv import down_conv, inverse_conv, make_sparse_tensor, subm_conv
from model.sparse.pointwise import pointwise

BatchNorm = partial(nn.BatchNorm1d, eps=1e-3, momentum=0.01)


class BasicBlock(spconv.SparseModule):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + proj(x)); proj is a 1x1 conv + BN when channels change."""

    def __init__(self, in_channels: int, out_channels: int, indice_key: str):
        super().__init__()
        if in_channels == out_channels:
            self.proj = spconv.SparseSequential(nn.Identity())
        else:
            self.proj = spconv.SparseSequential(subm_conv(in_channels, out_channels, 1), BatchNorm(out_channels))
        self.conv1 = subm_conv(in_channels, out_channels, 3, indice_key=indice_key)
        self.bn1 = BatchNorm(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = subm_conv(out_channels, out_channels, 3, indice_key=indice_key)
        self.bn2 = BatchNorm(out_channels)

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        out = self.conv1(x)
        out = out.replace_feature(self.relu(self.bn1(out.features)))
        out = self.conv2(out)
        out = out.replace_feature(self.bn2(out.features) + self.proj(x).features)
        return out.replace_feature(self.relu(out.features))


def _stage(blocks: list[BasicBlock]) -> spconv.SparseSequential:
    return spconv.SparseSequential(OrderedDict((f"block{i}", b) for i, b in enumerate(blocks)))


class SpUNetV1m1(nn.Module):
    """Four-level sparse UNet. Input (N, in_channels) voxel features; output (N, channels[-1]) features
    (``forward_features``) or (N, num_classes) logits from ``final`` (``forward``). Rows stay in input order."""

    def __init__(self, in_channels: int, num_classes: int = 0, base_channels: int = 32,
                 channels: tuple[int, ...] = (32, 64, 128, 256, 256, 128, 96, 96),
                 layers: tuple[int, ...] = (2, 3, 4, 6, 2, 2, 2, 2)):
        super().__init__()
        assert len(layers) % 2 == 0 and len(layers) == len(channels)
        self.in_channels, self.num_classes = in_channels, num_classes
        self.channels, self.layers = tuple(channels), tuple(layers)
        self.num_stages = len(layers) // 2
        self.out_channels = channels[-1]

        self.conv_input = spconv.SparseSequential(
            subm_conv(in_channels, base_channels, 5, indice_key="stem"), BatchNorm(base_channels), nn.ReLU())
        enc_in, dec_ch = base_channels, channels[-1]
        self.down, self.up, self.enc, self.dec = nn.ModuleList(), nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for s in range(self.num_stages):
            self.down.append(spconv.SparseSequential(
                down_conv(enc_in, channels[s], indice_key=f"spconv{s + 1}"), BatchNorm(channels[s]), nn.ReLU()))
            self.enc.append(_stage([BasicBlock(channels[s], channels[s], f"subm{s + 1}") for _ in range(layers[s])]))
            up_in = channels[len(channels) - s - 2]
            self.up.append(spconv.SparseSequential(
                inverse_conv(up_in, dec_ch, indice_key=f"spconv{s + 1}"), BatchNorm(dec_ch), nn.ReLU()))
            n_dec = layers[len(channels) - s - 1]
            self.dec.append(_stage([BasicBlock(dec_ch + enc_in if i == 0 else dec_ch, dec_ch, f"subm{s}")
                                    for i in range(n_dec)]))
            enc_in, dec_ch = channels[s], up_in
        self.final = subm_conv(channels[-1], num_classes, 1, bias=True) if num_classes > 0 else spconv.Identity()

    def forward_features(self, feat: torch.Tensor, grid_coord: torch.Tensor, batch: torch.Tensor,
                         condition: str | None = None, context: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C_in) features at unique (batch, grid_coord) sites -> (N, channels[-1]) decoder output."""
        x = self.conv_input(make_sparse_tensor(feat, grid_coord, batch))
        skips = [x]
        for s in range(self.num_stages):
            x = self.enc[s](self.down[s](x))
            skips.append(x)
        x = skips.pop()
        for s in reversed(range(self.num_stages)):
            x = self.up[s](x)
            skip = skips.pop()
            x = x.replace_feature(torch.cat([x.features, skip.features], dim=1))  # [upsampled, skip]
            x = self.dec[s](x)
        return x.features

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C) decoder features -> (N, num_classes) logits through ``final`` (spconv's 1x1 arithmetic)."""
        if self.num_classes == 0:
            raise ValueError("this backbone has no classifier (num_classes=0)")
        return pointwise(features, self.final)

    def forward(self, feat: torch.Tensor, grid_coord: torch.Tensor, batch: torch.Tensor,
                condition: str | None = None, context: torch.Tensor | None = None) -> torch.Tensor:
        features = self.forward_features(feat, grid_coord, batch)
        return self.classify(features) if self.num_classes > 0 else features
