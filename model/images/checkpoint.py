"""Image models on disk: a folder with ``model.safetensors`` and ``config.json`` (``kind: image-render``),
the layout of the point-cloud checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model.images.config import KIND, ImageModelConfig
from model.images.model import ImageRenderModel

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def save_image_model(model: ImageRenderModel, out_dir: str | Path) -> Path:
    """Weights and config of an image model (also of ``model.images.segment.ImageSegmentModel``: its cfg kind),
    written together as `model.checkpoint.save_checkpoint` writes them (`model.files.new_folder_for`)."""
    from model.files import new_folder_for

    out = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with new_folder_for(out) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "kind": getattr(model.cfg, "kind", KIND)})
        model.cfg.save(tmp / CONFIG_FILE)
    return out


def config_kind(path: str | Path) -> str | None:
    """The ``kind`` in a model folder's config.json; None without a readable one."""
    cfg = Path(path) / CONFIG_FILE
    try:
        doc = json.loads(cfg.read_text()) if cfg.is_file() else None
    except (ValueError, OSError):
        return None
    return doc.get("kind") if isinstance(doc, dict) else None


def is_image_model(path: str | Path) -> bool:
    return config_kind(path) == KIND


def load_model_folder(path: str | Path, kind: str, what: str, build: Callable[[Path], nn.Module],
                      device: str | torch.device = "cpu") -> nn.Module:
    """Strict load of a model folder (or of its ``model.safetensors``) whose config.json has ``kind``, in eval
    mode: ``build(config.json path)`` makes the model, whose state_dict the weights must match exactly."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if config_kind(folder) != kind or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path}: not an {what} folder ({WEIGHTS_FILE} + {CONFIG_FILE} with kind {kind!r})")
    model = build(folder / CONFIG_FILE)
    state = load_file(str(folder / WEIGHTS_FILE))
    from model.checkpoint import check_finite

    check_finite(state, str(folder))
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not fit its config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def load_image_model(path: str | Path, device: str | torch.device = "cpu") -> ImageRenderModel:
    """Strict load of an image model folder (or of its ``model.safetensors``), in eval mode."""
    return load_model_folder(path, KIND, "image model", lambda cfg: ImageRenderModel(ImageModelConfig.load(cfg)),
                             device)
