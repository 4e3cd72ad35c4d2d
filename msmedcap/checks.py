"""What every settings section's validation shares: range checks that name the dotted key, and the
integer test that refuses booleans. A leaf module, like msmedcap.errors."""
from __future__ import annotations

from typing import Any, Iterable

from msmedcap.errors import ConfigError

AT_LEAST_1 = ((lambda v: v >= 1), ">= 1")
AT_LEAST_0 = ((lambda v: v >= 0), ">= 0")
POSITIVE = ((lambda v: v > 0), "> 0")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_bounds(section: Any, prefix: str, bounds: Iterable[tuple]) -> None:
    """``bounds``: (field, test, what is allowed); a value failing its test is a ConfigError naming
    ``prefix.field``."""
    for name, ok, allowed in bounds:
        value = getattr(section, name)
        if not ok(value):
            raise ConfigError(f"{prefix}.{name} must be {allowed}, got {value!r}")


def each(names: Iterable[str], bound: tuple) -> list:
    """The same bound for several fields."""
    return [(n, *bound) for n in names]

