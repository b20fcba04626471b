"""Sparse UNet encoders with the official PonderV2 module names.

`layout.SpUNetLayout` describes the UNet once (widths, key names); `SpUNetV1m1` / `SpUNetV1m3` are the spconv
modules built from it (training, ``--backend spconv``); `engine_backed` has the same module trees and weights
with the sparse convs run by the spconv-free engine (inference). The spconv classes are imported on first use,
so importing this package (or `layout`, or `engine_backed`) does not import spconv.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SpUNetLayout", "SpUNetV1m1", "SpUNetV1m3"]


def __getattr__(name: str) -> Any:
    if name == "SpUNetLayout":
        from model.backbones.layout import SpUNetLayout

        return SpUNetLayout
    if name == "SpUNetV1m1":
        from model.backbones.spunet_v1m1 import SpUNetV1m1

        return SpUNetV1m1
    if name == "SpUNetV1m3":
        from model.backbones.spunet_v1m3 import SpUNetV1m3

        return SpUNetV1m3
    raise AttributeError(f"module 'model.backbones' has no attribute {name!r}")
