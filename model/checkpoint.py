"""Checkpoint I/O: the official PonderV2 container (``torch.save`` dict, keys prefixed ``module.``) and our
format (a folder with ``model.safetensors`` + ``config.json``).

Official files are read with ``torch.load(weights_only=True)``; only the harmless numpy scalar types that
the official trainer stores (``best_metric_value``) are allow-listed. Anything that needs full unpickling
is refused unless the caller passes ``trust=True``.
"""

from __future__ import annotations

import json
import pickle
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from model.build import build_model
from model.config import ModelConfig
from model.files import new_folder_for, replaced_on_success
from model.infer_config import infer_config

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model. The message says why."""


class _BuiltOnFirstUse:
    """A `LoadedModel` module field: the stored module, or (when None) one built from the other field's weights
    on first access. As a dataclass field default it reads as None, so ``LoadedModel(config, model, source)``
    and ``dataclasses.replace`` work as for a plain field."""

    def __init__(self, build: str):
        self.build = build

    def __set_name__(self, owner, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return None  # the dataclass default
        if obj.__dict__.get(self.slot) is None:
            with obj.__dict__.setdefault("_lock", threading.Lock()):
                if obj.__dict__.get(self.slot) is None:
                    obj.__dict__[self.slot] = getattr(obj, self.build)()
        return obj.__dict__[self.slot]

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.slot] = value


@dataclass(repr=False, eq=False)  # repr/eq would build both modules
class LoadedModel:
    """A checkpoint's config and weights, as two interchangeable modules with the same state_dict layout:

    - ``model``: the spconv nn.Module (training, ``--backend spconv``, anything that runs its layers);
    - ``inference_model``: the same tree whose backbone runs the spconv-free engine
      (`model.backbones.engine_backed`): the heads, the condition embeddings and ``features`` for inference.

    `load_checkpoint` builds only ``inference_model`` (spconv costs seconds to import); whichever one is
    missing is built from the other's weights on first use (loaded strictly, in eval mode).
    """

    config: ModelConfig
    model: nn.Module | None = _BuiltOnFirstUse("_build_spconv")  # type: ignore[assignment]
    source: str = ""
    inference_model: nn.Module | None = _BuiltOnFirstUse("_build_engine_backed")  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.__dict__.get("_model") is None and self.__dict__.get("_inference_model") is None:
            raise ValueError("LoadedModel needs a model or an inference_model")

    def __repr__(self) -> str:
        return f"LoadedModel(kind={self.config.kind!r}, name={self.config.name!r}, source={self.source!r})"

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights, with the official key names (from whichever module is already built)."""
        built = self.__dict__.get("_model")
        return (built if built is not None else self.__dict__["_inference_model"]).state_dict()

    def _build_spconv(self) -> nn.Module:
        return _built(self.config, self.__dict__["_inference_model"].state_dict(), self.source, engine=False)

    def _build_engine_backed(self) -> nn.Module:
        return _built(self.config, self.__dict__["_model"].state_dict(), self.source, engine=True)


def _built(config: ModelConfig, state: dict[str, torch.Tensor], source: str, engine: bool) -> nn.Module:
    model = build_model(config, engine=engine)
    load_state_strict(model, {k: v.detach().cpu() for k, v in state.items()}, source)
    return model.eval()


def _numpy_safe_globals() -> list:
    allowed = [np.dtype, np.core.multiarray.scalar]
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
        dtype_class = getattr(np.dtypes, name, None)
        if dtype_class is not None:
            allowed.append(dtype_class)
    return allowed


