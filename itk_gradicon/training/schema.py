"""A small schema engine: YAML mappings read into typed, frozen dataclasses, every problem one
:class:`~itk_gradicon.errors.ConfigError` whose message names the key path, the value and what is allowed.

Fields are declared with :func:`option` / :func:`option_factory` (the YAML key, choices, bounds, whether the
key is required); :func:`parse_section` checks and converts a mapping against the type hints.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..errors import ConfigError, did_you_mean

_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _meta(*, key: Optional[str] = None, choices: Optional[Tuple[Any, ...]] = None,
          minimum: Optional[float] = None, maximum: Optional[float] = None, above: Optional[float] = None,
          internal: bool = False, required: bool = False) -> Dict[str, Any]:
    """Field metadata read by the parser: YAML key, allowed values and bounds, whether the key must be given."""
    return {"key": key, "choices": choices, "min": minimum, "max": maximum, "above": above,
            "internal": internal, "required": required}


def option(default: Any, **meta: Any) -> Any:
    """A dataclass field with a default and the parser's metadata (see :func:`_meta`)."""
    return field(default=default, metadata=_meta(**meta))


def option_factory(factory: Any, **meta: Any) -> Any:
    """A dataclass field with a default factory and the parser's metadata."""
    return field(default_factory=factory, metadata=_meta(**meta))


def yaml_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key") or f.name


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _convert(value: Any, hint: Any, where: str, meta: Mapping[str, Any]) -> Any:
    """Check ``value`` against the type ``hint`` (and the field's metadata); return it converted."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union and type(None) in args:
        if value is None:
            return None
        inner = next(a for a in args if a is not type(None))
        return _convert(value, inner, where, meta)
    if value is None:
        raise ConfigError(f"{where}: a value is required (got nothing)")
    if dataclasses.is_dataclass(hint):
        return parse_section(hint, value, where)
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {_describe(value)}")
        return [_convert(v, args[0], f"{where}[{i}]", meta) for i, v in enumerate(value)]
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {_describe(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            items = [_convert(v, args[0], f"{where}[{i}]", {}) for i, v in enumerate(value)]
            if not items:
                raise ConfigError(f"{where}: expected a non-empty list")
        else:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected a list of {len(args)} values, got {_describe(value)}")
            items = [_convert(v, a, f"{where}[{i}]", {}) for i, (v, a) in enumerate(zip(value, args))]
        return tuple(items)
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_describe(value)}")
        return {str(k): _convert(v, args[1], f"{where}.{k}", {}) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"{where}: expected a whole number, got {_describe(value)}")
        return _check_bounds(value, where, meta)
    if hint is float:
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            value = float(value)  # PyYAML reads '5e-5' (no dot) as text
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_describe(value)}")
        return _check_bounds(float(value), where, meta)
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected text, got {_describe(value)}")
        value = str(value)
        choices = meta.get("choices")
        if choices:
            if value not in choices:
                folded = {str(c).lower(): c for c in choices}
                if value.lower() in folded:
                    return folded[value.lower()]
                raise ConfigError(f"{where}: unknown value {value!r}{did_you_mean(value, choices)}; allowed: "
                                  f"{', '.join(map(str, choices))}")
        return value
    raise TypeError(f"unsupported configuration type {hint!r} at {where}")  # a bug, not a user error


def _check_bounds(value, where: str, meta: Mapping[str, Any]):
    choices, low, high, above = meta.get("choices"), meta.get("min"), meta.get("max"), meta.get("above")
    if choices and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not allowed; allowed: {', '.join(map(str, choices))}")
    if low is not None and value < low:
        raise ConfigError(f"{where}: {value!r} is too small; it must be >= {low:g}")
    if above is not None and not value > above:
        raise ConfigError(f"{where}: {value!r} must be > {above:g}")
    if high is not None and value > high:
        raise ConfigError(f"{where}: {value!r} is too large; it must be <= {high:g}")
    return value


def parse_section(cls, raw: Any, where: str):
    """Build dataclass ``cls`` from the mapping ``raw``; every problem is a :class:`ConfigError`.

    Args:
        cls: a dataclass whose fields were made by :func:`option` / :func:`option_factory`.
        raw: what ``yaml.safe_load`` produced for the section (``None`` means empty).
        where: the key path used in error messages (``""`` for the top level).

    Returns:
        The instance, after its ``check(where)`` where it has one; it remembers which keys were given
        in ``keys_given``.
    """
    label = where or "the configuration"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{label}: expected a mapping of keys to values, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    by_key = {yaml_key(f): f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    prefix = f"{where}." if where else ""
    for key in raw:
        if key not in by_key:
            raise ConfigError(f"{prefix}{key}: unknown key{did_you_mean(key, by_key)}; allowed keys"
                              f"{' in ' + where if where else ''}: {', '.join(by_key)}")
    values = {}
    for key, f in by_key.items():
        if key in raw:
            values[f.name] = _convert(raw[key], hints[f.name], f"{prefix}{key}", f.metadata)
        elif f.default is None and f.default_factory is dataclasses.MISSING and f.metadata.get("required"):
            raise ConfigError(f"{prefix}{key}: required key is missing")
    instance = cls(**values)
    object.__setattr__(instance, "keys_given", frozenset(raw))
    check = getattr(instance, "check", None)
    if check is not None:
        check(where)
    return instance


def to_plain(value: Any) -> Any:
    """A parsed dataclass (or a list or mapping of them) as plain YAML data, under the YAML keys."""
    if dataclasses.is_dataclass(value):
        out = {}
        for f in dataclasses.fields(value):
            if f.metadata.get("internal"):
                continue
            out[yaml_key(f)] = to_plain(getattr(value, f.name))
        return out
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> List[str]:
    """Key paths whose values differ between two :func:`to_plain` results."""
    out: List[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(differences(a, b, path + "."))
        elif a != b:
            out.append(path)
    return out


__all__ = ["differences", "option", "option_factory", "parse_section", "to_plain", "yaml_key"]
