"""Reading training configs: the YAML file, then the one typed loader (``model.config_io.load``), whose
``ConfigError`` names the offending key. Re-exported here so training code has one import for both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from model.config_io import ConfigError, as_mapping, dump, load

__all__ = ["ConfigError", "as_mapping", "dump", "load", "read_yaml"]


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's mapping ({} when empty); a one-line error naming the file when it is missing, a folder,
    not text, not YAML or not a mapping (PyYAML's own message spans several lines)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, not a config file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text (UTF-8) file, byte {exc.start} cannot be decoded") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from None
    return dict(as_mapping(data, f"{path}: the config"))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error on one line: what went wrong and where (its text repeats the offending lines)."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem is None:
        return " ".join(str(exc).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(exc, "context", None)
    return f"{context + ': ' if context else ''}{problem}{where}"
