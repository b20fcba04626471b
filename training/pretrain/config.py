"""Configuration of rendering pre-training (PonderIndoor-v2, spec §5 and §9), read from YAML.

A YAML file has the sections ``model``, ``data``, ``train`` and optionally ``mask``, ``eval`` and
``out_dir``; see training/configs/pretrain-scannet.yaml (the official ScanNet values) and
pretrain-small-cpu.yaml. ``model.render.head`` takes the fields of ``model.render.RenderHeadConfig``; its
``field`` may be given in full, or as the shortcut ``{hidden_size, geo_dim}`` for the HEAD layout
(``head_field_config``), whose semantic decoder is kept only when ``model.render.semantic`` is true.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from model.config import SCANNET20_NAMES, ModelConfig
from model.config_io import FORBID, from_file
from model.render.config import RenderHeadConfig, RenderSection, expand_field
from training.config_io import ConfigError, as_mapping, load, read_yaml
from training.data.formats import FrameSelection
from training.train_config import TrainConfig, check_threads


@dataclass
class FrameConfig:
    """Which RGB-D frames of a scene are eligible (``training.data.formats.FrameSelection``); the default is
    the official ScanNet train rule ``frames[40:-60:10]``."""

    start: int = 40
    stop: int | None = -60
    step: int = 10
    pre_step: int = 1

    def selection(self) -> FrameSelection:
        return FrameSelection(start=self.start, stop=self.stop, step=self.step, pre_step=self.pre_step)


@dataclass
class GenerateConfig:
    """Generate synthetic scenes into ``data.root`` when it does not exist yet (``ponder datasets generate``)."""

    scenes: int = 2
    seed: int = 0
    frames: int = 20
    image_downscale: int = 4
    points_per_m2: float = 1500.0
    room_x: tuple[float, float] = (3.0, 7.0)
    room_y: tuple[float, float] = (3.0, 6.0)


@dataclass
class DataConfig:
    """Point scenes at ``<root>/<split>/<scene>`` (Pointcept folder or PonderV2 ``.pth``), scene ids from
    ``<root>/<split>.txt`` when present, RGB-D exports at ``<rgbd_root or root/rgbd>/<scene>``. Relative
    paths are relative to the working directory."""

    root: str = "data/scannet"
    split: str = "train"
    rgbd_root: str | None = None
    condition: str = "ScanNet"
    num_cameras: int = 5
    frames: FrameConfig = field(default_factory=FrameConfig)
    skip_list: str | None = None      # ScanNet skip.lst
    align_axis: bool = False
    dropout: float = 0.8              # RandomDropout ratio, always applied (official pre-train pipeline)
    augment: bool = True              # rotations, scale, flips
    max_scenes: int | None = None
    max_points: int = 2_000_000       # collate drops a sample that would push the batch past this
    generate: GenerateConfig | None = None

    def rgbd_dir(self) -> Path:
        return Path(self.rgbd_root) if self.rgbd_root else Path(self.root) / "rgbd"


@dataclass
class MaskConfig:
    """Block masking (spec §5.3): points of dropped ``size``-voxel blocks get ``mtoken`` as features."""

    ratio: float = 0.5
    size: int = 8


@dataclass
class EvalConfig:
    """Held-out views for ``evaluate``: frames of ``split`` scenes chosen by ``frames`` (e.g. those the train
    selection skips), ``views`` per scene, the first ``scenes`` scenes."""

    split: str = "train"
    frames: FrameConfig = field(default_factory=lambda: FrameConfig(start=45, stop=-60, step=10))
    scenes: int = 1
    views: int = 2
    chunk: int = 4096


@dataclass
class PretrainConfig:
    """``model`` is read by ``build_model_config`` (the YAML form of a ``kind: pretrain`` ModelConfig, with the
    render-head shortcuts); every other section by the typed loader."""

    __pydantic_config__ = FORBID  # also refuses unknown keys in every section nested here
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mask: MaskConfig | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    out_dir: str = "runs/pretrain"
    class_embedding: str | None = None  # .npy (vocabulary, 512) text embeddings for the semantic targets
    threads: int | None = None          # torch CPU threads (1 avoids thrashing on a busy, shared CPU)

    @property
    def render(self) -> RenderSection:
        assert self.model.render is not None  # build_model_config always sets it
        return self.model.render

    @property
    def head(self) -> RenderHeadConfig:
        return self.render.head

    @property
    def semantic(self) -> bool:
        return self.render.semantic

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PretrainConfig":
        data = as_mapping(data, "the config")
        if "model" not in data:
            raise ConfigError("the config has no 'model' section")
        sections = {**data, "model": build_model_config(data["model"])}
        if not sections.get("mask"):
            sections["mask"] = None
        cfg = load(cls, sections)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        head = self.head
        self.train.validate()
        check_threads(self.threads)
        for name, value in (("eval.scenes", self.eval.scenes), ("eval.views", self.eval.views),
                            ("eval.chunk", self.eval.chunk)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.data.num_cameras < 1:
            raise ConfigError(f"data.num_cameras must be at least 1, got {self.data.num_cameras}")
        if not 0 <= self.data.dropout < 1:
            raise ConfigError(f"data.dropout must lie in [0, 1), got {self.data.dropout}")
        if self.data.condition not in self.model.conditions:
            raise ConfigError(f"data.condition {self.data.condition!r} is not one of model.conditions "
                              f"{list(self.model.conditions)}")
        if head.field.rgb_decoder is None:
            raise ConfigError("pre-training renders colour: the render head needs an rgb_decoder")
        if head.loss.semantic_loss > 0 and not (self.semantic and head.field.semantic_decoder is not None):
            raise ConfigError("loss.semantic_loss > 0 needs model.render.semantic: true and a semantic decoder "
                              "(or set the semantic loss weight to 0)")
        if self.mask is not None:
            if self.render.mask_channels != self.model.backbone.in_channels:
                raise ConfigError("block masking needs model.render.mask_channels equal to the backbone's "
                                  f"in_channels ({self.model.backbone.in_channels})")
            if not 0 < self.mask.ratio < 1 or self.mask.size < 1:
                raise ConfigError(f"mask.ratio must lie in (0, 1) and mask.size be >= 1, got {self.mask}")


def load_config(path: str | Path) -> PretrainConfig:
    return from_file(path, read_yaml, PretrainConfig.from_dict)


def build_model_config(data: Mapping[str, Any]) -> ModelConfig:
    """A ``kind: pretrain`` ModelConfig from the YAML ``model`` section: a ModelConfig mapping whose ``render``
    is ``{head, semantic (default false), proj_head (default: semantic), mask_channels}``, with defaults for
    ``conditions`` ([ScanNet]), ``vocabulary`` (ScanNet-20) and ``valid_index`` (every vocabulary row)."""
    data = dict(as_mapping(data, "model"))
    if data.pop("kind", "pretrain") != "pretrain":
        raise ConfigError("model.kind of a pre-training config can only be 'pretrain'")
    render = dict(as_mapping(data.pop("render", {}), "model.render"))
    head = dict(as_mapping(render.pop("head", {}), "model.render.head"))
    semantic = load(bool, render.pop("semantic", False), "model.render.semantic")
    flags = {"proj_head": render.pop("proj_head", semantic), "mask_channels": render.pop("mask_channels", 0)}
    if render:
        raise ConfigError(f"unknown model.render keys: {sorted(render)} "
                          "(known: ['head', 'mask_channels', 'proj_head', 'semantic'])")
    head.setdefault("grid_size", data.setdefault("grid_size", 0.02))
    render_section = load(RenderSection, {"head": _head_config(head, semantic), "semantic": semantic, **flags},
                          "model.render")
    render_section.proj_head = render_section.proj_head and semantic  # the projection exists for semantics only
    vocabulary = data.setdefault("vocabulary", SCANNET20_NAMES)
    conditions = data.setdefault("conditions", ("ScanNet",))
    rows = tuple(range(len(vocabulary))) if isinstance(vocabulary, (list, tuple)) else ()
    data.setdefault("valid_index", [rows] * len(conditions) if isinstance(conditions, (list, tuple)) else ())
    cfg = load(ModelConfig, {**data, "kind": "pretrain", "render": render_section}, "model")
    if cfg.grid_size != render_section.head.grid_size:
        raise ConfigError(f"model.grid_size {cfg.grid_size} (voxelisation) and model.render.head.grid_size "
                          f"{render_section.head.grid_size} (dense volume) must be equal")
    if cfg.backbone.out_channels != render_section.head.projection.in_channels:
        raise ConfigError(f"the backbone gives {cfg.backbone.out_channels} channels but the projection takes "
                          f"{render_section.head.projection.in_channels}")
    if len(cfg.valid_index) != len(cfg.conditions):
        raise ConfigError(f"{len(cfg.valid_index)} valid_index lists for {len(cfg.conditions)} conditions")
    return cfg


def _head_config(head: dict[str, Any], semantic: bool) -> RenderHeadConfig:
    """``model.render.head``; its ``field`` may be the shortcut ``{hidden_size, geo_dim}`` (the HEAD layout,
    whose semantic decoder is kept only for semantic rendering; ``model.render.config.expand_field``)."""
    where = "model.render.head"
    return load(RenderHeadConfig, expand_field(head, semantic, where), where)
