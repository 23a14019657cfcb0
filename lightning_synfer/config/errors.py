"""Config errors and the range-check helper: a leaf module, so that every config section, the composer and
the tasks can import it at the top without an import cycle."""
from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config problem, with the file or key at fault and what was expected."""


def check(cond: bool, key: str, value: Any, expected: str) -> None:
    """Raise ConfigError naming `key`, its `value` and what was `expected` unless `cond` holds."""
    if not cond:
        raise ConfigError(f"config key '{key}' = {value!r}: expected {expected}")
