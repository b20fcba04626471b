"""Configuration of a servable model: what to build, how to feed it, what its outputs mean.

Stored as ``config.json`` beside ``model.safetensors`` in our checkpoint format, and inferred from the
state_dict for official checkpoints (which carry no config).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from model.conditions import default_condition

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
class ModelConfig:
    """Everything needed to rebuild and serve a checkpoint.

    kind: "encoder" (features only), "segmentor" (DefaultSegmentor, logits from ``backbone.final``),
          "ppt-segmentor" (PPT-v1m1 language-guided head), "ppt-backbone-segmentor" (PPT in backbone_mode, e.g.
          ScanNet200), "pretrain" (PonderIndoor-v2: backbone + projection + render decoder).
    conditions: the wrapper's condition order (rows of ``embedding_table`` and ``valid_index``); empty for
          models without PDNorm.
    class_names: label names per condition ("default" for unconditioned models), in label order.
    vocabulary: names of the ``class_embedding`` rows (language-guided models).
    render: the render-decoder configuration of pre-training checkpoints (see model.render).
    """

    kind: str = "segmentor"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    conditions: tuple[str, ...] = ()
    valid_index: tuple[tuple[int, ...], ...] = ()
    class_names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    vocabulary: tuple[str, ...] = ()
    grid_size: float = 0.02
    input_features: tuple[str, ...] = ("color", "normal")
    render: dict[str, Any] = field(default_factory=dict)
    detection: dict[str, Any] = field(default_factory=dict)
    name: str = "ponder"
    version: str = "1"
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown model kind {self.kind!r}; expected one of {KINDS}")
        if isinstance(self.backbone, dict):
            self.backbone = BackboneConfig(**_tuples(self.backbone))
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
        return asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data)


def _tuples(data: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
