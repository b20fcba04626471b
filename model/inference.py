"""Predictor: one loaded model and the steps every caller shares (CLI, service workers, training eval).

Flow: PointCloud → ``prepare_input`` (model.prepare: invalid rows, up axis, voxelise) → ``encode`` (backbone,
batched) → ``classify`` (head) → per-point results at the input's length (model.results).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.backbones.engine_backed import use_engine
from model.checkpoint import LoadedModel, load_checkpoint
from model.conditions import resolve_condition
from model.config import ModelConfig
from model.devices import torch_device
from model.engine.encoder import EngineEncoder, Encoder, SpconvEncoder, model_encoder, place
from model.pointcloud.cloud import PointCloud
from model.pointcloud.voxelize import VoxelizedCloud
from model.prepare import InputOptions, PreparedCloud, prepare, prepare_cloud
from model.results import ModelInfo  # noqa: F401  (re-exported)
from model.results import SegmentResult, input_point_to_voxel, point_values, segment_from_voxels, segment_from_votes

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


@dataclass
class FeatureResult:
    voxel_features: np.ndarray   # (M, C) float32
    point_to_voxel: np.ndarray   # (N_valid,) int64, the voxel of each valid point
    grid_coord: np.ndarray       # (M, 3) int32
    prepared: PreparedCloud | None = None  # how the input mapped to the model (dropped rows, rotation)

    @property
    def valid(self) -> np.ndarray | None:
        return None if self.prepared is None else self.prepared.valid

    def point_features(self) -> np.ndarray:
        """(N, C) float32 features of every input point, in input order (NaN rows for dropped points)."""
        return point_values(self.voxel_features, self.point_to_voxel, self.valid)

    def input_point_to_voxel(self) -> np.ndarray:
        """(N,) voxel row of every input point; -1 for dropped points."""
        return input_point_to_voxel(self.point_to_voxel, self.valid)


class Predictor:
    """Thread-safe inference around one model. ``encode`` runs one forward pass over a batch of scenes;
    rows of different scenes never interact (each scene gets its own batch index)."""

    def __init__(self, loaded: LoadedModel, device: str | torch.device = "cpu", encoder: Encoder | None = None):
        """``encoder``: any `model.engine.encoder.Encoder` (the torch engine, onnxruntime, TensorRT...);
        None = the model's own spconv modules, which follow the live model (training evaluation).
        Heads always run here in PyTorch. `load_predictor` picks the fastest encoder by default.

        ``model`` (heads, detector, render head, ``features``) is the spconv module only with the spconv
        encoder; with any other encoder it is ``loaded.inference_model`` (same weights, no spconv), whose
        ``features`` share the torch engine's folded weights when that is the encoder."""
        self.config: ModelConfig = loaded.config
        self.source = loaded.source
        self.device = torch_device(device)
        if encoder is None:
            self.model = place(loaded.model, self.device).eval()  # spconv algorithm chosen here, once
            self.encoder: Encoder = SpconvEncoder(self.model, self.device)
        else:
            self.model = loaded.inference_model.to(self.device).eval()
            self.encoder = encoder
            if isinstance(encoder, EngineEncoder):
                use_engine(self.model, encoder.engine, self.device)
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
        return resolve_condition(self.config.conditions, condition)

    def prepare_input(self, cloud: PointCloud, grid_size: float | None = None, options: InputOptions | None = None
                      ) -> tuple[PreparedCloud, VoxelizedCloud]:
        """The model's input pipeline (model.prepare): (the prepared cloud, its network input)."""
        return prepare(cloud, grid_size or self.config.grid_size, self.config.input_features, options)

    def prepare(self, cloud: PointCloud, grid_size: float | None = None, options: InputOptions | None = None
                ) -> VoxelizedCloud:
        return self.prepare_input(cloud, grid_size, options)[1]

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

    def features(self, cloud: PointCloud, condition: str | None = None, grid_size: float | None = None,
                 options: InputOptions | None = None) -> FeatureResult:
        prepared, voxels = self.prepare_input(cloud, grid_size, options)
        (features,) = self.encode([voxels], condition)
        return FeatureResult(features, voxels.point_to_voxel, voxels.grid_coord, prepared)

    def segment(self, cloud: PointCloud, condition: str | None = None, grid_size: float | None = None,
                precise: bool = False, options: InputOptions | None = None) -> SegmentResult:
        """Fast mode: one pass, logits of each point's voxel. Precise mode (the official tester): 13 test-time
        augmentations × test fragments, softmax summed per point; ``logits`` are then log mean probabilities.
        Results have the input's length and order (label -1 and NaN logits for dropped NaN/inf points)."""
        names = self.class_names(condition)
        if precise:
            from model.tta import precise_probabilities

            if not self.has_classifier:
                raise ValueError(f"model {self.info.name!r} ({self.info.kind}) has no segmentation head")
            prepared = self.prepare_points(cloud, grid_size, options)
            summed = precise_probabilities(self, prepared.cloud, self.resolve_condition(condition), grid_size)
            result = segment_from_votes(summed, names, prepared.valid)
        else:
            features = self.features(cloud, condition, grid_size, options)
            (voxel_logits,) = self.classify([features.voxel_features], condition)
            result = segment_from_voxels(voxel_logits, features.point_to_voxel, names, features.valid)
            prepared = features.prepared
        result.prepared = prepared
        return result

    def prepare_points(self, cloud: PointCloud, grid_size: float | None = None, options: InputOptions | None = None
                       ) -> PreparedCloud:
        """Steps 1-3 of model.prepare (valid rows, z-up, filled fields) for jobs that voxelise themselves
        (precise mode, detection)."""
        return prepare_cloud(cloud, grid_size or self.config.grid_size, self.config.input_features, options)


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
