"""Input validation shared by every public entry point.

Each check raises ConfigError with a message that names the parameter, the
value received and what is allowed, so a mistyped notebook parameter fails
before any data is loaded or any compute is spent.
"""

from __future__ import annotations

import math
import os
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Iterable


class ConfigError(ValueError):
    """A parameter has a value that is not allowed (the message says which)."""


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Return `value` if it is one of `allowed`, else raise ConfigError."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of {allowed}")
    return value


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return `value` as int if it is an integer in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ConfigError(
            f"{name} must be an integer{_range_text(minimum, maximum)}, "
            f"got {value!r} ({type(value).__name__})"
        )
    value = int(value)
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} is too small; it must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}={value} is too large; it must be <= {maximum}")
    return value


def check_float(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return `value` as float if it is a finite number in the given interval.

    The interval is written in the error message in the usual notation, e.g.
    `(0, 1]` for low=0, high=1, low_open=True.
    """
    interval = _interval_text(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ConfigError(f"{name} must be a number in {interval}, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name}={value} must be a finite number in {interval}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ConfigError(f"{name}={value:g} is out of range; it must be in {interval}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Return `value` if it is a bool (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_list(name: str, values: Any, description: str, check_item) -> list:
    """A non-empty list (a lone string is not one) of distinct items, each passed through
    check_item(item_name, item). A repeated value of a grid list would make the same runs twice, and a
    table would count them as two."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ConfigError(f"{name} must be a list of {description}, got {values!r}")
    values = list(values)
    if not values:
        raise ConfigError(f"{name} must not be empty: give a list of {description}")
    checked = [check_item(f"{name}[{i}]", v) for i, v in enumerate(values)]
    repeated = [item for index, item in enumerate(checked) if item in checked[:index]]
    if repeated:
        raise ConfigError(
            f"{name}={values!r} repeats {repeated[0]!r}: the same value twice makes the same runs "
            "twice, which a table would count as two; give distinct values"
        )
    return checked


def check_int_list(name: str, values: Any, minimum: int | None = None) -> list[int]:
    return check_list(
        name, values, f"integers{_range_text(minimum, None)}", lambda item, v: check_int(item, v, minimum)
    )


def check_seeds(values: Any) -> list[int]:
    """The `seeds` of a grid: distinct integers >= 0 (check_list refuses a repeated one)."""
    return check_int_list("seeds", values, minimum=0)


def check_float_list(
    name: str,
    values: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> list[float]:
    interval = _interval_text(low, high, low_open, high_open)
    return check_list(
        name,
        values,
        f"numbers in {interval}",
        lambda item, v: check_float(item, v, low, high, low_open=low_open, high_open=high_open),
    )


def check_choice_list(name: str, values: Any, allowed: Iterable[Any]) -> list:
    allowed = list(allowed)
    return check_list(name, values, f"names from {allowed}", lambda item, v: check_choice(item, v, allowed))


def check_path(name: str, value: Any) -> Path:
    """Return `value` as a Path if it is a non-empty str or os.PathLike."""
    if not isinstance(value, (str, os.PathLike)) or str(value) == "":  # a bool is neither
        raise ConfigError(
            f"{name} must be a folder or file path (a non-empty str or Path), "
            f"got {value!r} ({type(value).__name__})"
        )
    return Path(value)


def _range_text(minimum, maximum) -> str:
    if minimum is None and maximum is None:
        return ""
    if maximum is None:
        return f" >= {minimum}"
    if minimum is None:
        return f" <= {maximum}"
    return f" in [{minimum}, {maximum}]"


def _interval_text(low, high, low_open, high_open) -> str:
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    low_text = "-inf" if low is None else f"{low:g}"
    high_text = "inf" if high is None else f"{high:g}"
    return f"{left}{low_text}, {high_text}{right}"
