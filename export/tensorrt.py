"""Build a TensorRT engine (``model.plan``) from an exported GatherSpUNet ONNX model.

TensorRT is an optional GPU extra (``pip install .[tensorrt]``): it cannot be installed on CPU-only
machines, so it is imported only when an engine is built, and `tensorrt_available` lets callers and
tests check first.

Every voxel-count axis (m0 … m4, one per UNet level) is dynamic, so an engine needs optimisation
profiles, one per `VoxelRange`. Pick ranges that cover the scenes you serve; a request outside every profile fails.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from export.onnx_export import read_info

log = logging.getLogger(__name__)


class TensorRTUnavailable(RuntimeError):
    """TensorRT (the `tensorrt` package and a CUDA GPU) is not available here."""


@dataclass(frozen=True)
class VoxelRange:
    """Input voxel counts (level 0) of one optimisation profile.

    A coarse level never has more sites than level 0, so every level accepts 1 … ``max`` rows (level
    0: ``min`` … ``max``); the size TensorRT tunes for at level l is ``opt / shrink**l`` (indoor scans
    shrink about 3x per level)."""

    min: int = 1
    opt: int = 130_000
    max: int = 400_000
    shrink: float = 3.0

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"need 1 <= min <= opt <= max, got {self.min}, {self.opt}, {self.max}")
        if self.shrink < 1:
            raise ValueError(f"shrink must be >= 1, got {self.shrink}")

    def level(self, l: int) -> tuple[int, int, int]:
        """(min, opt, max) rows at UNet level l."""
        if l == 0:
            return self.min, self.opt, self.max
        return 1, max(1, math.ceil(self.opt / self.shrink**l)), self.max


DEFAULT_PROFILES = (VoxelRange(1, 30_000, 60_000), VoxelRange(60_000, 130_000, 400_000))


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def _input_levels(name: str) -> int | None:
    """UNet level whose voxel count is the first axis of input ``name``."""
    if name in ("feat", "stem_nbr"):
        return 0
    for prefix, shift in (("subm", 0), ("down", 1), ("up", 0)):
        if name.startswith(prefix):
            return int(name[len(prefix):].split("_")[0]) + shift
    return None


def build_engine(onnx_path: str | Path, plan_path: str | Path, profiles: tuple[VoxelRange, ...] = DEFAULT_PROFILES,
                 fp16: bool = False, workspace_gib: float = 4.0) -> Path:
    """Parse the ONNX model, add one optimisation profile per voxel range, and serialise the engine."""
    if not tensorrt_available():
        raise TensorRTUnavailable("TensorRT is not installed (pip install 'ponder-serve[tensorrt]' on a GPU host)")
    import tensorrt as trt

    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    info = read_info(onnx_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    for voxels in profiles:
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            level = _input_levels(tensor.name)
            if level is None:
                continue  # static (condition)
            width = tuple(tensor.shape)[1]
            lo, opt, hi = voxels.level(level)
            profile.set_shape(tensor.name, (lo, width), (opt, width), (hi, width))
        config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(engine))
    log.info("built %s (%s, %d profiles, fp16=%s)", plan_path, info.kind, len(profiles), fp16)
    return plan_path
