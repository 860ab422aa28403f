"""YAML files read into typed dataclasses, with `key=value` overrides from the command line.

A recipe declares its settings as a dataclass whose fields carry a docstring each; `load_config`
reads a YAML file into it, applies overrides such as `learning_rate=2e-6` or `lora.r=16`, checks the
types, and refuses unknown keys with the nearest known ones as a suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A settings file or override that does not fit its dataclass."""


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unknown_key(cls, key: str, where: str) -> ConfigError:
    renamed = getattr(cls, "RENAMED_KEYS", {}).get(key)
    if renamed:
        return ConfigError(f"{where}: {key!r} is now {renamed!r}")
    names = _field_names(cls)
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else f"; known keys: {names}"
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Coerce a YAML value (or an override string parsed as YAML) to the field's type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: {value!r} does not fit {annotation}")
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value is False and "no" in args:
            value = "no"  # YAML reads an unquoted `no` as false
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _schema(cls, key: str):
    """The dataclass a mapping field's keys follow (`metadata={"schema": function returning it}`), or None.

    Such a field stays a plain dict of overrides (e.g. the IADGPT settings merged into a model's),
    yet its keys are checked, typed and reachable by dotted overrides like any nested dataclass."""
    found = next((f for f in dataclasses.fields(cls) if f.name == key), None)
    schema = found.metadata.get("schema") if found is not None else None
    return schema() if schema is not None else None


def _schema_dict(schema, value: Any, where: str) -> dict[str, Any]:
    """`value` with its keys checked against `schema` and each value typed as its field (nested
    dataclasses back to plain dicts). The schema's own range checks are left to whoever merges the
    overrides into complete settings: a cross-field rule may hold only after the merge."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    hints = typing.get_type_hints(schema)
    typed = {}
    for key, item in value.items():
        if key not in _field_names(schema):
            raise _unknown_key(schema, key, where)
        if dataclasses.is_dataclass(hints[key]):  # a group stays partial too, to be merged key by key
            typed[key] = _schema_dict(hints[key], item, f"{where}.{key}")
        else:
            typed[key] = _convert(item, hints[key], f"{where}.{key}")
    return typed


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """`cls` from a mapping; unknown keys, wrong types and the values `cls.__post_init__` refuses
    (a ValueError) become a ConfigError that starts with `where`."""
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        if key not in hints or key not in _field_names(cls):
            raise _unknown_key(cls, key, where)
        schema = _schema(cls, key)
        values[key] = (_schema_dict(schema, value, f"{where}.{key}") if schema is not None
                       else _convert(value, hints[key], f"{where}.{key}"))
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


def apply_overrides(data: dict[str, Any], overrides: list[str], cls) -> dict[str, Any]:
    """`a.b=value` sets data["a"]["b"]; the value is parsed as YAML (numbers, booleans, lists)."""
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not of the form key=value")
        dotted, raw = override.split("=", 1)
        keys = dotted.split(".")
        target, target_cls = data, cls
        for depth, key in enumerate(keys):
            names = _field_names(target_cls)
            if key not in names:
                raise _unknown_key(target_cls, key, "override " + ".".join(keys[: depth + 1]))
            if depth == len(keys) - 1:
                hint = typing.get_type_hints(target_cls)[key]
                # A path or name stays the string it was typed as, whatever YAML would make of it.
                target[key] = raw if hint is str else yaml.safe_load(raw)
            else:
                hint = typing.get_type_hints(target_cls)[key]
                nested = next((a for a in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(a)), None)
                nested = nested or _schema(target_cls, key)
                if nested is None:
                    raise ConfigError(f"override {dotted}: {key!r} has no sub-keys")
                if not isinstance(target.get(key), dict):
                    target[key] = {}
                target = target[key]
                target_cls = nested
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    data = apply_overrides(data, overrides or [], cls)
    return from_dict(cls, data, where=str(path) if path else "config")
