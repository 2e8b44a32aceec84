"""What every config section shares: the error type and typed construction from YAML values.

A section is a dataclass whose field names are GPT-NeoX keys. ``build_section`` coerces each
value to the field's annotation the way a NeoX user would expect (an int is a valid float; a
YAML 1.1 string such as ``6e-4`` or ``5e8`` is read as the number it spells) and rejects
everything else with an error naming the key, non-finite numbers (``.inf``, ``.nan``) included:
no setting of a training run means infinity, and one let through fails much later.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Dict, Optional, Union


class ConfigError(ValueError):
    """A bad configuration value. The message names the key (and the file, when known)."""

    def __init__(self, message: str, key: Optional[str] = None):
        super().__init__(message)
        self.key = key if key is not None else message.split(":", 1)[0].strip()


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):  # PyYAML reads 6e-4 (no dot) as a string: take the number it spells
        try:
            return float(value)
        except ValueError:
            return None
    return None


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """``value`` as ``annotation`` (int, float, bool, str, list, dict, Optional/Union of these)."""
    if value is None:
        return None  # required fields are checked by each section's validate()
    origin = typing.get_origin(annotation)
    if origin is Union:
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        for option in options[:-1]:
            try:
                return coerce(key, value, option)
            except ConfigError:
                pass
        return coerce(key, value, options[-1])
    expected = getattr(annotation, "__name__", str(annotation))
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        number = _number(value)
        if number is not None and float(number).is_integer():
            return int(number)
    elif annotation is float:
        number = _number(value)
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key}: {value!r} is not a finite number; give a finite value", key)
            return float(number)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        expected = "list"
    elif annotation is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        expected = "mapping"
    else:  # pragma: no cover - a section declared a type this function does not know
        raise TypeError(f"{key}: unsupported annotation {annotation!r}")
    raise ConfigError(f"{key}: expected {expected}, got {value!r} ({type(value).__name__})", key)


def build_section(cls, values: Dict[str, Any]):
    """An instance of section ``cls`` from the keys of ``values`` it declares (others ignored)."""
    hints = typing.get_type_hints(cls)
    kwargs = {f.name: coerce(f.name, values[f.name], hints[f.name])
              for f in dataclasses.fields(cls) if f.name in values}
    return cls(**kwargs)


def section_keys(cls) -> tuple:
    return tuple(f.name for f in dataclasses.fields(cls))


def check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}", key)
