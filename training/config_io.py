"""Reading training configs: the YAML file, then the one typed loader (``model.config_io.load``), whose
``ConfigError`` names the offending key. Re-exported here so training code has one import for both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from model.config_io import ConfigError, as_mapping, dump, load

__all__ = ["ConfigError", "as_mapping", "dump", "load", "read_yaml"]


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's mapping ({} when empty); a clear error when missing, not YAML or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    return dict(as_mapping(data, f"{path}: the config"))
