"""Building config dataclasses from YAML mappings, with errors that name the offending keys (shared by
the task configs)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import yaml

from training.engine import OptimConfig, TrainConfig


class ConfigError(ValueError):
    """A training config that is missing a field, has an unknown one, or contradicts itself."""


def dataclass_from(cls, data: Mapping[str, Any], where: str, nested: Mapping[str, type] | None = None,
                   lists_as_tuples: bool = False):
    """``cls(**data)`` refusing unknown keys; ``nested`` names fields that are dataclasses themselves."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown {where} keys: {sorted(unknown)} (known: {sorted(names)})")
    values = {k: tuple(v) if lists_as_tuples and isinstance(v, list) else v for k, v in data.items()}
    for key, sub in (nested or {}).items():
        if values.get(key) is not None:
            values[key] = dataclass_from(sub, values[key], f"{where}.{key}", lists_as_tuples=lists_as_tuples)
    return cls(**values)


def train_config_from(data: Mapping[str, Any], lists_as_tuples: bool = False) -> TrainConfig:
    """The ``train`` section (with its ``optim`` mapping) as the engine's TrainConfig."""
    data = dict(data)
    optim = dataclass_from(OptimConfig, data.pop("optim", {}), "train.optim", lists_as_tuples=lists_as_tuples)
    cfg = dataclass_from(TrainConfig, data, "train", lists_as_tuples=lists_as_tuples)
    cfg.optim = optim
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's mapping ({} when empty); a clear error when missing or not YAML."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
