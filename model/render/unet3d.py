"""UNet3D-v1m2, the projection from the pooled backbone volume to the render volume (spec §5.7).

Module names match the original's state_dict: ``encoders.i.basic_module.{batchnorm,conv}``,
``decoders.i.upsampling.upsample``, ``decoders.i.basic_module.*``, ``final_conv``.
"""

from __future__ import annotations

from torch import Tensor, nn

from model.render.config import ProjectionConfig


class SingleConv(nn.Sequential):
    """Layer order "bcr": BatchNorm3d(in), Conv3d(in -> out, k=3, padding=1, no bias), ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.add_module("batchnorm", nn.BatchNorm3d(in_channels))
        self.add_module("conv", nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False))
        self.add_module("ReLU", nn.ReLU(inplace=True))


class Encoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, pool: bool):
        super().__init__()
        self.pooling = nn.MaxPool3d(kernel_size=(2, 2, 2)) if pool else None
        self.basic_module = SingleConv(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        if self.pooling is not None:
            x = self.pooling(x)
        return self.basic_module(x)


class Upsampling(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.upsample = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=3, stride=(2, 2, 2), padding=1)

    def forward(self, encoder_features: Tensor, x: Tensor) -> Tensor:
        # output_size picks output_padding so the result matches the skip connection (odd sizes included)
        return self.upsample(x, encoder_features.shape[2:])


class Decoder(nn.Module):
    """Transposed-conv upsampling, **sum** with the skip features, then a SingleConv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.upsampling = Upsampling(in_channels, out_channels)
        self.basic_module = SingleConv(out_channels, out_channels)

    def forward(self, encoder_features: Tensor, x: Tensor) -> Tensor:
        return self.basic_module(encoder_features + self.upsampling(encoder_features, x))


class UNet3D(nn.Module):
    """(B, in, Z, Y, X) -> (B, out, Z, Y, X); each level halves every axis with MaxPool3d(2)."""

    def __init__(self, cfg: ProjectionConfig):
        super().__init__()
        f = tuple(cfg.f_maps)
        self.encoders = nn.ModuleList(
            Encoder(cfg.in_channels if i == 0 else f[i - 1], f[i], pool=i > 0) for i in range(len(f)))
        rev = f[::-1]
        self.decoders = nn.ModuleList(Decoder(rev[i], rev[i + 1]) for i in range(len(rev) - 1))
        self.final_conv = nn.Conv3d(f[0], cfg.out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5:
            raise ValueError(f"UNet3D expects (B, C, Z, Y, X), got shape {tuple(x.shape)}")
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.insert(0, x)
        for decoder, skip in zip(self.decoders, skips[1:]):
            x = decoder(skip, x)
        return self.final_conv(x)
