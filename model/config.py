"""Configuration of a servable model: what to build, how to feed it, what its outputs mean.

Stored as ``config.json`` beside ``model.safetensors`` in our checkpoint format, and inferred from the
state_dict for official checkpoints (which carry no config). Read with ``ModelConfig.from_dict`` / ``load``
(``model.config_io``: unknown or mistyped fields are a ``ConfigError`` naming the field).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from model.conditions import default_condition
from model.config_io import FORBID, ConfigError, before, dump, load
from model.render.config import RenderSection

# Names used by the official configs (spec §4.4). The PPT wrapper and the backbone order conditions
# differently: embedding rows / valid_index follow PPT_CONDITIONS, PDNorm banks BACKBONE_CONDITIONS.
PPT_CONDITIONS = ("Structured3D", "ScanNet", "S3DIS")
BACKBONE_CONDITIONS = ("ScanNet", "S3DIS", "Structured3D")
PPT_VALID_INDEX = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 23, 25, 26, 33, 34, 35),
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 15, 20, 22, 24, 25, 27, 34),
    (0, 1, 4, 5, 6, 7, 8, 10, 19, 29, 30, 31, 32),
)
# ScanNet-20 in label order, spelled as the official ScanNet configs' ``data.names`` ("refridgerator" sic; the
# 36-name PPT vocabulary spells it "refrigerator"). The one source of truth: training imports it from here.
SCANNET20_NAMES: tuple[str, ...] = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture", "counter",
    "desk", "curtain", "refridgerator", "shower curtain", "toilet", "sink", "bathtub", "otherfurniture")
S3DIS_NAMES = ("ceiling", "floor", "wall", "beam", "column", "window", "door", "table", "chair", "sofa", "bookcase",
               "board", "clutter")
STRUCTURED3D_NAMES = ("wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "picture", "desk",
                      "shelves", "curtain", "dresser", "pillow", "mirror", "ceiling", "refrigerator", "television",
                      "nightstand", "sink", "lamp", "otherstructure", "otherfurniture", "otherprop")
DATASET_CLASS_NAMES = {"ScanNet": SCANNET20_NAMES, "S3DIS": S3DIS_NAMES, "Structured3D": STRUCTURED3D_NAMES}

KINDS = ("encoder", "segmentor", "ppt-segmentor", "ppt-backbone-segmentor", "pretrain")


@dataclass
class BackboneConfig:
    __pydantic_config__ = FORBID
    type: str = "SpUNet-v1m1"  # or "SpUNet-v1m3" (PDNorm)
    in_channels: int = 6
    num_classes: int = 0
    base_channels: int = 32
    channels: tuple[int, ...] = (32, 64, 128, 256, 256, 128, 96, 96)
    layers: tuple[int, ...] = (2, 3, 4, 6, 2, 2, 2, 2)
    # SpUNet-v1m3 only
    context_channels: int = 256
    conditions: tuple[str, ...] = BACKBONE_CONDITIONS
    norm_decouple: bool = True
    norm_adaptive: bool = True
    norm_affine: bool = True

    @property
    def out_channels(self) -> int:
        return self.channels[-1]


@dataclass
class DetectionDecodeConfig:
    """How votes become boxes (defaults used by ``detect``; each call may override the thresholds).

    seed_threshold: objectness a voxel needs for its vote to count.
    vote_radius: grouping radius around a cluster centre (metres).
    min_votes: clusters with a smaller summed objectness are scaled down in score (support = sum / min_votes).
    max_votes: foreground votes kept (highest objectness first) to bound the cost on huge scenes.
    max_proposals: clusters seeded by farthest-point sampling of the votes.
    score_threshold / iou_threshold: final score cut and per-class 3D NMS IoU.
    max_detections: boxes returned at most.
    """

    __pydantic_config__ = FORBID
    seed_threshold: float = 0.5
    vote_radius: float = 0.3
    min_votes: float = 8.0
    max_votes: int = 50000
    max_proposals: int = 256
    mean_shift_steps: int = 2
    score_threshold: float = 0.3
    iou_threshold: float = 0.25
    max_detections: int = 200


@dataclass
class DetectionConfig:
    """The ``detection`` section of a ModelConfig: the voting head (``model.detection.DetectionHead``) on the
    encoder's ``in_channels`` features, its classes and how its votes are decoded. Kept here, free of torch, so
    that reading a config never imports the detection package."""

    __pydantic_config__ = FORBID
    in_channels: int
    class_names: tuple[str, ...]
    hidden_channels: int = 64
    num_layers: int = 2
    decode: DetectionDecodeConfig = field(default_factory=DetectionDecodeConfig)

    def __post_init__(self) -> None:
        self.class_names = tuple(self.class_names)
        if isinstance(self.decode, Mapping):
            self.decode = load(DetectionDecodeConfig, self.decode, "detection.decode")
        if self.in_channels < 1 or self.hidden_channels < 1 or self.num_layers < 0:
            raise ConfigError(f"invalid detection head sizes: in {self.in_channels}, hidden {self.hidden_channels}, "
                              f"layers {self.num_layers}")
        if not self.class_names:
            raise ConfigError("the detection head needs at least one class name")
        if len(set(self.class_names)) != len(self.class_names):
            raise ConfigError(f"duplicate detection class names: {list(self.class_names)}")


@dataclass
class ModelConfig:
    """Everything needed to rebuild and serve a checkpoint.

    kind: "encoder" (features only), "segmentor" (DefaultSegmentor, logits from ``backbone.final``),
          "ppt-segmentor" (PPT-v1m1 language-guided head), "ppt-backbone-segmentor" (PPT in backbone_mode, e.g.
          ScanNet200), "pretrain" (PonderIndoor-v2: backbone + projection + render decoder).
    conditions: the wrapper's condition order (rows of ``embedding_table`` and ``valid_index``); empty for
          models without PDNorm.
    class_names: label names per condition ("default" for unconditioned models), in label order.
    vocabulary: names of the ``class_embedding`` rows (language-guided models).
    render: the render head and PonderIndoor-v2 options of pre-training checkpoints (``RenderSection``), or of a
          model that also renders; None for none (``{}`` in config.json).
    detection: the 3D detection head (``DetectionConfig``); None for none (``{}`` in config.json).
    """

    __pydantic_config__ = FORBID
    kind: str = "segmentor"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    conditions: tuple[str, ...] = ()
    valid_index: tuple[tuple[int, ...], ...] = ()
    class_names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    vocabulary: tuple[str, ...] = ()
    grid_size: float = 0.02
    input_features: tuple[str, ...] = ("color", "normal")
    render: RenderSection | None = None
    detection: DetectionConfig | None = None
    name: str = "ponder"
    version: str = "1"
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown model kind {self.kind!r}; expected one of {KINDS}")
        if isinstance(self.backbone, Mapping):
            self.backbone = load(BackboneConfig, self.backbone, "backbone")
        self.render = _section(RenderSection, self.render, "render")
        self.detection = _section(DetectionConfig, self.detection, "detection")
        self.conditions = tuple(self.conditions)
        self.valid_index = tuple(tuple(v) for v in self.valid_index)
        self.class_names = {k: tuple(v) for k, v in self.class_names.items()}
        self.vocabulary, self.input_features = tuple(self.vocabulary), tuple(self.input_features)

    @property
    def feature_dim(self) -> int:
        return self.backbone.out_channels

    def default_condition(self) -> str | None:
        """The condition a request naming none runs under (`model.conditions.default_condition`)."""
        return default_condition(self.conditions)

    def labels_for(self, condition: str | None) -> tuple[str, ...]:
        key = condition if condition is not None else "default"
        return self.class_names.get(key, ())

    def to_dict(self) -> dict[str, Any]:
        """The config.json mapping; an absent render/detection section is ``{}`` (as files have always had it)."""
        out = dump(self)
        out["render"], out["detection"] = out["render"] or {}, out["detection"] or {}
        return out

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        return load(cls, data)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        return before(handler, source, _empty_sections)

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data)


def _empty_sections(data: Any) -> Any:
    """``"render": {}`` / ``"detection": {}`` (how config.json spells an absent section) mean None."""
    if isinstance(data, Mapping) and any(k in data and not data[k] for k in ("render", "detection")):
        return {**data, **{k: None for k in ("render", "detection") if k in data and not data[k]}}
    return data


def _section(cls: type, value: Any, where: str) -> Any:
    """A section given as a mapping (direct construction, e.g. ``detection={"in_channels": 8, ...}``) validated into
    ``cls``; an empty one is None."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, Mapping) and not value:
        return None
    return load(cls, value, where)
