"""Dataclass <-> dict/YAML with strict keys and `a.b.c=value` overrides (one-line errors)."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml

from megatron_ling.errors import LingConfigError


def _strip_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
        return tp, True
    return tp, False


def _coerce(value: Any, tp, path: str):
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise LingConfigError(f"{path}: may not be null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise LingConfigError(f"{path}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, path)
    origin = typing.get_origin(tp) or tp
    if tp is Any or origin in (dict,) and isinstance(value, dict):
        return value
    if origin is list:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise LingConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise LingConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise LingConfigError(f"{path}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise LingConfigError(f"{path}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise LingConfigError(f"{path}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise LingConfigError(f"{path}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise LingConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise LingConfigError(f"{path}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls, d: dict, path: str):
    """Build dataclass ``cls`` from ``d``; unknown keys and bad types are one-line errors."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise LingConfigError(f"{path}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in d if k not in fields]
    if unknown:
        raise LingConfigError(f"{path}.{unknown[0]}: unknown field; valid fields: {', '.join(fields)}")
    kw = {k: _coerce(v, hints[k], f"{path}.{k}") for k, v in d.items()}
    return cls(**kw)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise LingConfigError(f"override {text!r}: expected dotted.key=value, e.g. parallel.tp=2")
    key, raw = text.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise LingConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError:
        value = raw
    return keys, value


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Set ``a.b.c=value`` entries into nested dict ``d`` (values parsed as YAML scalars)."""
    for text in overrides or []:
        keys, value = parse_override(text)
        cur = d
        for k in keys[:-1]:
            nxt = cur.get(k)
            if nxt is None:
                nxt = cur[k] = {}
            if not isinstance(nxt, dict):
                raise LingConfigError(f"override {text!r}: {k} is not a section")
            cur = nxt
        cur[keys[-1]] = value
    return d


def load_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            d = yaml.safe_load(f)
    except FileNotFoundError:
        raise LingConfigError(f"--config: recipe file {path} not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise LingConfigError(f"--config: {path}{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise LingConfigError(f"--config: {path} must hold a mapping of recipe sections")
    return d