def check_torch_header(path: Path) -> None:
    """Refuse files that are neither a zip archive (torch.save since 1.6) nor a pickle (legacy format), so a
    text or random file gets one clear sentence instead of an unpickler error."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc.strerror or exc})") from exc
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (expected a .pth/.pt file written by torch.save, "
                              "or a folder with model.safetensors)")


EMBEDDED_CONFIG = "ponder_config"  # the model config training stores in its official container (a plain dict)


def read_official(path: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """The state_dict of an official checkpoint, ``module.`` prefix removed."""
    return read_official_parts(path, trust)[0]


def load_torch_file(path: Path, trust: bool = False) -> object:
    """``torch.load`` of a user's file on the CPU: weights-only (tensors, plain data and the official numpy
    scalars) unless ``trust``; every failure is a CheckpointError of one sentence naming the file."""
    path = Path(path)
    check_torch_header(path)
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust and "unsupported global" in str(exc).lower():
            raise CheckpointError(_needs_unpickling(path, str(exc))) from exc
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt pickle data)") from exc
    except (RuntimeError, EOFError, OSError, KeyError, IndexError, ValueError, TypeError, AttributeError,
            ImportError, MemoryError) as exc:
        # A damaged or foreign file makes the unpickler fail in arbitrary ways (e.g. ``KeyError: 101``).
        text = " ".join(str(exc).split()).split(". ")[0][:300]  # torch appends a paragraph of advice
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {text})") from exc


def read_official_parts(path: Path, trust: bool = False) -> tuple[dict[str, torch.Tensor], ModelConfig | None]:
    """(state_dict, model config) of an official container. The config is the one ``ponder train`` stores under
    ``ponder_config`` (what the weights cannot tell: render volume and sampler, class names, grid size); None
    for the authors' files, whose config is inferred from the weights."""
    path = Path(path)
    obj = load_torch_file(path, trust)
    state = obj.get("state_dict", obj.get("model", obj)) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: no state_dict of tensors found (expected a dict with 'state_dict')")
    embedded = obj.get(EMBEDDED_CONFIG) if isinstance(obj, dict) else None
    config = None
    if isinstance(embedded, dict):
        try:
            config = ModelConfig.from_dict(embedded)
        except (ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(f"{path}: its stored model config ({EMBEDDED_CONFIG}) is invalid ({exc})") from exc
    return strip_prefix(state), config


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _needs_unpickling(path: Path, torch_message: str) -> str:
    """One readable sentence for a weights-only refusal: torch's message has terminal escape codes and a page
    of advice about its own API; the useful part is which stored object it refused."""
    text = _ANSI.sub("", torch_message)
    found = re.search(r"\bGLOBAL ([\w.]+)", text)  # "Unsupported global: GLOBAL x.y" or "unsupported GLOBAL x.y"
    refused = f"it stores {found.group(1)}, which the safe loader refuses" if found else " ".join(
        text.splitlines()[0].split())
    return (f"{path}: the file needs full unpickling, which can run arbitrary code ({refused}). Only if you trust "
            "its origin: pass --trust-checkpoint (service: PONDER_TRUST_CHECKPOINT=true).")


def strip_prefix(state: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Remove the DDP prefix when every key carries it (the tester's rule, not the trainer's blind key[7:])."""
    if all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with a message naming the first missing/unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:5])}{more}")
        raise CheckpointError(f"{source}: checkpoint does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def _read_config_file(folder: Path) -> ModelConfig | None:
    for name in (CONFIG_FILE, "config.yaml", "config.yml"):
        path = folder / name
        if path.exists():
            try:
                data = json.loads(path.read_text()) if name.endswith(".json") else yaml.safe_load(path.read_text())
                return ModelConfig.from_dict(data)
            except (ValueError, TypeError, yaml.YAMLError) as exc:
                raise CheckpointError(f"{path}: invalid model config ({exc})") from exc
    return None


def _inferred_for_folder(folder: Path, state: dict[str, torch.Tensor]) -> ModelConfig:
    """The config of a folder that lost its config.json, inferred from the weights like an official file's; said
    aloud, since what the weights do not store (class names, grid size, input features) becomes the defaults."""
    try:
        config = infer_config(state)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{folder}: no {CONFIG_FILE} beside {WEIGHTS_FILE}, and the architecture cannot be "
                              f"inferred from its weights ({exc})") from exc
    warnings.warn(f"{folder}: no {CONFIG_FILE} beside {WEIGHTS_FILE}; the architecture is inferred from the "
                  f"weights (kind {config.kind}) and class names, grid size ({config.grid_size} m) and input "
                  f"features ({'+'.join(config.input_features)}) are the defaults: keep the config.json that "
                  "`ponder convert` or training wrote beside the weights", stacklevel=3)
    return config


def read_checkpoint(path: str | Path, trust: bool = False,
                    config: ModelConfig | None = None) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """(state_dict, config) of our format (folder or ``.safetensors`` file with a config beside it) or of an
    official ``.pth`` (config: ``config`` if given, else the one training stored in it, else inferred from the
    weights)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    if path.is_dir() or path.suffix == ".safetensors":
        folder = path if path.is_dir() else path.parent
        weights = folder / WEIGHTS_FILE if path.is_dir() else path
        if not weights.exists():
            raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} in the checkpoint folder")
        try:
            state = load_file(str(weights))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{weights}: not a valid safetensors file ({exc})") from exc
        return state, config or _read_config_file(folder) or _inferred_for_folder(folder, state)
    state, embedded = read_official_parts(path, trust=trust)
    try:
        return state, config or embedded or infer_config(state)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot infer the architecture from the state_dict ({exc})") from exc


def load_checkpoint(path: str | Path, trust: bool = False, config: ModelConfig | None = None) -> LoadedModel:
    """Read a checkpoint (see ``read_checkpoint``) and load its weights strictly into the model's
    ``inference_model`` (no spconv); the spconv ``model`` is built when first used."""
    state, config = read_checkpoint(path, trust, config)
    check_finite(state, str(path))
    return LoadedModel(config, source=str(path), inference_model=_built(config, state, str(path), engine=True))


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or inf (a run that diverged, a damaged conversion): they would give NaN
    features silently, or crash deep in rendering, instead of this one line naming the tensors."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise CheckpointError(f"{source}: {len(bad)} weight tensor(s) hold NaN or inf: {', '.join(bad[:3])}{more}; "
                              "the run that wrote them diverged or the file is damaged")


def save_checkpoint(model: nn.Module, config: ModelConfig, out_dir: str | Path) -> Path:
    """Write our format: ``model.safetensors`` (contiguous CPU tensors) and ``config.json``, as one change:
    both are written in a folder beside ``out_dir`` that then takes its place (`model.files.new_folder_for`), so
    a crash or a full disk never leaves new weights beside an old config. Files get the usual umask permissions
    (safetensors alone writes 0600, which the serving images' unprivileged user cannot read)."""
    out = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with new_folder_for(out) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "kind": config.kind})
        config.save(tmp / CONFIG_FILE)
    return out


def save_official(model: nn.Module, path: str | Path, epoch: int = 0, ddp_prefix: bool = True,
                  extra: dict | None = None) -> Path:
    """Write the official container (what PonderV2's CheckpointSaver writes), loadable by the official tester."""
    prefix = "module." if ddp_prefix else ""
    state = {prefix + k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"epoch": epoch, "state_dict": state, "best_metric_value": float("-inf"), **(extra or {})}
    path = Path(path)
    with replaced_on_success(path, path.with_suffix(path.suffix + ".tmp")) as tmp:
        torch.save(payload, tmp)
    return path
