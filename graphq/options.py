"""Typed options: dataclasses read from TOML tables, with errors that name what is wrong.

A pass (and the ``[pipeline]`` and ``[data]`` tables) declares its options as a dataclass.
Each field has a type, a default and ``metadata={"help": "...", "min": ..., "max": ...}``.
:func:`parse` turns a TOML table into an instance: unknown keys (with a did-you-mean), wrong
types and values outside the allowed ones are ConfigErrors that name where the table came
from, the key, and what is allowed. Nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, Union

from graphq.errors import ConfigError, did_you_mean

T = TypeVar("T")


def help_of(field: dataclasses.Field) -> str:
    return field.metadata.get("help", "")


def fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def parse(cls: type[T], table: dict[str, Any], where: str) -> T:
    """Build ``cls`` from a TOML table; ``where`` names the table in error messages."""
    known = {f.name: f for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(
                f"{where}: unknown option '{key}'{did_you_mean(key, known)}; "
                f"allowed: {', '.join(known) or '(none)'}"
            )
        values[key] = _convert(value, hints[key], f"{where}: option '{key}'")
        _check_range(values[key], known[key], f"{where}: option '{key}'")
    try:
        obj = cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    return obj


def _check_range(value: Any, field: dataclasses.Field, where: str) -> None:
    low, high = field.metadata.get("min"), field.metadata.get("max")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    if low is not None and value < low:
        raise ConfigError(f"{where} is {value}; it must be >= {low}")
    if high is not None and value > high:
        raise ConfigError(f"{where} is {value}; it must be <= {high}")


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(
                f"{where} is {value!r}{did_you_mean(str(value), map(str, args))}; "
                f"allowed: {allowed}"
            )
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} is not "
                          f"{type_name(hint)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list of {type_name(args[0])}, not {value!r}")
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, not {value!r}")
        return {k: _convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table like {{ key = value }}, not {value!r}")
        return parse(hint, value, where)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, not {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, not {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, not {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, not {value!r}")
        return value
    raise TypeError(f"graphq.options cannot read type {hint!r} ({where})")


def type_name(hint: Any) -> str:
    """A short human name of a type hint, as `graphq passes` prints it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("none" if a is type(None) else type_name(a) for a in args)
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if origin is dict:
        return f"table of {type_name(args[1])}"
    if dataclasses.is_dataclass(hint):
        return "{" + ", ".join(f.name for f in fields(hint)) + "}"
    return getattr(hint, "__name__", str(hint))


def default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def to_table(obj: Any) -> dict[str, Any]:
    """The options as a TOML-ready table (nested dataclasses become tables, also inside dicts
    and lists, such as insert-qdq's ``overrides``; None is left out)."""
    table = {}
    for field in fields(type(obj)):
        value = _plain(getattr(obj, field.name))
        if value is not None:
            table[field.name] = value
    return table


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_table(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def describe(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) of every option, for `graphq passes`."""
    hints = typing.get_type_hints(cls)
    rows = []
    for field in fields(cls):
        default = default_of(field)
        if dataclasses.is_dataclass(default):
            default = to_table(default)
        rows.append((field.name, type_name(hints[field.name]), default, help_of(field)))
    return rows
