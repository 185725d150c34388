"""Dataclass <-> dict/YAML with strict keys and `a.b.c=value` overrides (one-line errors).

The config dataclasses are the schema: every field's type is checked (and coerced from YAML or
override text) by :func:`coerce_field`, and its range by the ``spec(default, "range")`` metadata,
in :func:`from_dict` and again by :func:`check_fields` for objects built in code. File-system reads
of user files go through :func:`read_text` / :func:`read_json`, the one place that turns OS and
decoding failures into one line.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
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


def spec(default=dataclasses.MISSING, range: str | None = None, choices: tuple | None = None,
         default_factory=dataclasses.MISSING):
    """A dataclass field with a checked range (">= 1", "> 0", "[0, 1)") or a set of choices."""
    meta = {}
    if range:
        meta["range"] = _parse_range(range)
    if choices:
        meta["choices"] = tuple(choices)
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


_RANGE_RE = re.compile(r"^\s*([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])\s*$")


def _parse_range(text: str):
    m = _RANGE_RE.match(text)
    if m:
        lo, hi = float(m.group(2)), float(m.group(3))
        return text, lambda v: (v >= lo if m.group(1) == "[" else v > lo) and (v <= hi if m.group(4) == "]" else v < hi)
    op, num = text.split()
    x = float(num)
    test = {">=": lambda v: v >= x, ">": lambda v: v > x, "<=": lambda v: v <= x}[op]
    return text, test


def _check_range(value, f: dataclasses.Field, path: str) -> None:
    if value is None:
        return
    if "choices" in f.metadata and value not in f.metadata["choices"]:
        raise LingConfigError(f"{path}: must be one of {', '.join(map(str, f.metadata['choices']))}, got {value!r}")
    if "range" in f.metadata:
        text, test = f.metadata["range"]
        for v in value if isinstance(value, list) else [value]:
            if not test(v):
                where = "every entry " if isinstance(value, list) else ""
                raise LingConfigError(f"{path}: {where}must be {'in ' if text[0] in '[(' else ''}{text}, got {v!r}")


def check_fields(obj, prefix: str):
    """Type-check (and normalise) and range-check every field of dataclass ``obj``, recursively."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        path = f"{prefix}.{f.name}"
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_fields(value, path)
            continue
        value = coerce_field(value, hints[f.name], path)
        _check_range(value, f, path)
        setattr(obj, f.name, value)
    return obj


def coerce_field(value: Any, tp, path: str):
    """``value`` as type ``tp`` (a dataclass field's annotation), or one LingConfigError line."""
    return _coerce(value, tp, path)


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
        if not math.isfinite(f) or f != int(f):
            raise LingConfigError(f"{path}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            if isinstance(value, bool):
                raise TypeError
            f = float(value)
        except (TypeError, ValueError):
            raise LingConfigError(f"{path}: expected a number, got {value!r}") from None
        if not math.isfinite(f):
            raise LingConfigError(f"{path}: must be a finite number, got {value!r}")
        return f
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
    kw = {}
    for k, v in d.items():
        kw[k] = _coerce(v, hints[k], f"{path}.{k}")
        _check_range(kw[k], fields[k], f"{path}.{k}")
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


def read_text(path: str, field: str) -> str:
    """The UTF-8 text of a user file; every OS or decoding failure is one line naming ``field``."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise LingConfigError(f"{field}: {path} not found; check the path") from None
    except IsADirectoryError:
        raise LingConfigError(f"{field}: {path} is a directory; give a file") from None
    except NotADirectoryError:
        raise LingConfigError(f"{field}: {path}: a parent of it is a file, not a directory; check the path") from None
    except PermissionError:
        raise LingConfigError(f"{field}: {path} is not readable (permission denied); fix its permissions") from None
    except UnicodeDecodeError as e:
        raise LingConfigError(f"{field}: {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise LingConfigError(f"{field}: cannot read {path} ({e.strerror or type(e).__name__})") from None


def read_json(path: str, field: str):
    """Parsed JSON of a user file (one line on a missing, unreadable or malformed file)."""
    text = read_text(path, field)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LingConfigError(f"{field}: {path}:{e.lineno} is not valid JSON ({e.msg})") from None


def check_output_path(path: str, field: str) -> None:
    """A path megatron-ling will create: refuse it when an existing part of it is a file or the
    nearest existing directory is not writable (before launch, instead of a traceback later)."""
    if not isinstance(path, str) or not path:
        raise LingConfigError(f"{field}: expected a path, got {path!r}")
    p = os.path.abspath(path)
    if os.path.exists(p):
        if not os.path.isdir(p):
            raise LingConfigError(f"{field}: {path} exists and is a file; give a directory path")
        if not os.access(p, os.W_OK | os.X_OK):
            raise LingConfigError(f"{field}: {path} is not writable; choose a writable directory")
        return
    parent = os.path.dirname(p)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise LingConfigError(f"{field}: {path} lies under the file {parent}; choose a directory path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LingConfigError(f"{field}: cannot create {path}: {parent} is not writable; choose a writable directory")


def load_yaml(path: str) -> dict:
    text = read_text(path, "--config")
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise LingConfigError(f"--config: {path}{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise LingConfigError(f"--config: {path} must hold a mapping of recipe sections")
    return d


def cli_int(lo: int = 1):
    """argparse ``type=`` for an integer option >= ``lo`` (argparse prints one ``error:`` line, exit 2)."""
    import argparse

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    return parse
