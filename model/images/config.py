"""Configuration of the image model: 2D backbone, lifting, and the render head it shares with the point-cloud
model (``model.render.RenderHeadConfig``). Stored as ``config.json`` beside ``model.safetensors`` with
``kind: image-render``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from model.render import RenderHeadConfig, head_field_config

KIND = "image-render"
FUSIONS = ("mean", "learned")


@dataclass(frozen=True)
class ImageBackboneConfig:
    depth: int = 18   # ResNet-18 or -34 block counts
    width: int = 64   # first-stage channels (64 = torchvision's, needed for its weights)
    stages: int = 3   # 3: strides 4, 8, 16


@dataclass(frozen=True)
class LiftConfig:
    dim: int = 32             # common width of every stage's features before lifting
    fusion: str = "mean"      # "mean" (masked mean) or "learned" (masked softmax of a per-view score)
    variance: bool = True     # also lift the across-view variance (photo-consistency)


@dataclass
class ImageModelConfig:
    name: str = "ponder-images"
    backbone: ImageBackboneConfig = field(default_factory=ImageBackboneConfig)
    lift: LiftConfig = field(default_factory=LiftConfig)
    render: RenderHeadConfig = field(default_factory=RenderHeadConfig)
    kind: str = KIND

    @property
    def lifted_channels(self) -> int:
        """Channels of the lifted volume: mean (dim) [+ variance (dim)] + the fraction of views that see it."""
        return self.lift.dim * (2 if self.lift.variance else 1) + 1

    def validate(self) -> None:
        if self.kind != KIND:
            raise ValueError(f"not an image model config (kind {self.kind!r}, expected {KIND!r})")
        if self.lift.fusion not in FUSIONS:
            raise ValueError(f"lift.fusion must be one of {FUSIONS}, got {self.lift.fusion!r}")
        if self.lift.dim < 1:
            raise ValueError(f"lift.dim must be positive, got {self.lift.dim}")
        if self.render.projection.in_channels != self.lifted_channels:
            raise ValueError(f"render.projection.in_channels must be {self.lifted_channels} (lifted channels: "
                             f"lift.dim x {2 if self.lift.variance else 1} + 1), got "
                             f"{self.render.projection.in_channels}")
        if self.render.field.rgb_decoder is None:
            raise ValueError("the image model renders colour: its render head needs an rgb_decoder")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "backbone": dataclasses.asdict(self.backbone),
                "lift": dataclasses.asdict(self.lift), "render": self.render.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ImageModelConfig":
        """From ``to_dict`` output or a YAML ``model`` section. ``render.field`` may be the shortcut
        ``{hidden_size, geo_dim}`` (the HEAD decoder layout, no semantic decoder); ``render.projection.in_channels``
        defaults to the lifted channels."""
        if not isinstance(data, Mapping):
            raise ValueError("the image model config must be a mapping")
        unknown = set(data) - {"kind", "name", "backbone", "lift", "render"}
        if unknown:
            raise ValueError(f"unknown image model keys: {sorted(unknown)}")
        try:
            backbone = ImageBackboneConfig(**data.get("backbone", {}))
            lift = LiftConfig(**data.get("lift", {}))
        except TypeError as exc:
            raise ValueError(f"invalid image model config: {exc}") from None
        render = dict(data.get("render", {}))
        proj = dict(render.get("projection", {}))
        proj.setdefault("in_channels", lift.dim * (2 if lift.variance else 1) + 1)
        render["projection"] = proj
        short = render.get("field")
        if short is None or "sdf_decoder" not in short:
            short = dict(short or {})
            if set(short) - {"hidden_size", "geo_dim"}:
                raise ValueError(f"render.field shortcut takes hidden_size and geo_dim, not {sorted(short)}")
            render.pop("field", None)
            head = RenderHeadConfig.from_dict(render)
            f = head_field_config(head.projection.out_channels, short.get("geo_dim", 64), short.get("hidden_size", 128))
            head = dataclasses.replace(head, field=dataclasses.replace(f, semantic_decoder=None))
        else:
            head = RenderHeadConfig.from_dict(render)
        cfg = cls(name=str(data.get("name", "ponder-images")), backbone=backbone, lift=lift, render=head,
                  kind=str(data.get("kind", KIND)))
        cfg.validate()
        return cfg

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "ImageModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
