"""The SpUNet's structure, written once: `SpUNetLayout`.

Four things are built from the same UNet: the spconv modules (`spunet_v1m1`, `spunet_v1m3`), their
spconv-free twins (`engine_backed`) and the folded-norm engine (`model.engine.unet`, exported as
`export.graph.GatherSpUNet`). Each used to re-derive the channel widths (the decoder's concat width, the
up conv's input) and the official key names; now each iterates this one description, so they cannot drift
apart and an official checkpoint's keys are named in one place. `SpUNetModule` assembles a module tree
from it through per-variant factories and holds what the three module classes share (``classify``,
``forward``). Nothing here imports spconv.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from model.sparse.pointwise import pointwise

if TYPE_CHECKING:
    from model.config import BackboneConfig

Variant = Literal["v1m1", "v1m3"]
ConvKind = Literal["subm", "down", "inverse"]
VARIANTS: dict[str, Variant] = {"SpUNet-v1m1": "v1m1", "SpUNet-v1m3": "v1m3"}  # BackboneConfig.type -> variant

# How each variant spells a conv + norm pair: (conv, norm) of stem/down/up, (conv, norm) of a block's projection.
# v1m1 keeps the official nn.Sequential indices; v1m3 (PDNorm) names them, as the official v1m3 code does.
_SPELLING: dict[str, tuple[str, str, str, str]] = {
    "v1m1": ("0", "1", "proj.0", "proj.1"),
    "v1m3": ("conv", "bn", "proj_conv", "proj_norm"),
}
FINAL = "final"  # the classifier's key (both variants)
DEFAULT_CHANNELS = (32, 64, 128, 256, 256, 128, 96, 96)
DEFAULT_LAYERS = (2, 3, 4, 6, 2, 2, 2, 2)


@dataclass(frozen=True)
class ConvSpec:
    """One sparse conv. ``key`` is its state_dict prefix (``<key>.weight`` (C_out, k, k, k, C_in), and
    ``<key>.bias`` when ``bias``); ``kind``: submanifold, k2s2 down, or the inverse of the down conv that
    shares its ``indice_key`` (spconv's site bookkeeping)."""

    key: str
    in_channels: int
    out_channels: int
    kernel_size: int
    kind: ConvKind = "subm"
    indice_key: str | None = None
    bias: bool = False

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        k = self.kernel_size
        return (self.out_channels, k, k, k, self.in_channels)


@dataclass(frozen=True)
class NormSpec:
    """One norm (BatchNorm for v1m1, PDNorm for v1m3) over ``channels``; its keys start with ``<key>.``."""

    key: str
    channels: int


@dataclass(frozen=True)
class ConvNormSpec:
    """conv, norm, ReLU: the stem, a down conv or an up conv (``key`` is the module's own prefix)."""

    key: str
    conv: ConvSpec
    norm: NormSpec


@dataclass(frozen=True)
class BlockSpec:
    """BasicBlock ``relu(norm2(conv2(relu(norm1(conv1(x))))) + proj(x))``; ``proj`` (1x1 conv + norm) only
    when the width changes (the first decoder block, which takes the concat), else the identity.
    ``split_proj``: v1m3 registers the projection as ``proj_conv``/``proj_norm`` (and an empty ``proj`` when
    there is none), v1m1 as the Sequential ``proj`` (see `register_block`)."""

    key: str
    conv1: ConvSpec
    norm1: NormSpec
    conv2: ConvSpec
    norm2: NormSpec
    proj: ConvNormSpec | None
    split_proj: bool = False

    @property
    def in_channels(self) -> int:
        return self.conv1.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv2.out_channels

    def parts(self) -> Iterator[ConvSpec | NormSpec]:
        """Convs and norms in registration (state_dict) order: the projection first, as the official code."""
        if self.proj is not None:
            yield from (self.proj.conv, self.proj.norm)
        yield from (self.conv1, self.norm1, self.conv2, self.norm2)


@dataclass(frozen=True)
class SpUNetLayout:
    """The whole UNet for one variant and size. Stage s: ``down[s]`` (level s -> s+1, k2s2) and the encoder
    blocks ``enc[s]`` at level s+1; ``up[s]`` (level s+1 -> s, inverse of ``down[s]``) and the decoder
    blocks ``dec[s]`` at level s, whose block0 takes [upsampled, skip] (concat). ``final``: the 1x1
    classifier when ``num_classes > 0``. Build with `build` or `from_config`."""

    variant: Variant
    in_channels: int
    num_classes: int
    base_channels: int
    channels: tuple[int, ...]
    layers: tuple[int, ...]
    stem: ConvNormSpec
    down: tuple[ConvNormSpec, ...]
    enc: tuple[tuple[BlockSpec, ...], ...]
    up: tuple[ConvNormSpec, ...]
    dec: tuple[tuple[BlockSpec, ...], ...]
    final: ConvSpec | None

    @classmethod
    def build(cls, variant: Variant, in_channels: int, num_classes: int = 0, base_channels: int = 32,
              channels: Sequence[int] = DEFAULT_CHANNELS, layers: Sequence[int] = DEFAULT_LAYERS) -> SpUNetLayout:
        if variant not in _SPELLING:
            raise ValueError(f"unknown SpUNet variant {variant!r}; expected one of {list(_SPELLING)}")
        channels, layers = tuple(int(c) for c in channels), tuple(int(n) for n in layers)
        if len(layers) % 2 or len(layers) != len(channels) or not layers:
            raise ValueError(f"channels {channels} and layers {layers} must have the same even length")
        conv_name, norm_name, proj_conv, proj_norm = _SPELLING[variant]

        def conv_norm(key: str, c_in: int, c_out: int, kernel: int, kind: ConvKind, indice_key: str) -> ConvNormSpec:
            return ConvNormSpec(key, ConvSpec(f"{key}.{conv_name}", c_in, c_out, kernel, kind, indice_key),
                                NormSpec(f"{key}.{norm_name}", c_out))

        def blocks(part: str, c_in: int, c_out: int, n: int, indice_key: str) -> tuple[BlockSpec, ...]:
            out = []
            for i in range(n):
                key, b_in = f"{part}.block{i}", c_in if i == 0 else c_out
                proj = None
                if b_in != c_out:
                    proj = ConvNormSpec(f"{key}.proj", ConvSpec(f"{key}.{proj_conv}", b_in, c_out, 1),
                                        NormSpec(f"{key}.{proj_norm}", c_out))
                out.append(BlockSpec(key, ConvSpec(f"{key}.conv1", b_in, c_out, 3, indice_key=indice_key),
                                     NormSpec(f"{key}.bn1", c_out),
                                     ConvSpec(f"{key}.conv2", c_out, c_out, 3, indice_key=indice_key),
                                     NormSpec(f"{key}.bn2", c_out), proj, variant == "v1m3"))
            return tuple(out)

        stages = len(layers) // 2
        down, enc, up, dec = [], [], [], []
        enc_in, dec_ch = base_channels, channels[-1]  # level s's encoder width; the decoder width at level s
        for s in range(stages):
            spconv_key = f"spconv{s + 1}"
            down.append(conv_norm(f"down.{s}", enc_in, channels[s], 2, "down", spconv_key))
            enc.append(blocks(f"enc.{s}", channels[s], channels[s], layers[s], f"subm{s + 1}"))
            up_in = channels[len(channels) - s - 2]  # the output width of the level below (encoder or decoder)
            up.append(conv_norm(f"up.{s}", up_in, dec_ch, 2, "inverse", spconv_key))
            dec.append(blocks(f"dec.{s}", dec_ch + enc_in, dec_ch, layers[len(channels) - s - 1], f"subm{s}"))
            enc_in, dec_ch = channels[s], up_in
        final = ConvSpec(FINAL, channels[-1], num_classes, 1, bias=True) if num_classes > 0 else None
        return cls(variant, in_channels, num_classes, base_channels, channels, layers,
                   conv_norm("conv_input", in_channels, base_channels, 5, "subm", "stem"),
                   tuple(down), tuple(enc), tuple(up), tuple(dec), final)

    @classmethod
    def from_config(cls, cfg: BackboneConfig) -> SpUNetLayout:
        """From a `model.config.BackboneConfig` (its ``type`` names the variant)."""
        if cfg.type not in VARIANTS:
            raise ValueError(f"unknown backbone type {cfg.type!r}; expected one of {list(VARIANTS)}")
        return cls.build(VARIANTS[cfg.type], cfg.in_channels, cfg.num_classes, cfg.base_channels, cfg.channels,
                         cfg.layers)

    @property
    def num_stages(self) -> int:
        return len(self.layers) // 2

    @property
    def out_channels(self) -> int:
        return self.channels[-1]

    def parts(self) -> Iterator[ConvSpec | NormSpec]:
        """Every conv and norm in state_dict order: stem, down.*, up.*, enc.*, dec.*, final (the official
        modules register the four ModuleLists in that order)."""
        for cn in (self.stem, *self.down, *self.up):
            yield from (cn.conv, cn.norm)
        for stage in (*self.enc, *self.dec):
            for block in stage:
                yield from block.parts()
        if self.final is not None:
            yield self.final

    def convs(self) -> Iterator[ConvSpec]:
        return (p for p in self.parts() if isinstance(p, ConvSpec))

    def keys(self, norm_keys: Callable[[int], Iterable[str]]) -> list[str]:
        """The backbone's state_dict keys in order; ``norm_keys(channels)`` names a norm's own keys (those of
        its module's state_dict: they depend on the norm, e.g. PDNorm's banks, not on the UNet)."""
        out: list[str] = []
        for p in self.parts():
            if isinstance(p, NormSpec):
                out += [f"{p.key}.{k}" for k in norm_keys(p.channels)]
            else:
                out += [f"{p.key}.weight"] + ([f"{p.key}.bias"] if p.bias else [])
        return out


def register_block(block: nn.Module, spec: BlockSpec, conv: Callable[[ConvSpec], nn.Module],
                   norm: Callable[[int], nn.Module], sequential: Callable[..., nn.Module] = nn.Sequential) -> None:
    """Give ``block`` a BasicBlock's submodules under the variant's names, created in the official order
    (projection, conv1, bn1, relu, conv2, bn2). ``conv``: the layer of a described conv (spconv's, or bare
    weights); ``norm``: BatchNorm or PDNorm of a width; ``sequential``: spconv's container where it runs."""
    if spec.proj is None:
        block.proj = sequential(nn.Identity())  # no keys, kept for the official layout
        if spec.split_proj:
            block.proj_conv = block.proj_norm = None
    elif spec.split_proj:
        block.proj_conv, block.proj_norm = conv(spec.proj.conv), norm(spec.proj.norm.channels)
    else:
        block.proj = sequential(conv(spec.proj.conv), norm(spec.proj.norm.channels))
    block.conv1, block.bn1 = conv(spec.conv1), norm(spec.norm1.channels)
    block.relu = nn.ReLU()
    block.conv2, block.bn2 = conv(spec.conv2), norm(spec.norm2.channels)


class SpUNetModule(nn.Module):
    """What the spconv and engine-backed SpUNet modules share: the module tree assembled from a layout,
    the attributes the wrappers read, ``classify`` and ``forward``. Subclasses give ``forward_features``."""

    final: nn.Module

    def _assemble(self, layout: SpUNetLayout, conv_norm: Callable[[ConvNormSpec], nn.Module],
                  block: Callable[[BlockSpec], nn.Module], stage: Callable[[list[nn.Module]], nn.Module],
                  final: Callable[[ConvSpec], nn.Module], identity: Callable[[], nn.Module]) -> None:
        """Register ``conv_input``, ``down``, ``up``, ``enc``, ``dec``, ``final`` as the official code does.
        Modules are created in the official order too (stem; per stage down, enc, up, dec; final), so a seeded
        initialisation draws the same numbers."""
        self.layout = layout
        self.in_channels, self.num_classes = layout.in_channels, layout.num_classes
        self.channels, self.layers = layout.channels, layout.layers
        self.num_stages, self.out_channels = layout.num_stages, layout.out_channels
        self.conv_input = conv_norm(layout.stem)
        self.down, self.up, self.enc, self.dec = nn.ModuleList(), nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for s in range(layout.num_stages):
            self.down.append(conv_norm(layout.down[s]))
            self.enc.append(stage([block(b) for b in layout.enc[s]]))
            self.up.append(conv_norm(layout.up[s]))
            self.dec.append(stage([block(b) for b in layout.dec[s]]))
        self.final = final(layout.final) if layout.final is not None else identity()

    def forward_features(self, feat: torch.Tensor, grid_coord: torch.Tensor, batch: torch.Tensor,
                         condition: str | None = None, context: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C) decoder features -> (N, num_classes) logits through ``final`` (spconv's 1x1 arithmetic)."""
        if self.num_classes == 0:
            raise ValueError("this backbone has no classifier (num_classes=0)")
        return pointwise(features, self.final)

    def forward(self, feat: torch.Tensor, grid_coord: torch.Tensor, batch: torch.Tensor,
                condition: str | None = None, context: torch.Tensor | None = None) -> torch.Tensor:
        features = self.forward_features(feat, grid_coord, batch, condition, context)
        return self.classify(features) if self.num_classes > 0 else features
