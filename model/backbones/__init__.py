"""Sparse UNet encoders with the official PonderV2 module names."""

from model.backbones.spunet_v1m1 import SpUNetV1m1
from model.backbones.spunet_v1m3 import SpUNetV1m3

__all__ = ["SpUNetV1m1", "SpUNetV1m3"]
