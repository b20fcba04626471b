"""SpUNet-v1m1 / v1m3 for inference without spconv.

The same module names, registration order and parameter shapes as `spunet_v1m1` / `spunet_v1m3`, so a
checkpoint loads with the same strict key and shape checks and the heads (``final``, the wrappers' embedding
and projection) compute exactly what the spconv modules compute; but each sparse conv is only its weights
(`ConvWeights`) and ``forward_features`` runs `model.engine.SpUNetEngine`, built from the owning model's
weights at the first forward on a device. The module trees and the engine are both built from
`model.backbones.layout.SpUNetLayout`. Nothing here imports spconv, which costs seconds at start-up.
Inference only: the engine folds the weights once, so training uses the spconv modules.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from model.backbones.layout import DEFAULT_CHANNELS, DEFAULT_LAYERS, BlockSpec, ConvNormSpec, ConvSpec, \
    SpUNetLayout, SpUNetModule, register_block
from model.backbones.pdnorm import PDBatchNorm
from model.config import BackboneConfig, ModelConfig

if TYPE_CHECKING:
    from model.engine.unet import SpUNetEngine


class ConvWeights(nn.Module):
    """A sparse conv's parameters in spconv's layout: weight (C_out, k, k, k, C_in), optional bias (C_out)."""

    def __init__(self, spec: ConvSpec):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(spec.shape))
        self.register_parameter("bias", nn.Parameter(torch.empty(spec.out_channels)) if spec.bias else None)


def _device_key(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one device
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _bn(channels: int) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(channels, eps=1e-3, momentum=0.01)


class _EngineBacked(SpUNetModule):
    """Shared by both layouts: the module tree and heads (`SpUNetModule`) and the engine-run forward."""

    def _init_engines(self) -> None:
        self.__dict__["_owner"] = None                                  # (model, config); not a submodule
        self.__dict__["_engines"] = {}                                  # device -> SpUNetEngine
        self.__dict__["_lock"] = threading.Lock()

    def attach(self, owner: nn.Module, config: ModelConfig) -> None:
        """The model whose state_dict (this backbone's weights plus the wrapper's condition embedding) the
        engine is built from; `model.build.build_model` calls it."""
        self.__dict__["_owner"] = (owner, config)

    def use_engine(self, engine: SpUNetEngine, device: torch.device | str) -> None:
        """Run forwards on ``device`` with an engine built elsewhere (e.g. the Predictor's, so its folded
        weights and precision serve ``features`` too). It must come from the same weights, without heads."""
        self._engines[_device_key(device)] = engine

    def engine(self, device: torch.device | str) -> SpUNetEngine:
        device = _device_key(device)
        with self._lock:
            if device not in self._engines:
                from model.engine.unet import SpUNetEngine

                if self._owner is None:
                    raise RuntimeError("this backbone is not attached to a model (build it with build_model)")
                owner, config = self._owner
                formulation = "pairs" if device.type == "cpu" else "gather"  # as EngineEncoder chooses
                engine = SpUNetEngine.from_state_dict(owner.state_dict(), config, heads=False, formulation=formulation)
                self._engines[device] = engine.to(device).eval()
            return self._engines[device]

    def forward_features(self, feat: torch.Tensor, grid_coord: torch.Tensor, batch: torch.Tensor,
                         condition: str | None = None, context: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C_in) features at unique (batch, grid_coord) sites -> (N, channels[-1]), as the spconv module.
        ``context`` is not read: the engine folded the wrapper's embedding row of each condition into its norms."""
        engine = self.engine(feat.device)
        maps = engine.kernel_maps(grid_coord, batch)
        index = engine.condition_index(condition) if engine.conditions else 0
        (features,) = engine(*engine.example_inputs(maps, feat, index))
        return features


def _stage(blocks: list[nn.Module]) -> nn.Sequential:
    """Blocks named ``block0``, ``block1``… (the official names; the same keys for both variants)."""
    return nn.Sequential(OrderedDict((f"block{i}", b) for i, b in enumerate(blocks)))


