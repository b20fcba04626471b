"""Configuration of the image model: 2D backbone, lifting, and the render head it shares with the point-cloud
model (``model.render.RenderHeadConfig``). Stored as ``config.json`` beside ``model.safetensors`` with
``kind: image-render``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from model.config_io import FORBID, ConfigError, before, dump, load
from model.render.config import RenderHeadConfig, expand_field

KIND = "image-render"
FUSIONS = ("mean", "learned")


@dataclass(frozen=True)
class ImageBackboneConfig:
    __pydantic_config__ = FORBID
    depth: int = 18   # ResNet-18 or -34 block counts
    width: int = 64   # first-stage channels (64 = torchvision's, needed for its weights)
    stages: int = 3   # 3: strides 4, 8, 16


@dataclass(frozen=True)
class LiftConfig:
    __pydantic_config__ = FORBID
    dim: int = 32             # common width of every stage's features before lifting
    fusion: str = "mean"      # "mean" (masked mean) or "learned" (masked softmax of a per-view score)
    variance: bool = True     # also lift the across-view variance (photo-consistency)

    @property
    def channels(self) -> int:
        """Channels of the lifted volume: mean (dim) [+ variance (dim)] + the fraction of views that see it."""
        return self.dim * (2 if self.variance else 1) + 1


def image_render_head(render: Mapping[str, Any], lift: LiftConfig | None) -> Mapping[str, Any]:
    """The ``render`` mapping of an image model with its image defaults: ``projection.in_channels`` is the lifted
    channels of ``lift`` (None: left to the head's own default), and ``field`` may be absent or the shortcut
    ``{hidden_size, geo_dim}`` (the HEAD decoder layout without a semantic decoder)."""
    proj = render.get("projection", {})
    if lift is not None and isinstance(proj, Mapping):
        render = {**render, "projection": {"in_channels": lift.channels, **proj}}
    return expand_field(render, semantic=False, where="render")


def _render_defaults(data: Any) -> Any:
    """Before validation: the ``render`` of ``image_render_head`` for this config's ``lift`` (when ``lift`` is
    invalid, no default in_channels: the validation of ``lift`` then names the field)."""
    if not isinstance(data, Mapping) or not isinstance(data.get("render", {}), Mapping):
        return data
    try:
        lift = load(LiftConfig, data.get("lift", {}))
    except ConfigError:
        lift = None
    return {**data, "render": image_render_head(data.get("render", {}), lift)}


@dataclass
class ImageModelConfig:
    """Read with ``from_dict`` / ``load`` (the typed loader, ``model.config_io``), checked on construction.
    ``render`` is a ``RenderHeadConfig`` mapping; in a mapping, ``render.field`` may be the shortcut
    ``{hidden_size, geo_dim}`` and ``render.projection.in_channels`` defaults to the lifted channels."""

    __pydantic_config__ = FORBID
    kind: str = KIND
    name: str = "ponder-images"
    backbone: ImageBackboneConfig = field(default_factory=ImageBackboneConfig)
    lift: LiftConfig = field(default_factory=LiftConfig)
    render: RenderHeadConfig = field(
        default_factory=lambda: load(RenderHeadConfig, image_render_head({}, LiftConfig()), "render"))

    def __post_init__(self) -> None:
        self.validate()

    @property
    def lifted_channels(self) -> int:
        """``lift.channels``: what ``render.projection`` takes in."""
        return self.lift.channels

    def validate(self) -> None:
        if self.kind != KIND:
            raise ConfigError(f"not an image model config (kind {self.kind!r}, expected {KIND!r})")
        if self.lift.fusion not in FUSIONS:
            raise ConfigError(f"lift.fusion must be one of {FUSIONS}, got {self.lift.fusion!r}")
        if self.lift.dim < 1:
            raise ConfigError(f"lift.dim must be positive, got {self.lift.dim}")
        if self.render.projection.in_channels != self.lifted_channels:
            raise ConfigError(f"render.projection.in_channels must be {self.lifted_channels} (lifted channels: "
                              f"lift.dim x {2 if self.lift.variance else 1} + 1), got "
                              f"{self.render.projection.in_channels}")
        if self.render.field.rgb_decoder is None:
            raise ConfigError("the image model renders colour: its render head needs an rgb_decoder")

    def to_dict(self) -> dict[str, Any]:
        return dump(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ImageModelConfig":
        """From ``to_dict`` output or a YAML ``model`` section (the typed loader; see the class docstring)."""
        return load(cls, data)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        return before(handler, source, _render_defaults)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "ImageModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
