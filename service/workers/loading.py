"""Which checkpoints a server loads, and under which names (shared by the in-process and Triton workers)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # loading models needs torch; naming them does not (the slim gateway imports this module)
    from model.inference import Predictor

LOG = logging.getLogger("service.models")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt")


def holds_checkpoints(models_dir: Path) -> bool:
    """Whether ``models_dir`` exists and holds at least one checkpoint file or folder (not hidden)."""
    if not models_dir.is_dir():
        return False
    return any(not entry.name.startswith(".") and (entry.is_dir() or entry.suffix.lower() in CHECKPOINT_SUFFIXES)
               for entry in models_dir.iterdir())


def discover_checkpoints(checkpoint: Path | None, models_dir: Path | None) -> dict[str, Path | None]:
    """{name: path}. ``models_dir``: every checkpoint file or folder in it, named by its stem (sorted);
    ``checkpoint``: that one, named by its stem (by its folder when the file is called checkpoint/model);
    neither: the bundled default model: "default" (segmentation and features) and, when bundled,
    "default-detect" and "default-render" (its detection and rendering parts)."""
    if models_dir is not None:
        if not models_dir.is_dir():
            raise ValueError(f"models directory {models_dir} does not exist")
        found = {}
        for entry in sorted(models_dir.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir() or entry.suffix.lower() in CHECKPOINT_SUFFIXES:
                name = entry.stem if entry.is_file() else entry.name
                if name in found:
                    raise ValueError(f"{models_dir}: two checkpoints named {name!r}")
                found[name] = entry
        if not found:
            raise ValueError(f"models directory {models_dir} holds no checkpoint "
                             f"(files {', '.join(CHECKPOINT_SUFFIXES)} or checkpoint folders)")
        return found
    if checkpoint is not None:
        if not checkpoint.exists():
            raise ValueError(f"checkpoint {checkpoint} does not exist")
        generic = checkpoint.is_file() and checkpoint.stem in ("checkpoint", "model", "model_best", "model_last")
        name = checkpoint.parent.name if generic else (checkpoint.stem if checkpoint.is_file() else checkpoint.name)
        return {name: checkpoint}
    from model.inference import DEFAULT_MODEL_DIR

    found: dict[str, Path | None] = {"default": None}
    for part in ("detect", "render"):
        if (DEFAULT_MODEL_DIR / part / "model.safetensors").exists():
            found[f"default-{part}"] = DEFAULT_MODEL_DIR / part
    return found


def load_predictors(checkpoints: dict[str, Path | None], device: str = "cpu", trust_checkpoint: bool = False,
                    backend: str = "auto") -> dict[str, Predictor]:
    """``backend``: "auto" (the fastest exact encoder for the device), spconv, torch, onnxruntime, tensorrt."""
    from export.backends import load

    predictors = {}
    for name, path in checkpoints.items():
        predictors[name] = load(path, device=device, trust_checkpoint=trust_checkpoint, backend=backend)
        LOG.info("loaded model %s from %s (%s encoder)", name, path or "<bundled default>", predictors[name].backend)
    return predictors
