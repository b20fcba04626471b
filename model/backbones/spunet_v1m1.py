"""SpUNet-v1m1: the sparse-convolution UNet of Pointcept/PonderV2 (``spconv_unet_v1m1_base.py``).

Module names, registration order and arithmetic follow the official code so that its state_dict
keys load with ``strict=True`` and its outputs are reproduced exactly. The structure (widths, key names)
comes from `model.backbones.layout`; this module only says which spconv layers realise it.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

import spconv.pytorch as spconv
import torch
from torch import nn

from model.backbones.layout import DEFAULT_CHANNELS, DEFAULT_LAYERS, BlockSpec, ConvNormSpec, ConvSpec, \
    SpUNetLayout, SpUNetModule, register_block
from model.sparse.conv import down_conv, inverse_conv, make_sparse_tensor, subm_conv

BatchNorm = partial(nn.BatchNorm1d, eps=1e-3, momentum=0.01)


def sparse_conv(spec: ConvSpec) -> spconv.conv.SparseConvolution:
    """The spconv layer of a described conv (shared with SpUNet-v1m3)."""
    if spec.kind == "down":
        return down_conv(spec.in_channels, spec.out_channels, indice_key=spec.indice_key)
    if spec.kind == "inverse":
        return inverse_conv(spec.in_channels, spec.out_channels, indice_key=spec.indice_key)
    return subm_conv(spec.in_channels, spec.out_channels, spec.kernel_size, indice_key=spec.indice_key,
                     bias=spec.bias)


class BasicBlock(spconv.SparseModule):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + proj(x)); proj is a 1x1 conv + BN when channels change."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        register_block(self, spec, sparse_conv, BatchNorm, spconv.SparseSequential)

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        out = self.conv1(x)
        out = out.replace_feature(self.relu(self.bn1(out.features)))
        out = self.conv2(out)
        out = out.replace_feature(self.bn2(out.features) + self.proj(x).features)
        return out.replace_feature(self.relu(out.features))


def _conv_norm(spec: ConvNormSpec) -> spconv.SparseSequential:
    return spconv.SparseSequential(sparse_conv(spec.conv), BatchNorm(spec.norm.channels), nn.ReLU())


def _stage(blocks: list[nn.Module]) -> spconv.SparseSequential:
    return spconv.SparseSequential(OrderedDict((f"block{i}", b) for i, b in enumerate(blocks)))


class SpUNetV1m1(SpUNetModule):
    """Four-level sparse UNet. Input (N, in_channels) voxel features; output (N, channels[-1]) features
    (``forward_features``) or (N, num_classes) logits from ``final`` (``forward``). Rows stay in input order."""

    def __init__(self, in_channels: int, num_classes: int = 0, base_channels: int = 32,
                 channels: tuple[int, ...] = DEFAULT_CHANNELS, layers: tuple[int, ...] = DEFAULT_LAYERS):
        super().__init__()
        layout = SpUNetLayout.build("v1m1", in_channels, num_classes, base_channels, channels, layers)
        self._assemble(layout, _conv_norm, BasicBlock, _stage, sparse_conv, spconv.Identity)

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
