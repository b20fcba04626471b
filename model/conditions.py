"""The one rule for a request's condition (the dataset name a PDNorm / PPT model runs under).

Used by the Predictor, novel views, the gateway's model cards, the Triton client and the exported graphs,
so a condition is accepted, defaulted and refused the same way (and with the same words) everywhere:

- a model without conditions takes none: ``None``, ``""`` and ``"default"`` mean "no condition", anything
  else is refused;
- a model with conditions runs under the requested one, or under its default when none is named
  (ScanNet when the model knows it, the published models' main target, else its first condition).
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

NO_CONDITION = (None, "", "default")


class ConditionError(ValueError):
    """A condition the model does not take (a ValueError, so callers that catch those keep working)."""


def default_condition(conditions: Sequence[str]) -> str | None:
    """ScanNet when the model knows it, else its first condition; None for unconditioned models."""
    if not conditions:
        return None
    return "ScanNet" if "ScanNet" in conditions else conditions[0]


def _subject(model: str | None) -> str:
    return f"model {model!r}" if model else "this model"


def resolve_condition(conditions: Sequence[str], condition: str | None, *, default: str | None = None,
                      model: str | None = None) -> str | None:
    """The condition a request runs under; ConditionError naming the valid ones. ``default`` overrides
    the default rule (a served model's card carries its own); ``model`` names the model in messages."""
    if not conditions:
        if condition not in NO_CONDITION:
            raise ConditionError(f"{_subject(model)} takes no condition (got {condition!r})")
        return None
    if condition in (None, ""):
        return default if default is not None else default_condition(conditions)
    if condition not in conditions:
        where = f" for model {model!r}" if model else ""
        raise ConditionError(f"unknown condition {condition!r}{where}; valid: {', '.join(conditions)}")
    return condition


def condition_index(conditions: Sequence[str], condition: int | str | None, *, model: str | None = None) -> int | None:
    """Index of a condition (name or index) in the model's condition order, after `resolve_condition`;
    None for an unconditioned model (which also accepts index 0, the exported graphs' placeholder)."""
    if isinstance(condition, Integral) and not isinstance(condition, bool):
        condition = int(condition)
        if not conditions:
            if condition != 0:
                raise ConditionError(f"{_subject(model)} takes no condition (got {condition!r})")
            return None
        if not 0 <= condition < len(conditions):
            raise ConditionError(f"condition index {condition} out of range for {list(conditions)}")
        return condition
    resolved = resolve_condition(conditions, condition, model=model)
    return None if resolved is None else list(conditions).index(resolved)
