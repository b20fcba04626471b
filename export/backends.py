"""Encoder backends for the Predictor that need export: the exported ONNX graph run by onnxruntime (CPU or
CUDA execution providers) or by onnxruntime's TensorRT execution provider. They implement
`model.engine.encoder.Encoder`; heads stay in PyTorch (they are tiny), so every backend yields the same
per-point outputs through the same Predictor. `load` is the one entry point for every CLI/service backend.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from model.checkpoint import LoadedModel
from model.engine.encoder import MODEL_BACKENDS
from model.files import replaced_on_success

if TYPE_CHECKING:  # onnxruntime is imported only when an export backend is used
    from export.onnxrt import OnnxRunner

EXPORT_BACKENDS = ("onnxruntime", "tensorrt")
BACKENDS = (*MODEL_BACKENDS, *EXPORT_BACKENDS)  # CLI values; no --backend = "auto" (fastest exact)
CACHE = Path(os.environ.get("PONDER_CACHE", Path.home() / ".cache" / "ponder")) / "onnx"


class OnnxEncoder:
    """``encode(batch, condition)`` through an onnxruntime session; one session run per batch."""

    def __init__(self, path: Path, device: str = "auto", threads: int | None = None):
        self.name = "tensorrt" if device == "tensorrt" else "onnxruntime"
        from export.onnxrt import OnnxRunner

        self.runner = OnnxRunner(path, device=device, threads=threads)
        if "backbone_feat" not in self.runner.info.outputs:
            raise ValueError(f"{path}: the ONNX model has no backbone_feat output")

    def encode(self, batch, condition: str | None) -> list[np.ndarray]:
        return [out["backbone_feat"] for out in self.runner.run_scenes(batch, condition)]


def exported_encoder(loaded: LoadedModel) -> Path:
    """The encoder of ``loaded`` exported once to ONNX and cached by the hash of its weights and config."""
    from export.graph import GatherSpUNet
    from export.onnx_export import export_onnx, weights_digest

    state = loaded.state_dict()  # no spconv model needed
    weights = weights_digest(state)
    key = hashlib.sha256(repr(loaded.config.to_dict()).encode() + b"tables=int32" + weights.encode())  # int32 tables
    path = CACHE / f"{key.hexdigest()[:20]}.onnx"
    if not path.exists():
        graph = GatherSpUNet.from_state_dict(state, loaded.config, heads=False)
        with replaced_on_success(path, path.with_suffix(".partial.onnx")) as tmp:
            export_onnx(graph, tmp, extra_metadata={"name": loaded.config.name, "weights_sha256": weights})
    return path


def check_engine_matches(runner: OnnxRunner, loaded: LoadedModel) -> None:
    """ValueError when the ``--engine`` file was exported from other weights than the checkpoint (its
    ``ponder.weights_sha256``), or, for a file without that digest, when its grid size, input features or
    conditions differ from the checkpoint's: the engine's features would be silently wrong. Reads what the
    runner already parsed (the file is not loaded again)."""
    from export.onnx_export import weights_digest

    path, props, info = runner.path, runner.metadata, runner.info
    checkpoint = loaded.source or loaded.config.name
    if "weights_sha256" in props:
        if props["weights_sha256"] != weights_digest(loaded.state_dict()):
            raise ValueError(f"--engine {path}: exported from other weights than the checkpoint {checkpoint} (the "
                             f"engine's model is named {props.get('name', '?')!r}); export this checkpoint "
                             "(`ponder export onnx CHECKPOINT -o ENGINE.onnx --features-only`) or leave --engine out "
                             "(the checkpoint is then exported once and cached)")
        return
    config = loaded.config
    differences = [f"{what} {theirs!r} vs {ours!r}" for what, theirs, ours in (
        ("grid size", info.grid_size, config.grid_size),
        ("input features", tuple(info.input_features), tuple(config.input_features)),
        ("conditions", tuple(info.conditions), tuple(config.conditions))) if theirs != ours]
    if differences:
        raise ValueError(f"--engine {path}: does not fit the checkpoint {checkpoint} (engine vs checkpoint: "
                         f"{'; '.join(differences)})")
    import warnings

    warnings.warn(f"--engine {path}: exported without a weights digest (before this ponder version), so it cannot be "
                  "checked against the checkpoint; re-export it to have it checked", stacklevel=2)


def make_encoder(backend: str, loaded: LoadedModel, engine: str | Path | None = None, device: str = "cpu",
                 threads: int | None = None) -> OnnxEncoder:
    """An onnxruntime / TensorRT encoder for ``Predictor(encoder=...)`` (``engine``: the .onnx file, else
    the checkpoint is exported once and cached)."""
    if backend not in EXPORT_BACKENDS:
        raise ValueError(f"unknown export backend {backend!r}; choose from {', '.join(EXPORT_BACKENDS)}")
    path = Path(engine) if engine else exported_encoder(loaded)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such ONNX model (export one with `ponder export onnx --features-only`)")
    ort_device = "tensorrt" if backend == "tensorrt" else ("cuda" if device == "cuda" else "cpu")
    encoder = OnnxEncoder(path, device=ort_device, threads=threads)
    if engine:
        check_engine_matches(encoder.runner, loaded)
    return encoder


def load(checkpoint: str | Path | None = None, device: str = "cpu", trust_checkpoint: bool = False,
         backend: str | None = None, precision: str = "fp32", engine: str | Path | None = None):
    """A `model.inference.Predictor` for any backend name: None/"auto" = the fastest exact encoder for the
    device, "spconv", "torch" (the engine), "onnxruntime", "tensorrt"."""
    from model.inference import load_predictor

    backend = backend or "auto"
    if backend not in (*BACKENDS, "auto"):
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if engine and backend not in EXPORT_BACKENDS:
        raise ValueError("--engine applies to the onnxruntime and tensorrt backends only")
    if backend in EXPORT_BACKENDS:
        if precision != "fp32":
            raise ValueError(f"--precision {precision} applies to the torch engine only")
        return load_predictor(checkpoint, device, trust_checkpoint,
                              encoder=lambda loaded, dev: make_encoder(backend, loaded, engine, dev))
    return load_predictor(checkpoint, device, trust_checkpoint, backend=backend, precision=precision)
