"""The `Encoder` protocol (voxelised scenes → per-voxel features) and the two backends model code owns.

- `SpconvEncoder`: the model's own spconv modules (any kind the model builds; training uses these too).
- `EngineEncoder`: `SpUNetEngine` built from the same state_dict: valid pairs on CPU, the dense gather
  formulation on CUDA (no scatter: one kernel per tap, faster there).

onnxruntime / TensorRT encoders implement the same protocol in export/backends.py; the Predictor only
sees an `Encoder`. CLI names: ``spconv``, ``torch`` (this engine); `default_backend` picks the fastest
exact one for a device.
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch

from model.engine.cpu_bf16 import check_cpu_bf16
from model.engine.pairs import PRECISIONS
from model.engine.unet import SpUNetEngine
from model.pointcloud.voxelize import VoxelizedCloud

if TYPE_CHECKING:  # only for annotations: the engine stays importable without the checkpoint reader
    from model.checkpoint import LoadedModel

MODEL_BACKENDS = ("spconv", "torch")
DEFAULT_BACKEND = "torch"  # what "auto" means on every device: the engine (valid pairs on CPU, gather on CUDA)


@runtime_checkable
class Encoder(Protocol):
    """Per-voxel features (M_i, C) float32 of each scene of a batch, from one forward pass. Scenes never
    interact. ``condition`` is a resolved condition name (None for unconditioned models)."""

    name: str

    def encode(self, batch: list[VoxelizedCloud], condition: str | None) -> list[np.ndarray]: ...


def _batch_tensors(batch: list[VoxelizedCloud], device: torch.device):
    feat = torch.from_numpy(np.concatenate([v.feat for v in batch])).to(device)
    grid = torch.from_numpy(np.concatenate([v.grid_coord for v in batch])).to(device)
    index = torch.from_numpy(np.concatenate([np.full(v.num_voxels, i) for i, v in enumerate(batch)])).to(device)
    return feat, grid, index


def _split(features: torch.Tensor, batch: list[VoxelizedCloud]) -> list[np.ndarray]:
    return [f.float().cpu().numpy() for f in torch.split(features, [v.num_voxels for v in batch])]


def place(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """Move a model to a device and pick its spconv algorithm for that device (once, not per forward):
    layers built by `model.sparse.conv` choose it themselves when moved; `use_device_algorithms` covers
    only spconv layers built elsewhere, so no layer is set twice. Without spconv imported there are no
    spconv layers, and spconv stays unimported."""
    device = torch.device(device)
    model = model.to(device)
    if "spconv" in sys.modules:
        from model.sparse.conv import use_device_algorithms

        use_device_algorithms(model, device)
    return model


class SpconvEncoder:
    """The model's own spconv modules."""

    name = "spconv"

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device
        self._lock = threading.Lock()

    @torch.no_grad()
    def encode(self, batch: list[VoxelizedCloud], condition: str | None) -> list[np.ndarray]:
        feat, grid, index = _batch_tensors(batch, self.device)
        with self._lock:  # spconv layers cache per-call state; one forward at a time per model
            features = self.model.features(feat, grid, index, condition)
        return _split(features, batch)


class EngineEncoder:
    """`SpUNetEngine` (no spconv): kernel maps on the device, then one forward over the batch. Thread-safe
    (the engine keeps no per-call state)."""

    name = "torch"

    def __init__(self, engine: SpUNetEngine, device: torch.device):
        self.engine, self.device = engine.to(device).eval(), device

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, device: torch.device | str = "cpu",
                    precision: str = "fp32") -> "EngineEncoder":
        """ValueError when the checkpoint is not a SpUNet the engine can run."""
        device = torch.device(device)
        formulation = engine_formulation(device, precision)
        engine = SpUNetEngine.from_state_dict(loaded.state_dict(), loaded.config, heads=False,
                                              formulation=formulation, precision=precision)
        return cls(engine, device)

    @torch.no_grad()
    def encode(self, batch: list[VoxelizedCloud], condition: str | None) -> list[np.ndarray]:
        feat, grid, index = _batch_tensors(batch, self.device)
        maps = self.engine.kernel_maps(grid, index)
        # The Predictor validated the condition against the checkpoint's config. A backbone without
        # condition-specific norms (SpUNet-v1m1) computes the same function under every condition, as spconv's does.
        index = self.engine.condition_index(condition) if self.engine.conditions else 0
        (features,) = self.engine(*self.engine.example_inputs(maps, feat, index))
        return _split(features, batch)


def engine_formulation(device: torch.device | str, precision: str = "fp32") -> str:
    """The engine's fastest exact formulation on ``device``: valid pairs on CPU (and in bf16), the dense gather
    formulation on CUDA in fp32 (one kernel per tap, no scatter)."""
    return "pairs" if torch.device(device).type == "cpu" or precision != "fp32" else "gather"


def default_backend(device: torch.device | str) -> str:
    """The fastest exact encoder for a device: `DEFAULT_BACKEND` on CPU and CUDA alike."""
    return DEFAULT_BACKEND


def model_encoder(backend: str, loaded: LoadedModel, device: torch.device | str = "cpu",
                  precision: str = "fp32") -> Encoder:
    """A model-internal encoder: ``spconv``, ``torch``, or ``auto`` (the torch engine when it can run the
    checkpoint, else spconv). The spconv model must already be placed on ``device`` (see `place`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "bf16" and device.type == "cpu" and backend != "spconv":
        check_cpu_bf16()  # refused where oneDNN has no bf16 kernels (~70x slower than fp32)
    if backend == "auto":  # DEFAULT_BACKEND, falling back to spconv for checkpoints the engine cannot run
        try:
            return EngineEncoder.from_loaded(loaded, device, precision)
        except ValueError:
            backend = "spconv"  # not a SpUNet (or an unusual layout): the model's own modules
    if backend == "torch":
        return EngineEncoder.from_loaded(loaded, device, precision)
    if backend == "spconv":
        if precision != "fp32":
            raise ValueError("--precision bf16 needs the torch engine (spconv does not run bfloat16)")
        return SpconvEncoder(loaded.model, device)
    raise ValueError(f"unknown model backend {backend!r}; choose from {', '.join(MODEL_BACKENDS)}")
