"""Checks of single config fields, each failing with a message that names the field, the value and what
is allowed (`config.<field>=<value> is invalid: allowed values are ...`). Pretraining
(`configuration`) and evaluation (`evaluation.validation`) validation are written with them."""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from fnc_jax import errors


def invalid(field: str, value: Any, allowed: str) -> errors.ConfigError:
    return errors.ConfigError(f"config.{field}={value!r} is invalid: allowed values are {allowed}.")


def choice(config: ml_collections.ConfigDict, field: str, allowed: tuple[str, ...]) -> None:
    value = get(config, field)
    if value not in allowed:
        raise invalid(field, value, ", ".join(allowed))


def get(config: ml_collections.ConfigDict, field: str) -> Any:
    value = config
    for part in field.split("."):
        value = value[part]
    return value


def integer(config: ml_collections.ConfigDict, field: str, minimum: int, maximum: int | None = None) -> int:
    value = get(config, field)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        raise invalid(field, value, f"integers >= {minimum}" + ("" if maximum is None else f" and <= {maximum}"))
    return value


def number(config: ml_collections.ConfigDict, field: str, low: float, high: float = math.inf, *, open_low=False):
    value = get(config, field)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and value <= high
    if not ok:
        bound = f"> {low}" if open_low else f">= {low}"
        raise invalid(field, value, f"numbers {bound}" + (f" and <= {high}" if high < math.inf else ""))
    return value


def int_sequence(config, field: str, minimum: int, *, allow_empty: bool = False) -> tuple[int, ...]:
    value = get(config, field)
    ok = isinstance(value, (tuple, list)) and (allow_empty or len(value) > 0)
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value)
    if not ok:
        empty = "" if allow_empty else "non-empty "
        raise invalid(field, value, f"{empty}sequences of integers >= {minimum}")
    return tuple(value)


def number_sequence(config, field: str, low: float, high: float = math.inf, *, open_low=False) -> tuple:
    value = get(config, field)
    ok = isinstance(value, (tuple, list)) and len(value) > 0
    ok = ok and all(
        isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
        and (v > low if open_low else v >= low)
        and v <= high
        for v in value
    )
    if not ok:
        bound = f"> {low}" if open_low else f">= {low}"
        raise invalid(
            field, value, f"non-empty sequences of numbers {bound}" + (f" and <= {high}" if high < math.inf else "")
        )
    return tuple(value)


def string(config, field: str) -> str:
    value = get(config, field)
    if not isinstance(value, str):
        raise invalid(field, value, "strings")
    return value
