"""ConfigError and the field checks every config group uses: a refused value names its field, the value and
the fix."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field, the value and the fix."""


def need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def at_least(group: str, obj, low, *names: str) -> None:
    """Each of obj's fields `names` is >= low (NaN is refused too)."""
    for n in names:
        v = getattr(obj, n)
        need(v >= low, f"{group}.{n}={v} must be >= {low}")


def above(group: str, obj, low, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        need(v > low, f"{group}.{n}={v} must be > {low}")
