"""SpUNet-v1m3: SpUNet with PDNorm (``spconv_unet_v1m3_pdnorm.py``), the backbone of PPT and of the
published PonderV2 checkpoints. Every norm receives the same (condition, context) pair."""

from __future__ import annotations

import spconv.pytorch as spconv
import torch
from torch import nn

from model.backbones.pdnorm import PDBatchNorm
from model.sparse.conv import down_conv, inverse_conv, make_sparse_tensor, subm_conv
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
    def __init__(self, in_channels: int, out_channels: int, indice_key: str, norm_fn):
        super().__init__()
        if in_channels == out_channels:
            self.proj = spconv.SparseSequential(nn.Identity())  # no keys, kept for the official layout
            self.proj_conv = self.proj_norm = None
        else:
            self.proj_conv = subm_conv(in_channels, out_channels, 1)
            self.proj_norm = norm_fn(out_channels)
        self.conv1 = subm_conv(in_channels, out_channels, 3, indice_key=indice_key)
        self.bn1 = norm_fn(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = subm_conv(out_channels, out_channels, 3, indice_key=indice_key)
        self.bn2 = norm_fn(out_channels)

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

    def __init__(self, blocks: list[BasicBlock]):
        super().__init__()
        for i, block in enumerate(blocks):
            self.add_module(f"block{i}", block)

    def forward(self, x, condition, context):
        for block in self.children():
            x = block(x, condition, context)
        return x


class SpUNetV1m3(nn.Module):
    """Input (N, in_channels) voxel features + a condition name + a (1, context_channels) context;
    output (N, channels[-1]) decoder features, rows in input order."""

    def __init__(self, in_channels: int, num_classes: int = 0, base_channels: int = 32, context_channels: int = 256,
                 channels: tuple[int, ...] = (32, 64, 128, 256, 256, 128, 96, 96),
                 layers: tuple[int, ...] = (2, 3, 4, 6, 2, 2, 2, 2),
                 conditions: tuple[str, ...] = ("ScanNet", "S3DIS", "Structured3D"),
                 norm_decouple: bool = True, norm_adaptive: bool = True, norm_affine: bool = True):
        super().__init__()
        assert len(layers) % 2 == 0 and len(layers) == len(channels)
        self.in_channels, self.num_classes = in_channels, num_classes
        self.channels, self.layers, self.conditions = tuple(channels), tuple(layers), tuple(conditions)
        self.num_stages = len(layers) // 2
        self.out_channels = channels[-1]

        def norm_fn(c: int) -> PDBatchNorm:
            return PDBatchNorm(c, context_channels, self.conditions, norm_decouple, norm_adaptive, norm_affine)

        self.conv_input = ConvNormReLU(subm_conv(in_channels, base_channels, 5, indice_key="stem"),
                                       norm_fn(base_channels))
        enc_in, dec_ch = base_channels, channels[-1]
        self.down, self.up, self.enc, self.dec = nn.ModuleList(), nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for s in range(self.num_stages):
            self.down.append(ConvNormReLU(down_conv(enc_in, channels[s], f"spconv{s + 1}"), norm_fn(channels[s])))
            self.enc.append(Stage([BasicBlock(channels[s], channels[s], f"subm{s + 1}", norm_fn)
                                   for _ in range(layers[s])]))
            up_in = channels[len(channels) - s - 2]
            self.up.append(ConvNormReLU(inverse_conv(up_in, dec_ch, f"spconv{s + 1}"), norm_fn(dec_ch)))
            n_dec = layers[len(channels) - s - 1]
            self.dec.append(Stage([BasicBlock(dec_ch + enc_in if i == 0 else dec_ch, dec_ch, f"subm{s}", norm_fn)
                                   for i in range(n_dec)]))
            enc_in, dec_ch = channels[s], up_in
        self.final = subm_conv(channels[-1], num_classes, 1, bias=True) if num_classes > 0 else spconv.Identity()

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

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        if self.num_classes == 0:
            raise ValueError("this backbone has no classifier (num_classes=0)")
        return pointwise(features, self.final)

    def forward(self, feat, grid_coord, batch, condition=None, context=None) -> torch.Tensor:
        features = self.forward_features(feat, grid_coord, batch, condition, context)
        return self.classify(features) if self.num_classes > 0 else features
