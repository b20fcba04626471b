"""SpUNet-v1m1 / v1m3 for inference without spconv.

The same module names, registration order and parameter shapes as `spunet_v1m1` / `spunet_v1m3`, so a
checkpoint loads with the same strict key and shape checks and the heads (``final``, the wrappers' embedding
and projection) compute exactly what the spconv modules compute; but each sparse conv is only its weights
(`ConvWeights`) and ``forward_features`` runs `model.engine.SpUNetEngine`, built from the owning model's
weights at the first forward on a device. Nothing here imports spconv, which costs seconds at start-up.
Inference only: the engine folds the weights once, so training uses the spconv modules.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
from torch import nn

from model.backbones.pdnorm import PDBatchNorm
from model.config import BackboneConfig, ModelConfig
from model.sparse.pointwise import pointwise

if TYPE_CHECKING:
    from model.engine.unet import SpUNetEngine


class ConvWeights(nn.Module):
    """A sparse conv's parameters in spconv's layout: weight (C_out, k, k, k, C_in), optional bias (C_out)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = False):
        super().__init__()
        k = kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, k, k, k, in_channels))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_channels)) if bias else None)


def _device_key(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one device
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _bn(channels: int) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(channels, eps=1e-3, momentum=0.01)


class _EngineBacked(nn.Module):
    """Shared by both layouts: attributes the wrappers read, ``classify`` and the engine-run forward."""

    def _common(self, in_channels: int, num_classes: int, channels, layers) -> None:
        assert len(layers) % 2 == 0 and len(layers) == len(channels)
        self.in_channels, self.num_classes = in_channels, num_classes
        self.channels, self.layers = tuple(channels), tuple(layers)
        self.num_stages = len(layers) // 2
        self.out_channels = channels[-1]
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

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        if self.num_classes == 0:
            raise ValueError("this backbone has no classifier (num_classes=0)")
        return pointwise(features, self.final)

    def forward(self, feat, grid_coord, batch, condition=None, context=None) -> torch.Tensor:
        features = self.forward_features(feat, grid_coord, batch, condition, context)
        return self.classify(features) if self.num_classes > 0 else features


class _BlockV1m1(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        if in_channels == out_channels:
            self.proj = nn.Sequential(nn.Identity())
        else:
            self.proj = nn.Sequential(ConvWeights(in_channels, out_channels, 1), _bn(out_channels))
        self.conv1, self.bn1 = ConvWeights(in_channels, out_channels, 3), _bn(out_channels)
        self.relu = nn.ReLU()
        self.conv2, self.bn2 = ConvWeights(out_channels, out_channels, 3), _bn(out_channels)


class EngineBackedV1m1(_EngineBacked):
    """`SpUNetV1m1`'s layout (keys ``conv_input.0.weight``, ``enc.0.block0.conv1.weight``, ``final.*``...)."""

    def __init__(self, in_channels: int, num_classes: int = 0, base_channels: int = 32,
                 channels: tuple[int, ...] = (32, 64, 128, 256, 256, 128, 96, 96),
                 layers: tuple[int, ...] = (2, 3, 4, 6, 2, 2, 2, 2)):
        super().__init__()
        self._common(in_channels, num_classes, channels, layers)
        self.conv_input = nn.Sequential(ConvWeights(in_channels, base_channels, 5), _bn(base_channels), nn.ReLU())
        enc_in, dec_ch = base_channels, channels[-1]
        self.down, self.up, self.enc, self.dec = nn.ModuleList(), nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for s in range(self.num_stages):
            self.down.append(nn.Sequential(ConvWeights(enc_in, channels[s], 2), _bn(channels[s]), nn.ReLU()))
            self.enc.append(nn.Sequential(OrderedDict((f"block{i}", _BlockV1m1(channels[s], channels[s]))
                                                      for i in range(layers[s]))))
            up_in = channels[len(channels) - s - 2]
            self.up.append(nn.Sequential(ConvWeights(up_in, dec_ch, 2), _bn(dec_ch), nn.ReLU()))
            n_dec = layers[len(channels) - s - 1]
            self.dec.append(nn.Sequential(OrderedDict(
                (f"block{i}", _BlockV1m1(dec_ch + enc_in if i == 0 else dec_ch, dec_ch)) for i in range(n_dec))))
            enc_in, dec_ch = channels[s], up_in
        self.final = ConvWeights(channels[-1], num_classes, 1, bias=True) if num_classes > 0 else nn.Identity()


class _ConvNorm(nn.Module):
    def __init__(self, conv: ConvWeights, norm: PDBatchNorm):
        super().__init__()
        self.conv, self.bn, self.act = conv, norm, nn.ReLU()


class _BlockV1m3(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, norm_fn):
        super().__init__()
        if in_channels == out_channels:
            self.proj = nn.Sequential(nn.Identity())
            self.proj_conv = self.proj_norm = None
        else:
            self.proj_conv, self.proj_norm = ConvWeights(in_channels, out_channels, 1), norm_fn(out_channels)
        self.conv1, self.bn1 = ConvWeights(in_channels, out_channels, 3), norm_fn(out_channels)
        self.relu = nn.ReLU()
        self.conv2, self.bn2 = ConvWeights(out_channels, out_channels, 3), norm_fn(out_channels)


class EngineBackedV1m3(_EngineBacked):
    """`SpUNetV1m3`'s layout (PDNorm: ``conv_input.conv.weight``, ``…bn1.bns.0.weight``, ``…modulation.1.*``)."""

    def __init__(self, in_channels: int, num_classes: int = 0, base_channels: int = 32, context_channels: int = 256,
                 channels: tuple[int, ...] = (32, 64, 128, 256, 256, 128, 96, 96),
                 layers: tuple[int, ...] = (2, 3, 4, 6, 2, 2, 2, 2),
                 conditions: tuple[str, ...] = ("ScanNet", "S3DIS", "Structured3D"),
                 norm_decouple: bool = True, norm_adaptive: bool = True, norm_affine: bool = True):
        super().__init__()
        self._common(in_channels, num_classes, channels, layers)
        self.conditions = tuple(conditions)

        def norm_fn(c: int) -> PDBatchNorm:
            return PDBatchNorm(c, context_channels, self.conditions, norm_decouple, norm_adaptive, norm_affine)

        def stage(c_in: int, c_out: int, n: int) -> nn.Module:
            stage = nn.Module()
            for i in range(n):
                stage.add_module(f"block{i}", _BlockV1m3(c_in if i == 0 else c_out, c_out, norm_fn))
            return stage

        self.conv_input = _ConvNorm(ConvWeights(in_channels, base_channels, 5), norm_fn(base_channels))
        enc_in, dec_ch = base_channels, channels[-1]
        self.down, self.up, self.enc, self.dec = nn.ModuleList(), nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for s in range(self.num_stages):
            self.down.append(_ConvNorm(ConvWeights(enc_in, channels[s], 2), norm_fn(channels[s])))
            self.enc.append(stage(channels[s], channels[s], layers[s]))
            up_in = channels[len(channels) - s - 2]
            self.up.append(_ConvNorm(ConvWeights(up_in, dec_ch, 2), norm_fn(dec_ch)))
            self.dec.append(stage(dec_ch + enc_in, dec_ch, layers[len(channels) - s - 1]))
            enc_in, dec_ch = channels[s], up_in
        self.final = ConvWeights(channels[-1], num_classes, 1, bias=True) if num_classes > 0 else nn.Identity()


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
