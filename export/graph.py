"""What export needs on top of the engine: `GatherSpUNet` (the engine's exportable "gather" formulation)
and `GraphInfo`, the description of an exported graph's inputs and outputs.

The network itself lives in `model.engine.unet` (model must not import export). In the gather
formulation it contains only Gather / MatMul / elementwise ops, which export to ONNX and TensorRT.

Inputs (positional): ``feat (M_0, C_in)`` float32, then the int32 tables in `KernelMaps.tables` order,
then ``condition (1,)`` int64 (index into `conditions`) for PDNorm models. Outputs: ``backbone_feat
(M_0, C)`` and, when the checkpoint has a head, ``seg_logits (M_0, K)``. Rows follow the input rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.config import ModelConfig
from model.engine.unet import SpUNetEngine
from model.sparse.kernel_maps import table_names


@dataclass
class GraphInfo:
    """What an exported graph takes and returns; stored in the ONNX metadata and Triton config."""

    kind: str
    backbone: str
    in_channels: int
    out_channels: int
    num_levels: int
    stem_kernel: int
    conditions: tuple[str, ...]
    outputs: tuple[str, ...]
    num_classes: dict[str, int] = field(default_factory=dict)
    class_names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    grid_size: float = 0.02
    input_features: tuple[str, ...] = ("color", "normal")

    @property
    def input_names(self) -> list[str]:
        names = ["feat", *table_names(self.num_levels, with_stem=True)]
        return names + (["condition"] if self.conditions else [])


class GatherSpUNet(SpUNetEngine):
    """The engine in its exportable formulation (dense tables, no Scatter), with its `GraphInfo`."""

    def __init__(self, sd: dict[str, torch.Tensor], config: ModelConfig, heads: bool = True,
                 taps_per_matmul: int | None = None):
        super().__init__(sd, config, heads=heads, taps_per_matmul=taps_per_matmul, formulation="gather")
        config = self.config
        self.info = GraphInfo(
            kind=config.kind, backbone=config.backbone.type, in_channels=self.in_channels,
            out_channels=self.layout.out_channels, num_levels=self.num_levels, stem_kernel=self.stem_kernel,
            conditions=self.conditions, outputs=self.outputs, num_classes=dict(self.num_classes),
            class_names={k: v for k, v in config.class_names.items() if k in self.num_classes},
            grid_size=config.grid_size, input_features=tuple(config.input_features))