class _Block(nn.Module):
    """A BasicBlock's weights (either variant: the spec names the projection's spelling)."""

    def __init__(self, spec: BlockSpec, norm: Callable[[int], nn.Module]):
        super().__init__()
        register_block(self, spec, ConvWeights, norm)


def _conv_norm_v1m1(spec: ConvNormSpec) -> nn.Sequential:
    return nn.Sequential(ConvWeights(spec.conv), _bn(spec.norm.channels), nn.ReLU())


class EngineBackedV1m1(_EngineBacked):
    """`SpUNetV1m1`'s layout (keys ``conv_input.0.weight``, ``enc.0.block0.conv1.weight``, ``final.*``...)."""

    def __init__(self, in_channels: int, num_classes: int = 0, base_channels: int = 32,
                 channels: tuple[int, ...] = DEFAULT_CHANNELS, layers: tuple[int, ...] = DEFAULT_LAYERS):
        super().__init__()
        self._init_engines()
        layout = SpUNetLayout.build("v1m1", in_channels, num_classes, base_channels, channels, layers)
        self._assemble(layout, _conv_norm_v1m1, lambda spec: _Block(spec, _bn), _stage, ConvWeights, nn.Identity)


class _ConvNorm(nn.Module):
    def __init__(self, conv: ConvWeights, norm: PDBatchNorm):
        super().__init__()
        self.conv, self.bn, self.act = conv, norm, nn.ReLU()


class EngineBackedV1m3(_EngineBacked):
    """`SpUNetV1m3`'s layout (PDNorm: ``conv_input.conv.weight``, ``…bn1.bns.0.weight``, ``…modulation.1.*``)."""

    def __init__(self, in_channels: int, num_classes: int = 0, base_channels: int = 32, context_channels: int = 256,
                 channels: tuple[int, ...] = DEFAULT_CHANNELS, layers: tuple[int, ...] = DEFAULT_LAYERS,
                 conditions: tuple[str, ...] = ("ScanNet", "S3DIS", "Structured3D"),
                 norm_decouple: bool = True, norm_adaptive: bool = True, norm_affine: bool = True):
        super().__init__()
        self._init_engines()
        self.conditions = tuple(conditions)

        def norm_fn(c: int) -> PDBatchNorm:
            return PDBatchNorm(c, context_channels, self.conditions, norm_decouple, norm_adaptive, norm_affine)

        def conv_norm(spec: ConvNormSpec) -> _ConvNorm:
            return _ConvNorm(ConvWeights(spec.conv), norm_fn(spec.norm.channels))

        layout = SpUNetLayout.build("v1m3", in_channels, num_classes, base_channels, channels, layers)
        self._assemble(layout, conv_norm, lambda spec: _Block(spec, norm_fn), _stage, ConvWeights, nn.Identity)


def build_engine_backed(cfg: BackboneConfig) -> _EngineBacked:
    """The engine-backed twin of `model.build.build_backbone` (same arguments, same state_dict layout)."""
    if cfg.type == "SpUNet-v1m1":
        return EngineBackedV1m1(cfg.in_channels, cfg.num_classes, cfg.base_channels, cfg.channels, cfg.layers)
    if cfg.type == "SpUNet-v1m3":
        return EngineBackedV1m3(cfg.in_channels, cfg.num_classes, cfg.base_channels, cfg.context_channels,
                                cfg.channels, cfg.layers, cfg.conditions, cfg.norm_decouple, cfg.norm_adaptive,
                                cfg.norm_affine)
    raise ValueError(f"unknown backbone type {cfg.type!r}; expected 'SpUNet-v1m1' or 'SpUNet-v1m3'")


def attach_all(model: nn.Module, config: ModelConfig) -> None:
    """Attach every engine-backed backbone inside ``model`` to it (see `_EngineBacked.attach`)."""
    for module in model.modules():
        if isinstance(module, _EngineBacked):
            module.attach(model, config)


def use_engine(model: nn.Module, engine: SpUNetEngine, device: torch.device | str) -> None:
    """Let every engine-backed backbone inside ``model`` run on ``device`` with ``engine`` (built from the same
    weights without heads), instead of building its own."""
    for module in model.modules():
        if isinstance(module, _EngineBacked):
            module.use_engine(engine, device)
