"""The one loader of every config: a mapping (JSON, YAML) validated into the typed config dataclasses by pydantic.

Config classes stay plain dataclasses (cheap to import, ``dataclasses.replace`` works); pydantic's
``TypeAdapter`` checks and converts them on load: types (lists become tuples, ints floats), nested sections, and
unknown keys (``FORBID`` on a top-level class also covers the dataclasses nested in it). Every failure is a
``ConfigError`` (a ``ValueError``, so the CLI exits with 2) whose message names the offending field. pydantic is
imported only when a config is loaded, so ``import model.config`` stays light.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

T = TypeVar("T")

# ``__pydantic_config__`` of a config dataclass: refuse keys that are not fields.
FORBID = {"extra": "forbid"}
_UNKNOWN = ("extra_forbidden", "unexpected_keyword_argument")


class ConfigError(ValueError):
    """A config that is missing a field, has an unknown or mistyped one, or contradicts itself."""


@functools.cache
def _adapter(tp: Any):
    from pydantic import TypeAdapter

    return TypeAdapter(tp)


def load(tp: type[T], data: Any, where: str = "", error: type[ConfigError] = ConfigError) -> T:
    """``data`` (a mapping, or already a ``tp``) as a validated ``tp``; ``where`` prefixes field names in errors."""
    from pydantic import ValidationError

    try:
        return _adapter(tp).validate_python(data)
    except ValidationError as exc:
        raise error(_describe(tp, exc, where)) from None


def dump(obj: Any) -> dict[str, Any]:
    """A config as plain JSON/YAML-safe data (tuples as lists), the inverse of ``load``."""
    return _adapter(type(obj)).dump_python(obj, mode="json")


def before(handler: Any, source: Any, fn: Callable[[Any], Any]) -> Any:
    """For a dataclass's ``__get_pydantic_core_schema__``: run ``fn`` on the raw input before validation
    (defaults that depend on other fields, legacy spellings)."""
    from pydantic_core import core_schema

    return core_schema.no_info_before_validator_function(fn, handler(source))


def from_file(path: str | Path, read: Callable[[Path], Any], build: Callable[[Any], T]) -> T:
    """``build(read(path))``, a ``ConfigError`` of ``build`` prefixed with the file it came from (``read`` names the
    file in its own errors: missing, not YAML/JSON)."""
    data = read(Path(path))
    try:
        return build(data)
    except ConfigError as exc:
        raise type(exc)(f"{path}: {exc}") from None


def _describe(tp: Any, exc: Any, where: str) -> str:
    unknown: dict[tuple, list[str]] = {}
    problems: list[str] = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        if err["type"] in _UNKNOWN:
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
            continue
        msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        problems.append(f"{_path(where, loc) or 'config'}: {msg}" if loc or where else msg)
    for loc, keys in unknown.items():
        known = _known_fields(tp, loc)
        hint = f" (known: {sorted(known)})" if known else ""
        problems.insert(0, f"unknown {_path(where, loc) or 'config'} keys: {sorted(keys)}{hint}")
    return "; ".join(problems)


def _path(where: str, loc: tuple) -> str:
    out = where
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else str(part)
    return out


def _known_fields(tp: Any, loc: tuple) -> list[str]:
    """Field names of the dataclass reached from ``tp`` along ``loc`` (empty when it is not one)."""
    for part in loc:
        if not dataclasses.is_dataclass(tp) or not isinstance(part, str):
            return []
        tp = _dataclass_in(typing.get_type_hints(tp).get(part))
    return [f.name for f in dataclasses.fields(tp)] if dataclasses.is_dataclass(tp) else []


def _dataclass_in(hint: Any) -> Any:
    """The dataclass of a field annotation (``X``, ``X | None``, ``Optional[X]``), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def as_mapping(data: Any, where: str) -> Mapping[str, Any]:
    """``data`` when it is a mapping (``{}`` for None), else a ConfigError naming ``where``."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'the config'} must be a mapping, got {type(data).__name__}")
    return data
