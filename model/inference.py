"""Predictor: one loaded model and the steps every caller shares (CLI, service workers, training eval).

Flow: PointCloud → ``prepare`` (voxelize) → ``encode`` (backbone, batched) → ``classify`` (head) → per-point
results through ``point_to_voxel``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import LoadedModel, load_checkpoint
from model.config import ModelConfig
from model.engine.encoder import Encoder, SpconvEncoder, model_encoder, place
from model.pointcloud.cloud import PointCloud
from model.pointcloud.voxelize import VoxelizedCloud, voxelize

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str
    conditions: tuple[str, ...]
    class_names: dict[str, tuple[str, ...]]
    feature_dim: int
    grid_size: float
    input_features: tuple[str, ...]
    version: str


@dataclass
class FeatureResult:
    voxel_features: np.ndarray   # (M, C) float32
    point_to_voxel: np.ndarray   # (N,) int64
    grid_coord: np.ndarray       # (M, 3) int32

    def point_features(self) -> np.ndarray:
        """(N, C) float32 features of every input point, in input order."""
        return self.voxel_features[self.point_to_voxel]


@dataclass
class SegmentResult:
    logits: np.ndarray           # (N, K) float32
    labels: np.ndarray           # (N,) int32
    class_names: tuple[str, ...]


class Predictor:
    """Thread-safe inference around one model. ``encode`` runs one forward pass over a batch of scenes;
    rows of different scenes never interact (each scene gets its own batch index)."""

    def __init__(self, loaded: LoadedModel, device: str | torch.device = "cpu", encoder: Encoder | None = None):
        """``encoder``: any `model.engine.encoder.Encoder` (the torch engine, onnxruntime, TensorRT...);
        None = the model's own spconv modules, which follow the live model (training evaluation).
        Heads always run here in PyTorch. `load_predictor` picks the fastest encoder by default."""
        self.config: ModelConfig = loaded.config
        self.source = loaded.source
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no CUDA GPU is available")
        self.model = place(loaded.model, self.device).eval()  # spconv algorithm chosen here, once
        self.encoder: Encoder = encoder if encoder is not None else SpconvEncoder(self.model, self.device)
        cfg = self.config
        self.info = ModelInfo(name=cfg.name, kind=cfg.kind, conditions=cfg.conditions, class_names=cfg.class_names,
                              feature_dim=cfg.feature_dim, grid_size=cfg.grid_size,
                              input_features=cfg.input_features, version=cfg.version)

    @property
    def backend(self) -> str:
        """The encoder's name: spconv, torch (the engine), onnxruntime, tensorrt."""
        return getattr(self.encoder, "name", type(self.encoder).__name__)

    @property
    def has_classifier(self) -> bool:
        return bool(getattr(self.model, "has_classifier", False))

    def resolve_condition(self, condition: str | None) -> str | None:
        conditions = self.config.conditions
        if not conditions:
            if condition not in (None, "", "default"):
                raise ValueError(f"this model takes no condition (got {condition!r})")
            return None
        if condition in (None, ""):
            return self.config.default_condition()
        if condition not in conditions:
            raise ValueError(f"unknown condition {condition!r}; this model supports {list(conditions)}")
        return condition

    def prepare(self, cloud: PointCloud, grid_size: float | None = None) -> VoxelizedCloud:
        return voxelize(cloud, grid_size or self.config.grid_size, self.config.input_features)

    @torch.no_grad()
    def encode(self, batch: list[VoxelizedCloud], condition: str | None = None) -> list[np.ndarray]:
        """Per-voxel features (M_i, C) for each scene, from one forward pass over the whole batch."""
        condition = self.resolve_condition(condition)
        return [np.ascontiguousarray(f, dtype=np.float32) for f in self.encoder.encode(batch, condition)]

    @torch.no_grad()
    def classify(self, voxel_features: list[np.ndarray], condition: str | None = None) -> list[np.ndarray]:
        if not self.has_classifier:
            raise ValueError(f"model {self.info.name!r} ({self.info.kind}) has no segmentation head")
        condition = self.resolve_condition(condition)
        out = []
        for features in voxel_features:
            logits = self.model.classify(torch.from_numpy(features).to(self.device), condition)
            out.append(logits.float().cpu().numpy())
        return out

    def class_names(self, condition: str | None) -> tuple[str, ...]:
        condition = self.resolve_condition(condition)
        names = self.config.labels_for(condition)
        return names

    def features(self, cloud: PointCloud, condition: str | None = None, grid_size: float | None = None) -> FeatureResult:
        voxels = self.prepare(cloud, grid_size)
        (features,) = self.encode([voxels], condition)
        return FeatureResult(features, voxels.point_to_voxel, voxels.grid_coord)

    def segment(self, cloud: PointCloud, condition: str | None = None, grid_size: float | None = None,
                precise: bool = False) -> SegmentResult:
        """Fast mode: one pass, logits of each point's voxel. Precise mode (the official tester): 13 test-time
        augmentations × test fragments, softmax summed per point; ``logits`` are then log mean probabilities."""
        if precise:
            from model.tta import precise_probabilities

            if not self.has_classifier:
                raise ValueError(f"model {self.info.name!r} ({self.info.kind}) has no segmentation head")
            summed = precise_probabilities(self, cloud, self.resolve_condition(condition), grid_size)
            logits = np.log(np.maximum(summed / summed.sum(axis=1, keepdims=True), 1e-12)).astype(np.float32)
        else:
            result = self.features(cloud, condition, grid_size)
            (voxel_logits,) = self.classify([result.voxel_features], condition)
            logits = voxel_logits[result.point_to_voxel]
        names = self.class_names(condition)
        if len(names) != logits.shape[1]:
            names = tuple(f"class{i}" for i in range(logits.shape[1]))
        return SegmentResult(logits=logits, labels=logits.argmax(axis=1).astype(np.int32), class_names=names)


DEFAULT_PARTS = {"segment": ".", "features": ".", "detect": "detect", "render": "render"}


def default_checkpoint(task: str = "segment") -> Path:
    """The bundled default model for a task: the segmentation model at the folder's top (also for features),
    ``detect/`` and ``render/`` beside it (see model/default_model/MODEL_CARD.md)."""
    path = (DEFAULT_MODEL_DIR / DEFAULT_PARTS[task]).resolve()
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"the bundled default model is missing from {path}; pass --checkpoint to name one")
    return path


def load_predictor(checkpoint: str | Path | None = None, device: str = "cpu", trust_checkpoint: bool = False,
                   backend: str = "auto", precision: str = "fp32", encoder=None) -> Predictor:
    """Load a checkpoint (default: the bundled model) with a model-internal encoder: ``backend`` "auto"
    (the fastest exact one for the device: the torch engine when it can run the checkpoint, else spconv),
    "torch" (the engine) or "spconv". ``encoder``: a callable ``(loaded, device) -> Encoder`` for
    encoders built outside model (onnxruntime / TensorRT, see export/backends.py); it overrides backend."""
    path = Path(checkpoint) if checkpoint is not None else default_checkpoint()
    loaded = load_checkpoint(path, trust=trust_checkpoint)
    if loaded.config.name == "ponder" and checkpoint is not None:
        loaded.config.name = path.stem if path.is_file() else path.name
    if encoder is not None:
        made = encoder(loaded, device)
    else:
        made = model_encoder(backend, loaded, device, precision)
        if isinstance(made, SpconvEncoder):
            made = None  # the Predictor builds it on the placed model
    return Predictor(loaded, device, encoder=made)
