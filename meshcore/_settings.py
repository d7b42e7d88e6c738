"""Declared plugin settings and their validation.

Following trio's habit of validating arguments before doing work, every kind declares its
settings up front (`meshcore_kinds`), and the core checks a config table against them at load,
so a typo fails with the file and key path instead of being silently ignored.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ._errors import ConfigError

__all__ = ["Setting", "Settings", "parse_duration"]

# Go's time.ParseDuration grammar, which Consul's and Envoy's duration strings follow: one or
# more decimal numbers, each with a unit, as in "1h30m" or "1.5s"; a bare number is seconds.
_DURATION_PART = re.compile(r"\s*(\d+\.?\d*|\.\d+)\s*(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}
_DURATION_NUMBER = re.compile(r"\s*(\d+\.?\d*|\.\d+)\s*")
_DURATION_FORM = (
    'expected a duration: seconds ≥ 0 (10, 2.5) or a string like "250ms", "1.5s", "1m30s", '
    '"2h" (units h, m, s, ms, us, ns)'
)


def parse_duration(value: Any) -> float:
    """Seconds from a number or a duration string as Go's `time.ParseDuration` reads it.

    `"250ms"`, `"10s"`, `"1.5s"`, `"1m30s"`, `"1h30m"`, `"2h"`; a bare number (or number
    string) is seconds. Negative durations, NaN and anything else raise ValueError saying
    the expected form.
    """
    if isinstance(value, bool):
        raise ValueError(f"{_DURATION_FORM}, got {value!r}")
    if isinstance(value, (int, float)):
        if value >= 0:  # False for NaN too
            return float(value)
        raise ValueError(f"{_DURATION_FORM}, got {value!r}")
    if isinstance(value, str):
        if _DURATION_NUMBER.fullmatch(value):
            return float(value)
        total, pos = 0.0, 0
        for match in _DURATION_PART.finditer(value):
            if match.start() != pos:
                break
            total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
            pos = match.end()
        if pos and value[pos:].strip() == "":
            return total
        if value.strip().startswith("-"):
            raise ValueError(f"{_DURATION_FORM}; a duration cannot be negative, got {value!r}")
    raise ValueError(f"{_DURATION_FORM}, got {value!r}")


_TYPE_NAMES = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "duration": 'a duration (seconds, or "250ms", "10s", "5m")',
    "list[str]": "a list of strings",
    "list[int]": "a list of integers",
    "table": "a table",
    "any": "a value",
}


@dataclass(frozen=True)
class Setting:
    """One setting of a kind: its type, default, bounds and a line of help.

    `type` is one of "int", "float", "bool", "str", "duration", "list[str]", "list[int]",
    "table", "any". `convert`, when given, runs after the type check and may raise ValueError
    with a message saying what was expected; its result is the setting's value. The `default`
    goes through the same check and `convert` once, when the `Kind` holding the setting is
    declared (`Setting("duration", "250ms")` reaches the factory as 0.25); None means no
    default (the factory gets None), and with `convert`, a default that is not a TOML value
    is taken as already converted. A wrong `type` or default fails the plugin's load.
    """

    type: str
    default: Any = None
    help: str = ""
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    required: bool = False
    convert: Callable[[Any], Any] | None = None

    def expected(self) -> str:
        text = _TYPE_NAMES.get(self.type, self.type)
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.min is not None and self.max is not None:
            return f"{text} between {self.min:g} and {self.max:g}"
        if self.min is not None:
            return f"{text} ≥ {self.min:g}"
        if self.max is not None:
            return f"{text} ≤ {self.max:g}"
        return text

    def check(self, value: Any) -> Any:
        """The validated value; raises ValueError saying what was expected and what came."""
        bad = ValueError(f"expected {self.expected()}, got {value!r}")
        kind = self.type
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad
            value = float(value)
        elif kind == "bool":
            if not isinstance(value, bool):
                raise bad
        elif kind == "str":
            if not isinstance(value, str):
                raise bad
        elif kind == "duration":
            try:
                value = parse_duration(value)
            except ValueError:
                raise bad from None
        elif kind.startswith("list["):
            item = int if kind == "list[int]" else str
            # A tuple is accepted for defaults declared immutably; TOML only gives lists.
            if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, item) and not isinstance(v, bool) for v in value
            ):
                raise bad
            value = tuple(value)
        elif kind == "table":
            if not isinstance(value, Mapping):
                raise bad
        if self.choices is not None and value not in self.choices:
            raise bad
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if (self.min is not None and value < self.min) or (
                self.max is not None and value > self.max
            ):
                raise bad
        if self.convert is not None:
            value = self.convert(value)
        return value


_TOML_VALUES = (str, int, float, bool, list, dict)


def declared_defaults(spec: Mapping[str, Setting]) -> dict[str, Any]:
    """Each setting's default as a factory receives it: checked and converted once, when the
    kind is declared. ValueError names the setting whose declaration is wrong."""
    defaults: dict[str, Any] = {}
    for name, setting in spec.items():
        if not isinstance(setting, Setting):
            raise ValueError(f"setting {name!r}: expected a meshcore.Setting, got {setting!r}")
        if setting.type not in _TYPE_NAMES:
            raise ValueError(
                f"setting {name!r}: unknown type {setting.type!r} (one of "
                f"{', '.join(_TYPE_NAMES)})"
            )
        if setting.default is None or setting.required:
            defaults[name] = setting.default
            continue
        try:
            defaults[name] = setting.check(setting.default)
        except ValueError as exc:
            if setting.convert is not None and not isinstance(setting.default, _TOML_VALUES):
                # declared in converted form already (`Address("127.0.0.1", 8080)`)
                defaults[name] = setting.default
                continue
            raise ValueError(f"setting {name!r}: default {setting.default!r}: {exc}") from None
    return defaults


class Settings(Mapping[str, Any]):
    """A kind's validated settings: read them as attributes or by key. Immutable."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        object.__setattr__(self, "_values", dict(values or {}))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Settings are read-only")

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Settings({self._values!r})"


def validate_settings(
    spec: Mapping[str, Setting],
    table: Mapping[str, Any],
    *,
    source: str,
    path: str,
    defaults: Mapping[str, Any] | None = None,
) -> Settings:
    """Check `table` against `spec`; unknown keys and bad values raise ConfigError. A setting
    the table leaves out takes its value from `defaults` (a kind's checked defaults), else
    from its declared default."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"expected a table, got {table!r}", source=source, path=path)
    for key in table:
        if key not in spec:
            known = ", ".join(sorted(spec)) or "none"
            raise ConfigError(
                f"unknown setting {key!r} (known: {known})", source=source, path=f"{path}.{key}"
            )
    values: dict[str, Any] = {}
    for name, setting in spec.items():
        if name in table:
            try:
                values[name] = setting.check(table[name])
            except ValueError as exc:
                raise ConfigError(str(exc), source=source, path=f"{path}.{name}") from None
        elif setting.required:
            raise ConfigError(
                f"missing required setting ({setting.expected()})",
                source=source,
                path=f"{path}.{name}",
            )
        elif defaults is not None and name in defaults:
            values[name] = defaults[name]
        else:
            values[name] = setting.default
    return Settings(values)
