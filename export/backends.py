"""Encoder backends for the Predictor: the exported ONNX graph run by onnxruntime (CPU or CUDA execution
providers) or by onnxruntime's TensorRT execution provider. Heads stay in PyTorch (they are tiny), so
every backend yields the same per-point outputs through the same Predictor.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from model.checkpoint import LoadedModel

BACKENDS = ("torch", "onnxruntime", "tensorrt")
CACHE = Path(os.environ.get("PONDER_CACHE", Path.home() / ".cache" / "ponder")) / "onnx"


class OnnxEncoder:
    """``encode(batch, condition)`` through an onnxruntime session; one session run per batch."""

    def __init__(self, path: Path, device: str = "auto", threads: int | None = None):
        from export.onnxrt import OnnxRunner

        self.runner = OnnxRunner(path, device=device, threads=threads)
        if "backbone_feat" not in self.runner.info.outputs:
            raise ValueError(f"{path}: the ONNX model has no backbone_feat output")

    def encode(self, batch, condition: str | None) -> list[np.ndarray]:
        return [out["backbone_feat"] for out in self.runner.run_scenes(batch, condition)]


def exported_encoder(loaded: LoadedModel) -> Path:
    """The encoder of ``loaded`` exported once to ONNX and cached by the hash of its weights and config."""
    from export.graph import GatherSpUNet
    from export.onnx_export import export_onnx

    digest = hashlib.sha256(repr(loaded.config.to_dict()).encode())
    for name, tensor in loaded.model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    path = CACHE / f"{digest.hexdigest()[:20]}.onnx"
    if not path.exists():
        graph = GatherSpUNet.from_state_dict(loaded.model.state_dict(), loaded.config, heads=False)
        tmp = export_onnx(graph, path.with_suffix(".partial.onnx"))
        tmp.replace(path)
    return path


def make_encoder(backend: str, loaded: LoadedModel, engine: str | Path | None = None, device: str = "cpu",
                 threads: int | None = None):
    """None for the PyTorch (spconv) path; else an encoder object for ``Predictor(encoder=...)``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "torch":
        if engine:
            raise ValueError("--engine applies to the onnxruntime and tensorrt backends only")
        return None
    path = Path(engine) if engine else exported_encoder(loaded)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such ONNX model (export one with `ponder export onnx --features-only`)")
    ort_device = "tensorrt" if backend == "tensorrt" else ("cuda" if device == "cuda" else "cpu")
    return OnnxEncoder(path, device=ort_device, threads=threads)
