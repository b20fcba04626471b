"""Run an exported GatherSpUNet in onnxruntime: voxelised scenes in, per-voxel outputs out.

The kernel maps are computed here, on the host, by the same `model.sparse.kernel_maps` the PyTorch
path and the gateway use; the ONNX model only ever sees tables (int32).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from export.graph import GraphInfo
from export.onnx_export import load_onnx, ponder_metadata, read_info
from export.ort_session import release_arena_after_run, session_options
from model.conditions import condition_index
from model.sparse.kernel_maps import KernelMaps, build_kernel_maps


class VoxelBatch(Protocol):
    """Anything with ``grid_coord (M, 3)`` and ``feat (M, C)`` (e.g. `model.pointcloud.voxelize.VoxelizedCloud`)."""

    grid_coord: np.ndarray
    feat: np.ndarray


def available_providers(device: str = "auto") -> list[str]:
    """CUDA first when onnxruntime has it and the caller allows it, CPU always last. ``tensorrt`` puts
    onnxruntime's TensorRT execution provider first (it builds and caches the engine itself)."""
    have = ort.get_available_providers()
    if device == "tensorrt":
        if "TensorrtExecutionProvider" not in have:
            raise ValueError(f"the tensorrt backend needs onnxruntime-gpu with TensorRT; this onnxruntime has {have}")
        return ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" not in have:
        raise ValueError(f"device 'cuda' requested but onnxruntime only has {have}")
    cuda = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in have else []
    return cuda + ["CPUExecutionProvider"]


def make_inputs(info: GraphInfo, feat: np.ndarray, grid_coord: np.ndarray, batch: np.ndarray | None = None,
                condition: int | str | None = None, maps: KernelMaps | None = None) -> dict[str, np.ndarray]:
    """The feeds of one forward pass (tables computed from ``grid_coord``/``batch`` unless given)."""
    feat = np.ascontiguousarray(feat, dtype=np.float32)
    if feat.ndim != 2 or feat.shape[1] != info.in_channels:
        raise ValueError(f"feat must have shape (M, {info.in_channels}), got {feat.shape}")
    if len(feat) != len(grid_coord):
        raise ValueError(f"{len(feat)} feature rows for {len(grid_coord)} voxels")
    if maps is None:
        maps = build_kernel_maps(grid_coord, batch, num_levels=info.num_levels, stem_kernel=info.stem_kernel)
    feeds = {"feat": feat, **maps.onnx_inputs()}
    index = condition_index(info.conditions, condition)
    if index is not None:
        feeds["condition"] = np.array([index], dtype=np.int64)
    return feeds


class OnnxRunner:
    """One onnxruntime session around an exported model (thread-safe: onnxruntime sessions are)."""

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such ONNX model")
        model = load_onnx(self.path)
        self.info = read_info(model)
        self.metadata = ponder_metadata(model)  # ``ponder.*`` without the prefix: name, weights digest, ...
        del model
        self.session = ort.InferenceSession(str(self.path), session_options(threads),
                                            providers=available_providers(device))
        self._run_options = release_arena_after_run()
        ints = {"tensor(int32)": np.int32, "tensor(int64)": np.int64}
        self._int_inputs = {i.name: ints[i.type] for i in self.session.get_inputs() if i.type in ints}

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def run_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Tables are int32 (`KernelMaps.onnx_inputs`); models exported before that took int64 and get
        their tables widened here."""
        feeds = {k: v.astype(self._int_inputs[k], copy=False) if k in self._int_inputs else v for k, v in feeds.items()}
        outputs = self.session.run(list(self.info.outputs), feeds, self._run_options)
        return dict(zip(self.info.outputs, outputs))

    def run(self, feat: np.ndarray, grid_coord: np.ndarray, batch: np.ndarray | None = None,
            condition: int | str | None = None) -> dict[str, np.ndarray]:
        """Per-voxel outputs of one (possibly multi-scene) batch, rows in input order."""
        return self.run_feeds(make_inputs(self.info, feat, grid_coord, batch, condition))

    def run_scenes(self, scenes: list[VoxelBatch], condition: int | str | None = None) -> list[dict[str, Any]]:
        """One forward pass over several voxelised scenes (never neighbours); outputs split per scene."""
        if not scenes:
            return []
        feat = np.concatenate([s.feat for s in scenes])
        grid = np.concatenate([np.asarray(s.grid_coord, dtype=np.int64) for s in scenes])
        sizes = [len(s.grid_coord) for s in scenes]
        batch = np.repeat(np.arange(len(scenes)), sizes)
        outputs = self.run(feat, grid, batch, condition)
        bounds = np.cumsum(sizes)[:-1]
        return [dict(zip(outputs, parts)) for parts in zip(*(np.split(o, bounds) for o in outputs.values()))]
