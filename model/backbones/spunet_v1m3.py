"""SpUNet-v1m3: SpUNet with PDNorm (``spconv_unet_v1m3_pdnorm.py``), the backbone of PPT and of the
published PonderV2 checkpoints. Every norm receives the same (condition, context) pair. The structure and
key names come from `model.backbones.layout` (the v1m3 spelling: ``conv``/``bn``, ``proj_conv``/``proj_norm``)."""

from __future__ import annotations

from collections.abc import Callable

import spconv.pytorch as spconv
import torch
from torch import nn

from model.backbones.layout import DEFAULT_CHANNELS, DEFAULT_LAYERS, BlockSpec, ConvNormSpec, SpUNetLayout, \
    SpUNetModule, register_block
from model.backbones.pdnorm import PDBatchNorm
from model.backbones.spunet_v1m1 import sparse_conv
from model.sparse.conv import make_sparse_tensor
from model.sparse.pointwise import pointwise


class _Conditioned(nn.Module):
    """Base for blocks that carry (condition, context) alongside the sparse tensor."""

    def _norm(self, norm: PDBatchNorm, x: spconv.SparseConvTensor, condition: str, context) -> spconv.SparseConvTensor:
        return x.replace_feature(norm(x.features, condition, context))


class ConvNormReLU(_Conditioned):
    """``conv``, ``bn`` (PDNorm), ReLU: the stem (SPConvPatchEmbedding), SPConvDown and SPConvUp."""

    def __init__(self, conv: spconv.conv.SparseConvolution, norm: PDBatchNorm):
        super().__init__()
        self.conv, self.bn, self.act = conv, norm, nn.ReLU()

    def forward(self, x, condition, context):
        x = self._norm(self.bn, self.conv(x), condition, context)
        return x.replace_feature(self.act(x.features))


class BasicBlock(_Conditioned):
    def __init__(self, spec: BlockSpec, norm_fn: Callable[[int], PDBatchNorm]):
        super().__init__()
        register_block(self, spec, sparse_conv, norm_fn, spconv.SparseSequential)

    def forward(self, x, condition, context):
        out = self._norm(self.bn1, self.conv1(x), condition, context)
        out = out.replace_feature(self.relu(out.features))
        out = self._norm(self.bn2, self.conv2(out), condition, context)
        if self.proj_conv is None:
            residual = x.features
        else:
            residual = self.proj_norm(pointwise(x.features, self.proj_conv), condition, context)
        return out.replace_feature(self.relu(out.features + residual))


class Stage(nn.Module):
    """Blocks registered as ``block0``, ``block1``… (the official SparseSequential names)."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        for i, block in enumerate(blocks):
            self.add_module(f"block{i}", block)

    def forward(self, x, condition, context):
        for block in self.children():
            x = block(x, condition, context)
        return x


class SpUNetV1m3(SpUNetModule):
    """Input (N, in_channels) voxel features + a condition name + a (1, context_channels) context;
    output (N, channels[-1]) decoder features, rows in input order."""

    def __init__(self, in_channels: int, num_classes: int = 0, base_channels: int = 32, context_channels: int = 256,
                 channels: tuple[int, ...] = DEFAULT_CHANNELS, layers: tuple[int, ...] = DEFAULT_LAYERS,
                 conditions: tuple[str, ...] = ("ScanNet", "S3DIS", "Structured3D"),
                 norm_decouple: bool = True, norm_adaptive: bool = True, norm_affine: bool = True):
        super().__init__()
        self.conditions = tuple(conditions)

        def norm_fn(c: int) -> PDBatchNorm:
            return PDBatchNorm(c, context_channels, self.conditions, norm_decouple, norm_adaptive, norm_affine)

        def conv_norm(spec: ConvNormSpec) -> ConvNormReLU:
            return ConvNormReLU(sparse_conv(spec.conv), norm_fn(spec.norm.channels))

        layout = SpUNetLayout.build("v1m3", in_channels, num_classes, base_channels, channels, layers)
        self._assemble(layout, conv_norm, lambda spec: BasicBlock(spec, norm_fn), Stage, sparse_conv, spconv.Identity)

    def forward_features(self, feat: torch.Tensor, grid_coord: torch.Tensor, batch: torch.Tensor,
                         condition: str | None = None, context: torch.Tensor | None = None) -> torch.Tensor:
        if condition is None:
            raise ValueError(f"SpUNet-v1m3 needs a condition, one of {list(self.conditions)}")
        if condition not in self.conditions:
            raise ValueError(f"unknown condition {condition!r}; this backbone has {list(self.conditions)}")
        x = self.conv_input(make_sparse_tensor(feat, grid_coord, batch), condition, context)
        skips = [x]
        for s in range(self.num_stages):
            x = self.enc[s](self.down[s](x, condition, context), condition, context)
            skips.append(x)
        x = skips.pop()
        for s in reversed(range(self.num_stages)):
            x = self.up[s](x, condition, context)
            skip = skips.pop()
            x = x.replace_feature(torch.cat([x.features, skip.features], dim=1))  # [upsampled, skip]
            x = self.dec[s](x, condition, context)
        return x.features
