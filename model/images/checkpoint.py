"""Image models on disk: a folder with ``model.safetensors`` and ``config.json`` (``kind: image-render``),
the layout of the point-cloud checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.images.config import KIND, ImageModelConfig
from model.images.model import ImageRenderModel

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def save_image_model(model: ImageRenderModel, out_dir: str | Path) -> Path:
    """Weights and config of an image model (also of ``model.images.segment.ImageSegmentModel``: its cfg kind)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt", "kind": getattr(model.cfg, "kind", KIND)})
    model.cfg.save(out / CONFIG_FILE)
    return out


def is_image_model(path: str | Path) -> bool:
    import json

    cfg = Path(path) / CONFIG_FILE
    try:
        return cfg.is_file() and json.loads(cfg.read_text()).get("kind") == KIND
    except (ValueError, OSError):
        return False


def load_image_model(path: str | Path, device: str | torch.device = "cpu") -> ImageRenderModel:
    """Strict load of an image model folder (or of its ``model.safetensors``), in eval mode."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path}: not an image model folder (needs {WEIGHTS_FILE} and {CONFIG_FILE})")
    cfg = ImageModelConfig.load(folder / CONFIG_FILE)
    model = ImageRenderModel(cfg)
    state = load_file(str(folder / WEIGHTS_FILE))
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not fit its config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
